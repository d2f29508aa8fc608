"""Training statistics of an Apex model that no trainer logs on its own.

`ApexTrainingStats` hooks a model (plain, compiled-wrapped, DDP/FSDP-wrapped or PEFT-wrapped) and, between two
calls of `pop()`, averages over the training forwards (gradient enabled, module in training mode):

- the backbone's auxiliary losses (`ApexModel.aux_losses`: verifier loss and accuracy, verifier score per pass,
  consistency loss, router z-loss, multi-token-prediction loss),
- expert-load balance per MoE layer, as the max violation of DeepSeek's aux-loss-free paper:
  (max expert load - mean load) / mean load, averaged over layers (0 = perfect balance),
- training tokens per second (non-padding input tokens / wall time since the previous `pop()`),
- on CUDA, the peak memory allocated so far (GiB).

Values are accumulated as tensors and read once per `pop()`, so a log step costs one device sync, not one per forward.
Classes are matched by what they carry (`aux_losses`, `e_score_correction_bias`), not by type, so a model loaded as
Hub remote code (a different class object) is recognised too.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn


def _is_recording(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


class ApexTrainingStats:
    def __init__(self, model: nn.Module, prefix: str = "apex/"):
        self.prefix = prefix
        self._sums: dict[str, torch.Tensor] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._tokens = 0
        self._clock = time.perf_counter()
        self._handles = []
        for module in model.modules():
            if hasattr(module, "aux_losses") and hasattr(module, "embed_tokens"):
                self._handles.append(module.register_forward_hook(self._record_backbone, with_kwargs=True))
            elif hasattr(module, "e_score_correction_bias"):
                self._handles.append(module.register_forward_hook(self._record_router))
        if not self._handles:
            raise ValueError(f"{type(model).__name__} has no Apex backbone to collect statistics from")

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = self._sums[name] + value.detach().float()
        self._counts[name] += 1

    def _record_backbone(self, module, args, kwargs, output) -> None:
        if not _is_recording(module):
            return
        for name, value in module.aux_losses.items():
            self._add(name, value)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self._tokens += attention_mask.sum()
        elif isinstance(input_ids, torch.Tensor):
            self._tokens += input_ids.numel()
        elif kwargs.get("inputs_embeds") is not None:
            self._tokens += kwargs["inputs_embeds"].shape[:-1].numel()

    def _record_router(self, module, args, output) -> None:
        if not _is_recording(module):
            return
        top_k_index = output[2]
        load = torch.bincount(top_k_index.flatten(), minlength=module.num_experts).float()
        mean = load.mean().clamp(min=1e-9)
        self._add("expert_load_max_violation", (load.max() - mean) / mean)

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
