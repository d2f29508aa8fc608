"""Open model families -> Apex and back, with the same outputs.

Every family below is an Apex configuration with one refinement pass and no memory (`num_refinement_steps=1`,
`memory_injection="none"`), which is a plain pre-norm decoder. Converting is then:

1. the family's config becomes `ApexConfig` knobs (`Family.to_apex`); a setting Apex cannot express is a
   `ConversionError` naming the field;
2. weights are read by transformers' own loader, so any layout transformers reads - Mixtral's per-expert
   `w1 / w2 / w3`, Qwen-MoE's per-expert projections - arrives as fused experts through transformers' checkpoint
   conversion mapping, and a checkpoint with missing tensors is refused rather than randomly completed;
3. the state dict is renamed where the family names a tensor differently (`Family.renames`, `Family.splits`) and a
   few tensors are rewritten exactly (`Family.rewrites`: Gemma's `(1 + w)` norms, interleaved RoPE channels,
   GPT-OSS's transposed and interleaved experts).

Export runs the same steps backwards. It is offered where the Apex config is the family's: the exported config is
converted back and compared knob by knob with the source, so anything the family cannot hold (a refinement loop, an
extra norm, a non-zero routing correction bias) is an error naming the knob instead of a model that silently
differs.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..modeling.configuration_apex import ApexConfig
from ..modeling.modeling_apex import ApexForCausalLM
from ..outputs import atomic_output_dir, check_new_output_dir
from ..stage_folder import check_model_folder


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names what is missing or inexpressible."""


# Files next to the weights that describe the tokenizer and the generation defaults; copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Apex knobs that change no forward output of a one-pass model (training-only coefficients, sizes of parts a
# one-pass model does not build, values that other knobs are derived from). The export check ignores them.
NON_ARCHITECTURAL_KNOBS = {
    "router_aux_loss_coef",
    "router_bias_update_rate",
    "router_z_loss_coef",
    "expert_capacity_factor",
    "output_router_logits",
    "verifier_loss_coef",
    "consistency_loss_coef",
    "mtp_loss_coef",
    "refinement_dim",
    "initializer_range",
    "attention_dropout",
    "use_cache",
    "num_prelude_layers",
    "num_core_layers",
    "num_coda_layers",
    "full_attention_interval",
    "first_k_dense_replace",
    "moe_layer_freq",
    "swiglu_alpha",
}


# ---------------------------------------------------------------------------------------------------------------------
# Exact tensor rewrites


def rotary_channel_order(num_heads: int, head_dim: int, rotary_start: int, rotary_dim: int) -> torch.Tensor:
    """Row order that turns interleaved RoPE pairs `(2i, 2i + 1)` into rotate-half pairs `(i, i + d/2)` inside each
    head's rotary slice `[rotary_start, rotary_start + rotary_dim)`. Queries and keys get the same permutation, so
    every dot product, and with it the attention, is unchanged (GLM-4, DeepSeek-V3's `rope_interleave`)."""
    within = torch.arange(head_dim)
    rotary = torch.arange(rotary_dim)
    within[rotary_start : rotary_start + rotary_dim] = rotary_start + torch.cat((rotary[0::2], rotary[1::2]))
    return (torch.arange(num_heads)[:, None] * head_dim + within).flatten()


