"""Training statistics of an Apex model that no trainer logs on its own.

`ApexTrainingStats` hooks a model (plain, compiled-wrapped, DDP/FSDP-wrapped or PEFT-wrapped) and, between two
calls of `pop()`, averages over the training forwards (gradient enabled, module in training mode):

- the backbone's auxiliary losses (`ApexModel.aux_losses`: verifier loss and accuracy, verifier score per pass,
  consistency loss, router z-loss) and the causal LM's multi-token-prediction loss (`mtp_loss`),
- per MoE layer (suffix `/layer_{i}` for `model.layers.<i>`, `/mtp_{j}` for multi-token-prediction depth j + 1) and,
  without a suffix, averaged over all router calls:
  - `expert_load_max_violation`, the max violation of DeepSeek's aux-loss-free paper: (max expert load - mean load)
    / mean load (0 = perfect balance),
  - `router_entropy`, the entropy of each token's routing distribution averaged over tokens: the softmax of the
    router logits for `router_scoring="softmax"`, the sigmoid scores normalised to sum to 1 for `"sigmoid"`, both
    without the balancing bias (which only chooses experts). It lies in [0, log(num_experts)]; log(num_experts)
    means the router does not tell the experts apart,
  Both count every token the router sees, padding included. A core layer's router runs once per refinement pass:
  its passes are averaged into the one physical layer's values (and count once each in the overall averages),
- with refinement memory (`config.has_refinement_memory`): `memory_gate_abs_mean`, the mean |memory_gate| (how
  strongly the memory enters the residual stream), and `memory_rms`, the root mean square of the last pass's memory
  state over the non-padding tokens,
- training tokens per second (non-padding input tokens / wall time since the previous `pop()`),
- on CUDA, the peak memory allocated so far (GiB).

Values are accumulated as tensors and read once per `pop()`, so a log step costs one device sync, not one per forward.
Classes are matched by what they carry (`aux_losses`, `e_score_correction_bias`, `memory_gate`), not by type, so a
model loaded as Hub remote code (a different class object) is recognised too.

These statistics (two per MoE layer, dozens in all) go to the trackers and the log history; `console_line` keeps the
console to a handful of scalars per log step.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from functools import partial

import torch
from torch import nn


# `layers.<i>.` of the backbone or `mtp.<j>.` of a multi-token predictor, anywhere in a module name: wrappers add
# prefixes (`module.` of DDP, `base_model.model.` of PEFT) and regional compilation adds `_orig_mod.` after the layer.
_LAYER_IN_NAME = re.compile(r"(?:^|\.)(layers|mtp)\.(\d+)\.")


def layer_name(module_name: str) -> str:
    """The log-key suffix of the router named `module_name`: `layer_{i}` or `mtp_{j}` (the module name itself for a
    router found anywhere else)."""
    match = _LAYER_IN_NAME.search(module_name)
    if match is None:
        return module_name
    kind, index = match.groups()
    return f"{'layer' if kind == 'layers' else 'mtp'}_{index}"


def routing_probabilities(router: nn.Module, router_logits: torch.Tensor) -> torch.Tensor:
    """Each token's distribution over the experts, as `router_entropy` reads it (see the module docstring)."""
    if router.config.router_scoring == "softmax":
        return router_logits.softmax(dim=-1)
    scores = router_logits.sigmoid()
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


# What a console line shows of a log entry, in this order: (key, format). Held-out entries show the same keys with
# `eval_` in front. The full entry goes to the trackers and the log history.
CONSOLE_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("perplexity", "perplexity {:.2f}"),
    ("reward", "reward {:.3f}"),  # GRPO
    ("rewards/accuracies", "preference accuracy {:.3f}"),  # DPO
    ("mean_token_accuracy", "token accuracy {:.3f}"),  # SFT, DPO
    ("learning_rate", "lr {:.2e}"),
    ("grad_norm", "grad norm {:.3f}"),
    ("train_tokens_per_second", "{:,.0f} tokens/s"),
    ("mfu", "MFU {:.1f}%"),
    ("train_loss", "train loss {:.4f}"),  # the trainer's end-of-training entry
    ("train_runtime", "{:.1f}s training"),
)


def console_line(entry: dict) -> str:
    """One short line of a log entry (empty if it has none of `CONSOLE_FIELDS`)."""
    held_out = "eval_loss" in entry
    prefix = "eval_" if held_out else ""
    parts = [
        template.format(entry[prefix + key])
        for key, template in CONSOLE_FIELDS
        if isinstance(entry.get(prefix + key), (int, float))
    ]
    if held_out and parts:
        parts[0] = f"held-out {parts[0]}"
    return " | ".join(parts)


