"""Parameter, KV-cache and FLOP counts of an Apex config, read off the real module tree.

The model is built on the meta device (shapes, no memory), so the numbers come from `modeling_apex.py` itself and a
1.7T-parameter preset counts in well under a second. Conventions:

* total: every parameter once (tied embeddings once).
* active (per token): routed experts count `k / E` of their weights (`num_experts_per_tok / num_experts`); routers,
  shared experts, dense layers, attention, norms, the refinement head, MTP layers and the embeddings count fully.
  A core layer counts once, however many passes run. `non_embedding_active` drops the input embedding table (with
  tied embeddings that is also the LM head).
* KV cache: per unrolled layer that runs at `num_refinement_steps` passes (each pass of a core layer has its own
  cache slot); GQA stores `2 * kv_heads * head_dim` values per token, MLA `kv_lora_rank + qk_rope_head_dim` (the
  latent and the shared rotary key). `kv_cache_bytes_per_token` counts every layer as if it held the whole context;
  `kv_cache_bytes(config, context_len)` is the real bound, with sliding layers holding at most `sliding_window` tokens.
* Training FLOPs per token (torchtitan's convention, `6 * N + 12 * L * H * head_dim * S`, no causal halving):
  `6 * (matmul params per token) + 6 * sum over unrolled layers of H * (d_qk + d_v) * S_eff`, where the matmul
  params are the non-embedding active params with core layers and the refinement head counted once per pass (they
  run K times), plus the LM head again for tied embeddings and once per MTP depth. `d_qk = d_v = head_dim` for GQA,
  `d_qk = qk_nope + qk_rope`, `d_v = v_head_dim` for MLA. Sliding layers use `S_eff = min(S, sliding_window)`, full
  layers `S_eff = S`. With the exit loss (`refinement_exit_loss_coef`) the coda and the LM head also run once per
  earlier pass. The memory cross-attention (over at most K states per token) is left out: it is negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modeling.configuration_apex import ApexConfig
from .modeling.modeling_apex import ApexExperts, ApexForCausalLM


@dataclass(frozen=True)
class ApexCount:
    total: int
    active: int
    non_embedding_active: int
    kv_cache_bytes_per_token: int  # every unrolled layer at full context, at `dtype_bytes`
    seq_len: int
    kv_cache_bytes_at_seq_len: int  # one sequence of `seq_len` tokens, sliding layers capped at the window
    train_flops_per_token: int  # at `seq_len`


def build_on_meta(config: ApexConfig) -> ApexForCausalLM:
    """The real model with meta tensors: full module tree, no memory."""
    with torch.device("meta"):
        return ApexForCausalLM(config)


def _unrolled_layers_run(config: ApexConfig) -> list[int]:
    """Unrolled indices of the layers a forward runs at the default `num_refinement_steps` passes."""
    prelude, core = config.num_prelude_layers, config.num_core_layers
    coda_start = prelude + config.max_refinement_steps * core
    return [*range(prelude + config.num_refinement_steps * core), *range(coda_start, config.num_hidden_layers)]


def _attention_dims(config: ApexConfig) -> tuple[int, int]:
    if config.attention_type == "mla":
        return config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    return config.head_dim, config.head_dim


def _kv_values_per_token(config: ApexConfig) -> int:
    if config.attention_type == "mla":
        return config.kv_lora_rank + config.qk_rope_head_dim
    return 2 * config.num_key_value_heads * config.head_dim


def _tokens_held(config: ApexConfig, layer_type: str, context_len: int) -> int:
    return min(context_len, config.sliding_window) if layer_type == "sliding_attention" else context_len


def kv_cache_bytes(config: ApexConfig, context_len: int, dtype_bytes: int = 2) -> int:
    """KV-cache bytes of one sequence of `context_len` tokens; sliding layers hold at most `sliding_window` tokens."""
    per_layer_token = _kv_values_per_token(config) * dtype_bytes
    return sum(
        per_layer_token * _tokens_held(config, config.layer_types[u], context_len)
        for u in _unrolled_layers_run(config)
    )


def _exit_readouts(config: ApexConfig) -> int:
    """Extra coda and LM-head runs per training forward: one per earlier pass with the exit loss."""
    return config.num_refinement_steps - 1 if config.refinement_exit_loss_coef > 0 else 0


def _passes(module_name: str, config: ApexConfig) -> int:
    """How many times a module's weights are multiplied per token in a training forward."""
    if module_name.startswith("model.refinement"):
        return config.num_refinement_steps
    if module_name.startswith("model.layers."):
        physical = int(module_name.split(".")[2])
        coda_start = config.num_prelude_layers + config.num_core_layers
        if config.num_prelude_layers <= physical < coda_start:
            return config.num_refinement_steps
        return 1 + _exit_readouts(config) if physical >= coda_start else 1
    return 1


def count(config: ApexConfig, seq_len: int | None = None, dtype_bytes: int = 2) -> ApexCount:
    """Counts for `config`; `seq_len` (FLOPs and the KV bound) defaults to `min(max_position_embeddings, 4096)`."""
    seq_len = min(config.max_position_embeddings, 4096) if seq_len is None else seq_len
    model = build_on_meta(config)
    embedding = model.model.embed_tokens.weight
    lm_head = model.lm_head.weight
    vocab_times_hidden = config.vocab_size * config.hidden_size

    total = active = matmul_params = 0
    seen = set()  # tied parameters are one object reached from two modules
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            numel = param.numel()
            if isinstance(module, ApexExperts):  # [E, ...]: a token runs k of the E experts
                numel = numel * config.num_experts_per_tok // config.num_experts
            total += param.numel()
            active += numel
            if param is not embedding and param is not lm_head:
                matmul_params += numel * _passes(module_name, config)

    # The LM head multiplies once, plus once per exit and MTP depth; an input-embedding lookup costs no matmul.
    matmul_params += vocab_times_hidden * (1 + _exit_readouts(config) + config.num_mtp_layers)

    d_qk, d_v = _attention_dims(config)
    attention_layer_types = [config.layer_types[u] for u in _unrolled_layers_run(config)]
    attention_layer_types += config.layer_types[config.unrolled_coda_start :] * _exit_readouts(config)
    attention_layer_types += [config.layer_types[-1]] * config.num_mtp_layers  # an MTP layer copies the last layer
    attention_flops = sum(
        6 * config.num_attention_heads * (d_qk + d_v) * _tokens_held(config, t, seq_len) for t in attention_layer_types
    )

    return ApexCount(
        total=total,
        active=active,
        non_embedding_active=active - embedding.numel(),
        kv_cache_bytes_per_token=kv_cache_bytes(config, 1, dtype_bytes),
        seq_len=seq_len,
        kv_cache_bytes_at_seq_len=kv_cache_bytes(config, seq_len, dtype_bytes),
        train_flops_per_token=6 * matmul_params + attention_flops,
    )


# Dense bf16 tensor-core peaks (FLOP/s) by device name, the denominator of MFU, as torchtitan tabulates them. Checked
# in order: the first name found in `torch.cuda.get_device_name()` wins ("H100 NVL" before "H100").
PEAK_BF16_FLOPS = (
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("MI325X", 1300e12),
    ("MI300X", 1300e12),
)


def peak_flops_per_device(device: torch.device | str) -> float | None:
    """The bf16 dense peak of a known GPU, or None (CPUs and unknown GPUs get no MFU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


__all__ = ["ApexCount", "build_on_meta", "count", "kv_cache_bytes", "peak_flops_per_device"]