def _permute_rows(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(0, order.to(tensor.device))


def _inverse(order: torch.Tensor) -> torch.Tensor:
    return torch.argsort(order)


@dataclass(frozen=True)
class Rewrite:
    """An exact, invertible rewrite of the tensors whose Apex key matches `pattern` (a regex searched in the key)."""

    pattern: str
    to_apex: Callable[[torch.Tensor, ApexConfig], torch.Tensor]
    from_apex: Callable[[torch.Tensor, ApexConfig], torch.Tensor]


def _gqa_rotary_order(config: ApexConfig, num_heads: int) -> torch.Tensor:
    rotary_dim = int(config.head_dim * config.partial_rotary_factor)
    return rotary_channel_order(num_heads, config.head_dim, 0, rotary_dim)


def _mla_query_order(config: ApexConfig) -> torch.Tensor:
    head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    return rotary_channel_order(config.num_attention_heads, head_dim, config.qk_nope_head_dim, config.qk_rope_head_dim)


def _mla_latent_order(config: ApexConfig) -> torch.Tensor:
    return rotary_channel_order(
        1, config.kv_lora_rank + config.qk_rope_head_dim, config.kv_lora_rank, config.qk_rope_head_dim
    )


def _row_permutation(pattern: str, order: Callable[[ApexConfig], torch.Tensor]) -> Rewrite:
    return Rewrite(
        pattern,
        lambda t, c: _permute_rows(t, order(c)),
        lambda t, c: _permute_rows(t, _inverse(order(c))),
    )


GLM_ROTARY_REWRITES = (
    _row_permutation(r"self_attn\.q_proj\.(weight|bias)$", lambda c: _gqa_rotary_order(c, c.num_attention_heads)),
    _row_permutation(r"self_attn\.k_proj\.(weight|bias)$", lambda c: _gqa_rotary_order(c, c.num_key_value_heads)),
)
DEEPSEEK_ROTARY_REWRITES = (
    _row_permutation(r"self_attn\.(q_b_proj|q_proj)\.weight$", _mla_query_order),
    _row_permutation(r"self_attn\.kv_a_proj_with_mqa\.(weight|bias)$", _mla_latent_order),
)
# Gemma's RMSNorm multiplies by `1 + w` in fp32; Apex's by `w`: the same product once `w + 1` is stored.
GEMMA_NORM_REWRITES = (Rewrite(r"norm\.weight$", lambda t, c: t + 1, lambda t, c: t - 1),)


def _interleaved_to_halves(tensor: torch.Tensor) -> torch.Tensor:
    """`[..., g0, u0, g1, u1, ...]` (GPT-OSS) -> `[..., g0, g1, ..., u0, u1, ...]` (Apex's `chunk(2)` layout)."""
    return torch.cat((tensor[..., 0::2], tensor[..., 1::2]), dim=-1)


def _halves_to_interleaved(tensor: torch.Tensor) -> torch.Tensor:
    gate, up = tensor.chunk(2, dim=-1)
    return torch.stack((gate, up), dim=-1).flatten(-2)


# GPT-OSS stores experts as `x @ W` ([E, in, out]) with gate and up interleaved; Apex as `F.linear` ([E, out, in]).
GPT_OSS_EXPERT_REWRITES = (
    Rewrite(
        r"experts\.gate_up_proj$",
        lambda t, c: _interleaved_to_halves(t).transpose(1, 2).contiguous(),
        lambda t, c: _halves_to_interleaved(t.transpose(1, 2)).contiguous(),
    ),
    Rewrite(
        r"experts\.gate_up_proj_bias$", lambda t, c: _interleaved_to_halves(t), lambda t, c: _halves_to_interleaved(t)
    ),
    Rewrite(
        r"experts\.down_proj$",
        lambda t, c: t.transpose(1, 2).contiguous(),
        lambda t, c: t.transpose(1, 2).contiguous(),
    ),
)


# ---------------------------------------------------------------------------------------------------------------------
# Config mapping helpers


def _reject(family: str, field_name: str, value, reason: str):
    raise ConversionError(f"{family}: config.{field_name}={value!r} cannot be expressed in Apex ({reason})")


def _trunk(ref: PreTrainedConfig) -> dict:
    """The knobs every family shares, as Apex knobs: one pass over all layers (`num_core_layers` = the depth)."""
    rope_parameters = copy.deepcopy(ref.rope_parameters)
    flat_rope = rope_parameters if "rope_type" in rope_parameters else {}
    window = getattr(ref, "sliding_window", None)
    layer_types = getattr(ref, "layer_types", None)
    if layer_types is None:  # Mistral-style: a window, when set, applies to every layer
        layer_types = ["sliding_attention" if window is not None else "full_attention"] * ref.num_hidden_layers
    token_ids = {name: getattr(ref, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return dict(
        vocab_size=ref.vocab_size,
        hidden_size=ref.hidden_size,
        intermediate_size=ref.intermediate_size,
        num_attention_heads=ref.num_attention_heads,
        num_key_value_heads=ref.num_key_value_heads,
        head_dim=getattr(ref, "head_dim", None),
        hidden_act=getattr(ref, "hidden_act", "silu"),
        rms_norm_eps=ref.rms_norm_eps,
        initializer_range=ref.initializer_range,
        max_position_embeddings=ref.max_position_embeddings,
        rope_parameters=rope_parameters,
        partial_rotary_factor=flat_rope.get("partial_rotary_factor", 1.0),
        attention_bias=getattr(ref, "attention_bias", False),
        attention_dropout=ref.attention_dropout,
        tie_word_embeddings=ref.tie_word_embeddings,
        layer_types=list(layer_types),
        sliding_window=window if "sliding_attention" in layer_types else None,
        num_prelude_layers=0,
        num_core_layers=ref.num_hidden_layers,
        num_coda_layers=0,
        num_refinement_steps=1,
        memory_injection="none",
        **token_ids,
    )


def _trunk_back(config: ApexConfig) -> dict:
    """The shared knobs as a family config's arguments."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=copy.deepcopy(config.rope_parameters),
        attention_bias=config.attention_bias,
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def _moe(num_experts: int, num_experts_per_tok: int, moe_intermediate_size: int, **knobs) -> dict:
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size,
        **knobs,
    )


def _single_window(config: ApexConfig) -> int | None:
    """The window of a family that slides every layer or none (Mixtral, Qwen3-MoE)."""
    return config.sliding_window if "sliding_attention" in config.layer_types else None


# ---------------------------------------------------------------------------------------------------------------------
# The families


def _llama_to_apex(ref) -> dict:
    if ref.mlp_bias:
        _reject("llama", "mlp_bias", ref.mlp_bias, "Apex's MLPs have no biases")
    return _trunk(ref)


def _llama_from_apex(config: ApexConfig) -> dict:
    return _trunk_back(config)


def _qwen3_to_apex(ref) -> dict:
    return {**_trunk(ref), "qk_norm": True}


def _qwen3_from_apex(config: ApexConfig) -> dict:
    window = config.sliding_window if "sliding_attention" in config.layer_types else None
    return {
        **_trunk_back(config),
        "layer_types": list(config.layer_types),
        "sliding_window": window,
        "use_sliding_window": window is not None,
    }


def _qwen3_moe_to_apex(ref) -> dict:
    sparse = [
        i not in (ref.mlp_only_layers or []) and ref.num_experts > 0 and (i + 1) % ref.decoder_sparse_step == 0
        for i in range(ref.num_hidden_layers)
    ]
    return {
        **_trunk(ref),
        "qk_norm": True,
        "mlp_layer_types": ["sparse" if s else "dense" for s in sparse],
        **_moe(ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size, norm_topk_prob=ref.norm_topk_prob),
        "router_aux_loss_coef": ref.router_aux_loss_coef,
    }


def _qwen3_moe_from_apex(config: ApexConfig) -> dict:
    window = _single_window(config)
    return {
        **_trunk_back(config),
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "moe_intermediate_size": config.moe_intermediate_size,
        "norm_topk_prob": config.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, t in enumerate(config.mlp_layer_types) if t == "dense"],
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "router_aux_loss_coef": config.router_aux_loss_coef,
    }


def _mixtral_to_apex(ref) -> dict:
    if ref.router_jitter_noise:
        _reject("mixtral", "router_jitter_noise", ref.router_jitter_noise, "Apex's router adds no noise")
    return {
        **_trunk(ref),
        "mlp_layer_types": ["sparse"] * ref.num_hidden_layers,
        **_moe(ref.num_local_experts, ref.num_experts_per_tok, ref.intermediate_size, norm_topk_prob=True),
        "router_aux_loss_coef": ref.router_aux_loss_coef,
    }


def _mixtral_from_apex(config: ApexConfig) -> dict:
    return {
        **_trunk_back(config),
        "intermediate_size": config.moe_intermediate_size,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "sliding_window": _single_window(config),
        "router_aux_loss_coef": config.router_aux_loss_coef,
    }


def _deepseek_v3_to_apex(ref) -> dict:
    mlp_layer_types = ["dense" if i < ref.first_k_dense_replace else "sparse" for i in range(ref.num_hidden_layers)]
    return {
        **_trunk(ref),
        "attention_type": "mla",
        "q_lora_rank": ref.q_lora_rank,
        "kv_lora_rank": ref.kv_lora_rank,
        "qk_nope_head_dim": ref.qk_nope_head_dim,
        "qk_rope_head_dim": ref.qk_rope_head_dim,
        "v_head_dim": ref.v_head_dim,
        "mlp_layer_types": mlp_layer_types,
        **_moe(
            ref.n_routed_experts,
            ref.num_experts_per_tok,
            ref.moe_intermediate_size,
            num_shared_experts=ref.n_shared_experts,
            router_scoring="sigmoid",
            norm_topk_prob=ref.norm_topk_prob,
            routed_scaling_factor=ref.routed_scaling_factor,
            n_group=ref.n_group,
            topk_group=ref.topk_group,
        ),
    }


def _deepseek_v3_from_apex(config: ApexConfig) -> dict:
    dense = [t == "dense" for t in config.mlp_layer_types]
    first_k = dense.index(False) if False in dense else len(dense)
    knobs = _trunk_back(config)
    del knobs["head_dim"]  # derived from the MLA sizes
    return {
        **knobs,
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "n_routed_experts": config.num_experts,
        "n_shared_experts": config.num_shared_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "moe_intermediate_size": config.moe_intermediate_size,
        "first_k_dense_replace": first_k,
        "norm_topk_prob": config.norm_topk_prob,
        "routed_scaling_factor": config.routed_scaling_factor,
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "rope_interleave": True,
    }


def _gemma3_text_to_apex(ref) -> dict:
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(ref, name) is not None:
            _reject("gemma3_text", name, getattr(ref, name), "Apex does not soft-cap logits")
    if ref.use_bidirectional_attention:
        _reject("gemma3_text", "use_bidirectional_attention", True, "Apex is causal")
    return {
        **_trunk(ref),
        "hidden_act": ref.hidden_activation,
        "qk_norm": True,
        "sandwich_norms": True,
        "embedding_multiplier": ref.hidden_size**0.5,
        "query_pre_attn_scalar": ref.query_pre_attn_scalar,
    }


# The oldest transformers whose GPT-OSS reproduces through this mapping (measured); 5.17 does not, for reasons not
# investigated, so an older install gets an error instead of a silently different model.
GPT_OSS_MIN_TRANSFORMERS = "5.23"


def _gpt_oss_to_apex(ref) -> dict:
    if Version(transformers.__version__) < Version(GPT_OSS_MIN_TRANSFORMERS):
        raise ConversionError(
            f"gpt_oss: converting needs transformers >= {GPT_OSS_MIN_TRANSFORMERS} (installed: "
            f"{transformers.__version__}); older GPT-OSS implementations do not reproduce through this mapping"
        )
    return {
        **_trunk(ref),
        "attention_sinks": True,
        "mlp_layer_types": ["sparse"] * ref.num_hidden_layers,
        **_moe(
            ref.num_local_experts,
            ref.num_experts_per_tok,
            ref.intermediate_size,
            norm_topk_prob=True,  # GPT-OSS takes the softmax of the top-k logits: the same weights
            router_bias=True,
            expert_bias=True,
            swiglu_limit=ref.swiglu_limit,
            swiglu_alpha=getattr(ref, "swiglu_alpha", 1.702),  # transformers < 5.23 fixes it at 1.702
        ),
        "router_aux_loss_coef": ref.router_aux_loss_coef,
    }


def _glm4_to_apex(ref) -> dict:
    return {**_trunk(ref), "sandwich_norms": True, "attention_output_bias": False}


@dataclass(frozen=True)
class Family:
    """How one transformers architecture maps onto Apex.

    `renames`: decoder-layer key suffixes that the family names differently (all others are the same in Apex).
    `splits`: a family tensor that Apex keeps as two, concatenated along dim 0 in the family.
    `rewrites`: exact tensor rewrites on Apex keys (see `Rewrite`). `from_apex`: the family config's arguments, for
    export; `None` where the family is not offered as an export target. `knobs`: the Apex knobs it needs (README).
    `routing_correction_bias`: whether the family's routers hold DeepSeek's `e_score_correction_bias`.
    """

    model_type: str
    name: str
    to_apex: Callable[[PreTrainedConfig], dict]
    knobs: str
    from_apex: Callable[[ApexConfig], dict] | None = None
    renames: dict[str, str] = field(default_factory=dict)
    splits: dict[str, tuple[str, str]] = field(default_factory=dict)
    rewrites: tuple[Rewrite, ...] = ()
    routing_correction_bias: bool = False

    @property
    def reference_class(self) -> type[PreTrainedModel]:
        return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.model_type])


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            "llama",
            "Llama 3.x",
            _llama_to_apex,
            "rope_parameters (llama3 scaling), tie_word_embeddings, attention_bias",
            from_apex=_llama_from_apex,
        ),
        Family(
            "qwen3",
            "Qwen3",
            _qwen3_to_apex,
            "qk_norm, layer_types + sliding_window (max_window_layers)",
            from_apex=_qwen3_from_apex,
        ),
        Family(
            "qwen3_moe",
            "Qwen3-MoE",
            _qwen3_moe_to_apex,
            "qk_norm, num_experts, norm_topk_prob, mlp_layer_types (mlp_only_layers)",
            from_apex=_qwen3_moe_from_apex,
        ),
        Family(
            "mixtral",
            "Mixtral",
            _mixtral_to_apex,
            "num_experts, norm_topk_prob, sliding_window; per-expert w1/w2/w3 fused on load",
            from_apex=_mixtral_from_apex,
        ),
        Family(
            "deepseek_v3",
            "DeepSeek-V3 / Kimi-K2",
            _deepseek_v3_to_apex,
            "attention_type=mla, router_scoring=sigmoid, n_group/topk_group, e_score_correction_bias, "
            "num_shared_experts, routed_scaling_factor, first-k dense mlp_layer_types; interleaved RoPE permuted",
            from_apex=_deepseek_v3_from_apex,
            rewrites=DEEPSEEK_ROTARY_REWRITES,
            routing_correction_bias=True,
        ),
        Family(
            "gemma3_text",
            "Gemma 3 (text)",
            _gemma3_text_to_apex,
            "rope_parameters per layer type, layer_types + sliding_window, embedding_multiplier, sandwich_norms, "
            "qk_norm, query_pre_attn_scalar, hidden_act=gelu_pytorch_tanh; (1 + w) norms folded",
            renames={
                "post_attention_layernorm.weight": "post_self_attn_layernorm.weight",
                "pre_feedforward_layernorm.weight": "post_attention_layernorm.weight",
                "post_feedforward_layernorm.weight": "post_mlp_layernorm.weight",
            },
            rewrites=GEMMA_NORM_REWRITES,
        ),
        Family(
            "gpt_oss",
            "GPT-OSS",
            _gpt_oss_to_apex,
            "attention_sinks, attention_bias, router_bias, expert_bias, swiglu_limit/swiglu_alpha, alternating "
            "layer_types + sliding_window, rope_parameters (yarn)",
            renames={"mlp.router.weight": "mlp.gate.weight", "mlp.router.bias": "mlp.gate.bias"},
            rewrites=GPT_OSS_EXPERT_REWRITES,
        ),
        Family(
            "glm4",
            "GLM-4",
            _glm4_to_apex,
            "partial_rotary_factor, sandwich_norms, attention_bias without attention_output_bias; interleaved RoPE "
            "permuted, fused gate_up_proj split",
            splits={"mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")},
            rewrites=GLM_ROTARY_REWRITES,
        ),
    )
}


def family_of(model_type: str) -> Family:
    if model_type == "gemma3":
        raise ConversionError(
            "gemma3 is Gemma 3's vision-language checkpoint; convert its text model (model_type gemma3_text, "
            "Gemma3ForCausalLM) instead"
        )
    if model_type not in FAMILIES:
        raise ConversionError(f"unsupported model family {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


# ---------------------------------------------------------------------------------------------------------------------
# State dicts

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _split_layer_key(key: str) -> tuple[str, str] | None:
    """`("model.layers.<i>.", suffix)` for a decoder-layer key, `None` for any other key."""
    layer = _LAYER_KEY.fullmatch(key)
    return None if layer is None else (f"model.layers.{layer.group(1)}.", layer.group(2))


def _rewrite(state: dict[str, torch.Tensor], family: Family, config: ApexConfig, direction: str) -> None:
    for key in state:
        for rewrite in family.rewrites:
            if re.search(rewrite.pattern, key):
                state[key] = getattr(rewrite, direction)(state[key], config)


def state_dict_to_apex(
    family: Family, reference_state: dict[str, torch.Tensor], config: ApexConfig
) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in reference_state.items():
        if (layer := _split_layer_key(key)) is None:
            state[key] = tensor
            continue
        prefix, suffix = layer
        if suffix in family.splits:
            for part, chunk in zip(family.splits[suffix], tensor.chunk(2, dim=0)):
                state[prefix + part] = chunk
        else:
            state[prefix + family.renames.get(suffix, suffix)] = tensor
    _rewrite(state, family, config, "to_apex")
    return state


def _with_default_router_buffers(state: dict[str, torch.Tensor], config: ApexConfig) -> dict[str, torch.Tensor]:
    """Apex's routers keep buffers most families lack; zero correction bias and zero running load route alike."""
    state = dict(state)
    for physical, mlp_type in enumerate(config.physical("mlp_layer_types")):
        if mlp_type != "sparse":
            continue
        for buffer in ("e_score_correction_bias", "expert_load"):
            state.setdefault(f"model.layers.{physical}.mlp.gate.{buffer}", torch.zeros(config.num_experts))
    return state


def state_dict_from_apex(family: Family, apex_state: dict[str, torch.Tensor], config: ApexConfig) -> dict:
    state = dict(apex_state)
    _rewrite(state, family, config, "from_apex")
    for key in [k for k in state if re.search(r"mlp\.gate\.expert_load$", k)]:
        del state[key]  # running statistics of Apex's balancing; no family has them
    renamed_back = {apex: ref for ref, apex in family.renames.items()}
    result = {}
    for key, tensor in state.items():
        if (layer := _split_layer_key(key)) is None:
            result[key] = tensor
            continue
        prefix, suffix = layer
        fused = next((ref for ref, parts in family.splits.items() if suffix == parts[0]), None)
        if fused is not None:
            result[prefix + fused] = torch.cat([state[prefix + part] for part in family.splits[fused]], dim=0)
        elif not any(suffix == parts[1] for parts in family.splits.values()):
            result[prefix + renamed_back.get(suffix, suffix)] = tensor
    return result


def _load(model_class, config: PreTrainedConfig, state: dict[str, torch.Tensor], what: str) -> PreTrainedModel:
    """Build `model_class` from `state` through transformers' loader; missing or unexpected tensors are an error."""
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    problems = [f"missing {k}" for k in sorted(info["missing_keys"])]
    problems += [f"unexpected {k}" for k in sorted(info["unexpected_keys"])]
    problems += [f"mismatched {k}" for k in sorted(info["mismatched_keys"])]
    if problems:
        raise ConversionError(f"{what}: the weights do not fit the converted config: " + "; ".join(problems[:20]))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def apex_config_from(reference_config: PreTrainedConfig) -> ApexConfig:
    """The Apex config that computes what a `reference_config` model computes."""
    family = family_of(reference_config.model_type)
    knobs = family.to_apex(reference_config)
    try:
        return ApexConfig(**knobs)
    except ValueError as error:
        raise ConversionError(f"{family.model_type}: the converted config is invalid: {error}") from error


def convert_model(reference: PreTrainedModel) -> ApexForCausalLM:
    """An in-memory transformers causal LM of a supported family, as an `ApexForCausalLM` with the same outputs (in
    the reference's dtype)."""
    config = apex_config_from(reference.config)
    family = FAMILIES[reference.config.model_type]
    state = _with_default_router_buffers(state_dict_to_apex(family, reference.state_dict(), config), config)
    return _load(ApexForCausalLM, config, state, f"{family.model_type} -> apex").to(reference.dtype)


def export_model(apex: ApexForCausalLM, model_type: str) -> PreTrainedModel:
    """An Apex model as a transformers model of `model_type`, with the same outputs. Raises `ConversionError`
    naming each Apex knob the family cannot hold."""
    family = family_of(model_type)
    if family.from_apex is None:
        exportable = sorted(t for t, f in FAMILIES.items() if f.from_apex is not None)
        raise ConversionError(f"export to {model_type} is not offered; export targets: {exportable}")
    config = apex.config
    reference_config = AutoConfig.for_model(model_type, **family.from_apex(config))
    _check_expressible(config, apex_config_from(reference_config), model_type)
    state = dict(apex.state_dict())
    if not family.routing_correction_bias:
        for key in [k for k in state if k.endswith("mlp.gate.e_score_correction_bias")]:
            if state.pop(key).any():
                raise ConversionError(
                    f"{key} is non-zero, and {model_type} routes without a correction bias: the export would route "
                    f"differently"
                )
    state = state_dict_from_apex(family, state, config)
    exported = _load(family.reference_class, reference_config, state, f"apex -> {model_type}").to(apex.dtype)
    # Loaded from a state dict already in transformers' layout, the model records no conversion to undo, and
    # `save_pretrained` would keep that layout; with none recorded it writes the family's original one (Mixtral's
    # per-expert tensors), which every serving engine reads.
    exported._weight_conversions = None
    return exported


def _check_expressible(config: ApexConfig, round_trip: ApexConfig, model_type: str) -> None:
    source, back = config.to_dict(), round_trip.to_dict()
    differing = [
        f"{knob}={source.get(knob)!r} (as {model_type}: {back.get(knob)!r})"
        for knob in sorted(set(source) | set(back))
        if knob in ApexConfig.__annotations__
        and knob not in NON_ARCHITECTURAL_KNOBS
        and source.get(knob) != back.get(knob)
    ]
    if differing:
        raise ConversionError(f"this Apex config cannot be expressed as {model_type}: " + "; ".join(differing))


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def read_model_config(source: Path) -> PreTrainedConfig:
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model folder: {source / 'config.json'} does not exist")
    check_model_folder(source)  # a damaged file is named here, not met as a confusing error while loading
    return AutoConfig.from_pretrained(source)


def load_complete_model(source: Path, model_class) -> PreTrainedModel:
    """Load a checkpoint through transformers (which applies its checkpoint conversion mapping); a checkpoint with
    missing tensors is an error, never a model with random parts."""
    model, info = model_class.from_pretrained(source, dtype="auto", output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ConversionError(
            f"{source} is missing {len(missing)} tensor(s) the {model.config.model_type} model needs: "
            + ", ".join(missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    return model


def load_as_apex(source: str | Path) -> ApexForCausalLM:
    """The checkpoint folder `source` as an Apex model: an Apex checkpoint as it is, a supported family's converted."""
    model_type = read_model_config(Path(source)).model_type
    if model_type == "apex":
        return load_complete_model(Path(source), ApexForCausalLM)
    family_of(model_type)  # an unsupported family fails before any weight is read
    return convert_model(load_complete_model(Path(source), AutoModelForCausalLM))


def convert_checkpoint(source: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert the transformers checkpoint folder `source` to an Apex checkpoint in the new folder `output_dir`
    (weights in the source's dtype, config, remote code, tokenizer and generation files copied). `output_dir` is
    written whole or not at all; one that holds something is replaced only with `overwrite`."""
    source, output_dir = Path(source), check_new_output_dir(output_dir, overwrite)
    family_of(read_model_config(source).model_type)  # Apex itself is no family to convert from
    apex = load_as_apex(source)
    with atomic_output_dir(output_dir, overwrite) as staging:
        apex.save_pretrained(staging)
        copy_tokenizer_files(source, staging)
    return output_dir


def export_checkpoint(source: str | Path, output_dir: str | Path, model_type: str, overwrite: bool = False) -> Path:
    """Export the Apex checkpoint folder `source` as a `model_type` checkpoint in the new folder `output_dir`, in
    the family's own layout (Mixtral: per-expert tensors), with the tokenizer files copied."""
    source, output_dir = Path(source), check_new_output_dir(output_dir, overwrite)
    if (source_type := read_model_config(source).model_type) != "apex":
        raise ConversionError(f"{source} is not an Apex checkpoint (its model_type is {source_type!r})")
    exported = export_model(load_complete_model(source, ApexForCausalLM), model_type)
    with atomic_output_dir(output_dir, overwrite) as staging:
        exported.save_pretrained(staging)
        copy_tokenizer_files(source, staging)
    return output_dir


__all__ = [
    "FAMILIES",
    "ConversionError",
    "Family",
    "apex_config_from",
    "convert_checkpoint",
    "convert_model",
    "export_checkpoint",
    "export_model",
    "load_as_apex",
    "rotary_channel_order",
]
