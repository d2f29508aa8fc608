"""Numerical parity of Apex (K = 1, memory_injection="none") with transformers' own models, given the same weights.

With one refinement pass and no memory, Apex's `prelude -> core x 1 -> coda` stack is a plain pre-norm decoder, so
it must reproduce:

* `LlamaForCausalLM` (dense GQA; default RoPE, llama3 RoPE scaling, tied embeddings), and
* `Qwen3MoeForCausalLM` (QK-norm, softmax top-k router with and without `norm_topk_prob`, fused experts, a dense
  first layer via `mlp_only_layers=[0]` <-> Apex `first_k_dense_replace=1`),

for eager and SDPA attention: logits on right- and left-padded batches (max |delta| <= 1e-4 in fp32), greedy
`generate` with the KV cache, and (Qwen3-MoE) the router logits and the load-balancing `aux_loss`.

The reference weights are randomised (norm gains included, so a swapped q_norm/k_norm or input/post-attention norm
would show) and copied into Apex through `map_reference_state_dict`; every Apex parameter and persistent buffer is
first filled with NaN, so anything the mapping leaves unset poisons the logits and is also reported by name.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from apex_hf import ApexConfig, ApexForCausalLM


ATOL = 1e-4
ROUTER_ATOL = 1e-5
VOCAB = 99
PAD, BOS = 0, 1
MAX_NEW_TOKENS = 8

# Llama-like trunk shared by every variant (hidden 32, 4 heads of 8, 2 KV heads, 3 layers).
TRUNK = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=None,  # greedy generation always runs the full MAX_NEW_TOKENS
)
NUM_LAYERS = 3

LLAMA_VARIANTS = {
    "llama-default-rope": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # original_max_position_embeddings=16 puts head_dim=8's wavelengths (6.3, 63, 628, 6283) in all three llama3
    # regimes: kept, smoothed and divided by `factor`.
    "llama-llama3-rope": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "llama-tied-embeddings": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True
    ),
}
QWEN3_MOE_VARIANTS = {
    "qwen3moe-norm-topk": dict(norm_topk_prob=True),
    "qwen3moe-no-norm-topk": dict(norm_topk_prob=False),
}
VARIANTS = [*LLAMA_VARIANTS, *QWEN3_MOE_VARIANTS]
ATTN_IMPLEMENTATIONS = ["eager", "sdpa"]


# ---------------------------------------------------------------------------------------------------------------------
# Config and weight mapping


def apex_config_from_llama(ref: LlamaConfig) -> ApexConfig:
    assert ref.num_hidden_layers == 3 and not ref.mlp_bias and not ref.attention_bias
    return ApexConfig(
        **TRUNK,
        head_dim=ref.head_dim,
        rope_parameters=dict(ref.rope_parameters),
        tie_word_embeddings=ref.tie_word_embeddings,
        attention_type="gqa",
        qk_norm=False,
        num_experts=0,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
        num_refinement_steps=1,
        memory_injection="none",
    )


def apex_config_from_qwen3_moe(ref: Qwen3MoeConfig) -> ApexConfig:
    assert ref.num_hidden_layers == 3 and ref.decoder_sparse_step == 1 and ref.sliding_window is None
    assert ref.mlp_only_layers == [0], "Apex expresses dense layers as the first k physical layers only"
    return ApexConfig(
        **TRUNK,
        rope_parameters=dict(ref.rope_parameters),
        tie_word_embeddings=ref.tie_word_embeddings,
        attention_type="gqa",
        qk_norm=True,
        num_experts=ref.num_experts,
        num_experts_per_tok=ref.num_experts_per_tok,
        moe_intermediate_size=ref.moe_intermediate_size,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        num_shared_experts=0,
        router_scoring="softmax",
        norm_topk_prob=ref.norm_topk_prob,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        router_aux_loss_coef=ref.router_aux_loss_coef,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
        num_refinement_steps=1,
        memory_injection="none",
    )


# Reference (Llama / Qwen3-MoE) key suffix inside a decoder layer -> Apex suffix. Every reference key must match one
# rule; an unknown key is an error rather than silently dropped.
LAYER_KEY_RENAMES = {
    r"self_attn\.(q|k|v|o)_proj\.(weight|bias)": r"self_attn.\1_proj.\2",
    r"self_attn\.(q|k)_norm\.weight": r"self_attn.\1_norm.weight",
    r"(input_layernorm|post_attention_layernorm)\.weight": r"\1.weight",
    r"mlp\.(gate|up|down)_proj\.weight": r"mlp.\1_proj.weight",  # dense SwiGLU
    r"mlp\.gate\.weight": r"mlp.gate.weight",  # Qwen3MoeTopKRouter.weight -> ApexTopKRouter.weight
    r"mlp\.experts\.(gate_up_proj|down_proj)": r"mlp.experts.\1",  # fused [E, 2I, H] / [E, H, I], same layout
}
TOP_LEVEL_KEY_RENAMES = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def map_reference_state_dict(ref_state: dict[str, torch.Tensor], apex_config: ApexConfig) -> dict[str, torch.Tensor]:
    """Rename a Llama / Qwen3-MoE state dict to Apex keys.

    `model.layers.{u}.*` (u = the reference layer, which is Apex's *unrolled* index) goes to
    `model.layers.{physical_layer_index(u)}.*`; with K = 1 that is the identity, and two reference layers landing on
    one shared core layer (K > 1) is an error. Apex's router has persistent buffers the reference lacks
    (aux-loss-free balancing: `e_score_correction_bias` and the running `expert_load`); they are set to zeros, which
    leaves selection untouched.
    """
    mapped: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}

    def put(apex_key: str, ref_key: str, value: torch.Tensor) -> None:
        if apex_key in mapped:
            raise AssertionError(f"{ref_key} and {source_of[apex_key]} both map to {apex_key}")
        mapped[apex_key], source_of[apex_key] = value, ref_key

    for ref_key, value in ref_state.items():
        if ref_key in TOP_LEVEL_KEY_RENAMES:
            put(TOP_LEVEL_KEY_RENAMES[ref_key], ref_key, value)
            continue
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", ref_key)
        if layer is None:
            raise AssertionError(f"no mapping rule for reference key {ref_key!r}")
        unrolled, suffix = int(layer.group(1)), layer.group(2)
        for pattern, replacement in LAYER_KEY_RENAMES.items():
            if re.fullmatch(pattern, suffix):
                physical = apex_config.physical_layer_index(unrolled)
                put(f"model.layers.{physical}.{re.sub(pattern, replacement, suffix)}", ref_key, value)
                break
        else:
            raise AssertionError(f"no mapping rule for reference layer key {ref_key!r}")

    for key, value in list(mapped.items()):
        if key.endswith(".mlp.gate.weight"):
            for buffer in ("e_score_correction_bias", "expert_load"):
                mapped[key.removesuffix("weight") + buffer] = torch.zeros(value.shape[0])
    return mapped


def load_into_apex(apex: ApexForCausalLM, mapped: dict[str, torch.Tensor]) -> None:
    """Load `mapped` and fail, listing the keys, if anything is missing, unexpected, mis-shaped or left unset."""
    apex_state = apex.state_dict()
    mismatched = [
        f"{k}: reference {tuple(v.shape)} vs apex {tuple(apex_state[k].shape)}"
        for k, v in mapped.items()
        if k in apex_state and v.shape != apex_state[k].shape
    ]
    assert not mismatched, "shape mismatches:\n  " + "\n  ".join(mismatched)

    with torch.no_grad():  # anything the mapping does not set stays NaN and is caught below
        for tensor in apex_state.values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    result = apex.load_state_dict(mapped, strict=False)
    problems = [f"missing (left unset in Apex): {k}" for k in result.missing_keys]
    problems += [f"unexpected (no Apex slot): {k}" for k in result.unexpected_keys]
    problems += [f"still NaN after loading: {k}" for k, v in apex.state_dict().items() if v.isnan().any()]
    assert not problems, "weight mapping incomplete:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------------------------------
# Model pairs


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere: norm gains around 1 (so norms are not interchangeable), a router sharp enough
    that top-k choices are not near-ties."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                param.copy_(0.5 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:
                param.copy_(0.15 * noise)


@functools.cache
def model_pair(variant: str, attn_implementation: str):
    torch.manual_seed(0)
    if variant in LLAMA_VARIANTS:
        ref_config = LlamaConfig(**TRUNK, num_hidden_layers=NUM_LAYERS, **LLAMA_VARIANTS[variant])
        reference = LlamaForCausalLM._from_config(ref_config, attn_implementation=attn_implementation)
        apex_config = apex_config_from_llama(ref_config)
    else:
        ref_config = Qwen3MoeConfig(
            **TRUNK,
            num_hidden_layers=NUM_LAYERS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
            use_sliding_window=False,
            router_aux_loss_coef=0.01,
            **QWEN3_MOE_VARIANTS[variant],
        )
        reference = Qwen3MoeForCausalLM._from_config(ref_config, attn_implementation=attn_implementation)
        apex_config = apex_config_from_qwen3_moe(ref_config)
    apex = ApexForCausalLM._from_config(apex_config, attn_implementation=attn_implementation)
    assert reference.config._attn_implementation == attn_implementation
    assert apex.config._attn_implementation == attn_implementation
    assert apex.config.num_refinement_steps == 1 and not apex.config.has_refinement_memory
    assert apex.config.mlp_layer_types == [
        "sparse" if hasattr(layer.mlp, "experts") else "dense" for layer in reference.model.layers
    ]

    _randomise(reference)
    load_into_apex(apex, map_reference_state_dict(reference.state_dict(), apex.config))
    if apex_config.tie_word_embeddings:
        assert apex.lm_head.weight.data_ptr() == apex.model.embed_tokens.weight.data_ptr()
        assert reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    return reference.eval(), apex.eval()


def make_batch(padding_side: str):
    """Three sequences of lengths 7, 5, 3; position ids count real tokens only (what `generate` does)."""
    generator = torch.Generator().manual_seed(7)
    lengths, width = [7, 5, 3], 7
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        span = slice(0, length) if padding_side == "right" else slice(width - length, width)
        input_ids[row, span] = torch.randint(3, VOCAB, (length,), generator=generator)
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def masked_max_abs_diff(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    keep = attention_mask.bool()
    return (a[keep].float() - b[keep].float()).abs().max().item()


PAIRS = [pytest.param(v, impl, id=f"{v}-{impl}") for v in VARIANTS for impl in ATTN_IMPLEMENTATIONS]
MOE_PAIRS = [pytest.param(v, impl, id=f"{v}-{impl}") for v in QWEN3_MOE_VARIANTS for impl in ATTN_IMPLEMENTATIONS]


# ---------------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("variant", "attn_implementation"), PAIRS)
@torch.no_grad()
def test_logits_match_reference(variant, attn_implementation, padding_side):
    reference, apex = model_pair(variant, attn_implementation)
    input_ids, attention_mask, position_ids = make_batch(padding_side)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if padding_side == "left":
        kwargs["position_ids"] = position_ids
    ref_logits = reference(**kwargs).logits
    apex_logits = apex(**kwargs).logits
    assert ref_logits.shape == apex_logits.shape == (*input_ids.shape, VOCAB)
    assert torch.isfinite(apex_logits[attention_mask.bool()]).all()
    delta = masked_max_abs_diff(ref_logits, apex_logits, attention_mask)
    print(f"{variant}-{attn_implementation}-{padding_side}: max |delta logits| = {delta:.3e}")
    assert delta <= ATOL, f"max |delta logits| = {delta:.3e} > {ATOL} on real tokens"


@pytest.mark.parametrize(("variant", "attn_implementation"), PAIRS)
@torch.no_grad()
def test_greedy_generate_matches_reference(variant, attn_implementation):
    reference, apex = model_pair(variant, attn_implementation)
    input_ids, attention_mask, _ = make_batch("left")
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,
        use_cache=True,
        pad_token_id=PAD,
    )
    ref_tokens = reference.generate(**kwargs)
    apex_tokens = apex.generate(**kwargs)
    assert ref_tokens.shape == (input_ids.shape[0], input_ids.shape[1] + MAX_NEW_TOKENS)
    assert torch.equal(ref_tokens, apex_tokens), f"reference:\n{ref_tokens}\napex:\n{apex_tokens}"


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("variant", "attn_implementation"), MOE_PAIRS)
@torch.no_grad()
def test_router_logits_and_aux_loss_match_reference(variant, attn_implementation, padding_side):
    reference, apex = model_pair(variant, attn_implementation)
    input_ids, attention_mask, position_ids = make_batch(padding_side)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_router_logits=True)
    if padding_side == "left":
        kwargs["position_ids"] = position_ids
    ref_out, apex_out = reference(**kwargs), apex(**kwargs)

    num_sparse = apex.config.mlp_layer_types.count("sparse")
    assert len(ref_out.router_logits) == len(apex_out.router_logits) == num_sparse
    for layer, (ref_logits, apex_logits) in enumerate(zip(ref_out.router_logits, apex_out.router_logits)):
        assert apex_logits.dtype == torch.float32
        assert ref_logits.shape == apex_logits.shape == (input_ids.numel(), apex.config.num_experts)
        delta = masked_max_abs_diff(
            ref_logits.view(*input_ids.shape, -1), apex_logits.view(*input_ids.shape, -1), attention_mask
        )
        assert delta <= ROUTER_ATOL, f"sparse layer {layer}: max |delta router logits| = {delta:.3e}"

    assert apex_out.aux_loss is not None and ref_out.aux_loss is not None
    aux_delta = (apex_out.aux_loss - ref_out.aux_loss).abs().item()
    print(
        f"{variant}-{attn_implementation}-{padding_side}: "
        f"aux_loss {ref_out.aux_loss.item():.6f}, |delta| {aux_delta:.3e}"
    )
    assert aux_delta <= ROUTER_ATOL