def _is_recording(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


def _eager_hook(hook):
    """The statistics hooks run eagerly, also inside compiled layers. Traced by torch.compile, their Python
    bookkeeping (how many sums it holds, each count) becomes guards that fail on the next call: each router call
    recompiled the frame holding the hook until Dynamo's limit of 8, which then left that frame eager for good."""
    return torch.compiler.disable(hook, recursive=True)


class ApexTrainingStats:
    def __init__(self, model: nn.Module, prefix: str = "apex/"):
        self.prefix = prefix
        self._sums: dict[str, torch.Tensor] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._tokens = 0
        self._clock = time.perf_counter()
        # (refinement module, memory) of the latest refinement pass, read when the backbone's forward ends.
        self._last_memory: tuple[nn.Module, torch.Tensor] | None = None
        self._handles = []
        for name, module in model.named_modules():
            if hasattr(module, "aux_losses") and hasattr(module, "embed_tokens"):
                self._handles.append(module.register_forward_hook(self._record_backbone, with_kwargs=True))
            elif hasattr(module, "e_score_correction_bias"):
                self._handles.append(module.register_forward_hook(partial(self._record_router, layer_name(name))))
            elif hasattr(module, "memory_gate"):
                self._handles.append(module.register_forward_hook(self._record_refinement))
            elif hasattr(module, "mtp") and hasattr(module, "lm_head"):
                # the causal LM adds its multi-token-prediction loss after the backbone's forward has ended
                self._handles.append(module.register_forward_hook(self._record_multi_token_prediction))
        if not self._handles:
            raise ValueError(f"{type(model).__name__} has no Apex backbone to collect statistics from")

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = self._sums[name] + value.detach().float()
        self._counts[name] += 1

    @_eager_hook
    def _record_backbone(self, module, args, kwargs, output) -> None:
        if not _is_recording(module):
            return
        for name, value in module.aux_losses.items():
            self._add(name, value)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        padding_mask = kwargs.get("attention_mask")
        if not (isinstance(padding_mask, torch.Tensor) and padding_mask.dim() == 2):
            padding_mask = None  # none given, or a prepared 4D / per-layer-type mask
        if padding_mask is not None:
            self._tokens += padding_mask.sum()
        elif isinstance(input_ids, torch.Tensor):
            self._tokens += input_ids.numel()
        elif kwargs.get("inputs_embeds") is not None:
            self._tokens += kwargs["inputs_embeds"].shape[:-1].numel()
        if self._last_memory is not None:
            refinement, memory = self._last_memory
            self._last_memory = None
            self._record_memory(refinement, memory, padding_mask)

    @_eager_hook
    def _record_multi_token_prediction(self, module, args, output) -> None:
        mtp_loss = getattr(output, "mtp_loss", None)
        if _is_recording(module) and mtp_loss is not None:
            self._add("mtp_loss", mtp_loss)

    @_eager_hook
    def _record_refinement(self, module, args, output) -> None:
        # Every pass overwrites it: what the backbone's hook finds is the last pass's memory.
        if _is_recording(module):
            self._last_memory = (module, output[1])

    @torch.no_grad()
    def _record_memory(self, refinement: nn.Module, memory: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        self._add("memory_gate_abs_mean", refinement.memory_gate.abs().mean())
        mean_square = memory.float().pow(2).mean(dim=-1)  # per token
        if padding_mask is None:
            self._add("memory_rms", mean_square.mean().sqrt())
            return
        weights = padding_mask[:, -mean_square.shape[1] :].float()  # a cached step's mask covers the past too
        self._add("memory_rms", ((mean_square * weights).sum() / weights.sum().clamp(min=1)).sqrt())

    @_eager_hook
    def _record_router(self, layer: str, module, args, output) -> None:
        if not _is_recording(module):
            return
        router_logits, _, top_k_index = output
        chosen = top_k_index.flatten()
        # scatter_add_, not bincount: on CUDA, bincount reads the largest index back to size its output (a sync).
        load = torch.zeros(module.num_experts, device=chosen.device).scatter_add_(
            0, chosen, torch.ones_like(chosen, dtype=torch.float32)
        )
        mean = load.mean().clamp(min=1e-9)
        with torch.no_grad():  # the logits carry the router's graph
            entropy = torch.special.entr(routing_probabilities(module, router_logits)).sum(dim=-1).mean()
        for name, value in (("expert_load_max_violation", (load.max() - mean) / mean), ("router_entropy", entropy)):
            self._add(name, value)
            self._add(f"{name}/{layer}", value)

    def pop(self) -> dict[str, float]:
        """Averages since the previous call (empty if no training forward ran), then reset."""
        now = time.perf_counter()
        stats = {}
        if self._counts:
            names = sorted(self._sums)
            values = torch.stack([self._sums[n] / self._counts[n] for n in names]).tolist()
            stats = {self.prefix + name: value for name, value in zip(names, values)}
        if self._tokens:
            stats["train_tokens_per_second"] = float(self._tokens) / max(now - self._clock, 1e-9)
        if torch.cuda.is_available():
            stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._sums.clear()
        self._counts.clear()
        self._tokens = 0
        self._clock = now
        return stats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
