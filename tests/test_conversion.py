"""Converters: each of the eight families, built at tiny size with random weights by its own transformers class, is
converted to Apex (`apex_hf.convert.families`) and must give the same outputs:

* logits on a right- and a left-padded batch, max |delta| <= 1e-4 in fp32, for eager and SDPA attention (GPT-OSS:
  eager only; SDPA cannot express its attention sinks and is refused);
* greedy `generate` with the KV cache, token for token;
* MoE families: the router logits and the load-balancing `aux_loss`.

The tiny configs switch on what each family is known for, at sizes where it shows: sliding windows of 3 tokens in a
batch of 7, llama3 / yarn / linear RoPE scaling in all their regimes, Gemma's per-layer-type RoPE, GPT-OSS's clamp
at a limit the activations reach, a DeepSeek correction bias that changes the routing. Weights are randomised (norm
gains included), so a swapped or missing tensor shows in the logits.

Run as a script (`python tests/test_conversion.py`) it prints the README's parity table.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig

from apex_hf import ApexForCausalLM
from apex_hf.convert.families import FAMILIES, ConversionError, convert_model, export_model


ATOL = 1e-4
ROUTER_ATOL = 1e-5
VOCAB = 99
PAD = 0
MAX_NEW_TOKENS = 8

TRUNK = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=None,  # greedy generation always runs the full MAX_NEW_TOKENS
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=12)

# A tiny configuration per family, in the family's own terms. `original_max_position_embeddings=16` puts head_dim 8's
# wavelengths into every regime of llama3 / yarn scaling.
REFERENCE_CONFIGS = {
    "llama": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True),
    "qwen3": dict(head_dim=8, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "qwen3_moe": dict(**MOE, num_experts=6, norm_topk_prob=True, mlp_only_layers=[0], router_aux_loss_coef=0.01),
    "qwen3_moe-no-norm-topk": dict(
        model_type="qwen3_moe", **MOE, num_experts=6, norm_topk_prob=False, mlp_only_layers=[1]
    ),
    "mixtral": dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=12, sliding_window=3),
    "deepseek_v3": dict(
        num_key_value_heads=4,  # MLA expands keys and values per head
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        rope_interleave=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    "gemma3_text": dict(
        head_dim=8,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=24,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
    ),
    "gpt_oss": dict(
        head_dim=8,
        num_local_experts=6,
        num_experts_per_tok=2,
        intermediate_size=12,
        sliding_window=3,
        swiglu_limit=0.4,  # the tiny model's pre-activations reach it, so the clamp is exercised
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 16,
        },
    ),
    "glm4": dict(
        head_dim=8,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
}
SDPA_UNSUPPORTED = {"gpt_oss"}
EXPORTABLE = ["llama", "llama-tied", "qwen3", "qwen3_moe", "qwen3_moe-no-norm-topk", "mixtral", "deepseek_v3"]


def model_type_of(variant: str) -> str:
    return REFERENCE_CONFIGS[variant].get("model_type", variant)


def reference_config(variant: str):
    knobs = {k: v for k, v in REFERENCE_CONFIGS[variant].items() if k != "model_type"}
    return AutoConfig.for_model(model_type_of(variant), **{**TRUNK, **knobs})


def randomise(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere: norm gains away from their neutral value (so norms are not interchangeable),
    routers sharp enough that top-k choices are not near-ties, DeepSeek's correction bias large enough to change
    which experts are chosen."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or "rotary" in name or name.endswith("embed_scale"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("norm.weight"):
                tensor.copy_((0.0 if "gemma" in type(model).__name__.lower() else 1.0) + 0.2 * noise)
            elif ".gate." in name or ".router." in name or name.endswith("sinks"):
                tensor.copy_(0.5 * noise)
            elif name.endswith("embed_tokens.weight"):
                tensor.copy_(noise)
            else:
                tensor.copy_(0.15 * noise)


@functools.cache
def model_pair(variant: str, attn_implementation: str):
    config = reference_config(variant)
    torch.manual_seed(0)
    reference = FAMILIES[config.model_type].reference_class._from_config(
        config, attn_implementation=attn_implementation
    )
    randomise(reference)
    apex = convert_model(reference)
    apex.set_attn_implementation(attn_implementation)
    assert apex.config._attn_implementation == attn_implementation
    assert apex.config.num_refinement_steps == 1 and not apex.config.has_refinement_memory
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


def forward_kwargs(padding_side: str, **extra) -> dict:
    input_ids, attention_mask, position_ids = make_batch(padding_side)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    if padding_side == "left":
        kwargs["position_ids"] = position_ids
    return kwargs


def masked_max_abs_diff(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    keep = attention_mask.bool()
    return (a[keep].float() - b[keep].float()).abs().max().item()


@torch.no_grad()
def logits_delta(reference, apex, padding_side: str) -> float:
    kwargs = forward_kwargs(padding_side)
    ref_logits, apex_logits = reference(**kwargs).logits, apex(**kwargs).logits
    assert ref_logits.shape == apex_logits.shape == (*kwargs["input_ids"].shape, VOCAB)
    assert torch.isfinite(apex_logits[kwargs["attention_mask"].bool()]).all()
    return masked_max_abs_diff(ref_logits, apex_logits, kwargs["attention_mask"])


def implementations(variant: str) -> list[str]:
    return ["eager"] if model_type_of(variant) in SDPA_UNSUPPORTED else ["eager", "sdpa"]


PAIRS = [pytest.param(v, impl, id=f"{v}-{impl}") for v in REFERENCE_CONFIGS for impl in implementations(v)]
MOE_VARIANTS = [v for v in REFERENCE_CONFIGS if model_type_of(v) in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")]


# ---------------------------------------------------------------------------------------------------------------------
# Parity


def test_every_family_is_covered():
    assert {model_type_of(v) for v in REFERENCE_CONFIGS} == set(FAMILIES)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("variant", "attn_implementation"), PAIRS)
def test_logits_match_reference(variant, attn_implementation, padding_side):
    reference, apex = model_pair(variant, attn_implementation)
    delta = logits_delta(reference, apex, padding_side)
    print(f"{variant}-{attn_implementation}-{padding_side}: max |delta logits| = {delta:.3e}")
    assert delta <= ATOL, f"max |delta logits| = {delta:.3e} > {ATOL} on real tokens"


@pytest.mark.parametrize(("variant", "attn_implementation"), PAIRS)
@torch.no_grad()
def test_greedy_generate_with_cache_matches_reference(variant, attn_implementation):
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
@pytest.mark.parametrize("variant", MOE_VARIANTS)
@torch.no_grad()
def test_router_logits_and_aux_loss_match_reference(variant, padding_side):
    reference, apex = model_pair(variant, "eager")
    kwargs = forward_kwargs(padding_side, output_router_logits=True)
    ref_out, apex_out = reference(**kwargs), apex(**kwargs)
    if getattr(ref_out, "router_logits", None) is None:
        pytest.skip(f"this transformers version's {type(reference).__name__} returns no router logits")
    num_sparse = apex.config.mlp_layer_types.count("sparse")
    assert len(ref_out.router_logits) == len(apex_out.router_logits) == num_sparse
    input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
    for layer, (ref_logits, apex_logits) in enumerate(zip(ref_out.router_logits, apex_out.router_logits)):
        delta = masked_max_abs_diff(
            ref_logits.view(*input_ids.shape, -1), apex_logits.view(*input_ids.shape, -1), attention_mask
        )
        assert delta <= ROUTER_ATOL, f"sparse layer {layer}: max |delta router logits| = {delta:.3e}"
    if ref_out.aux_loss is not None:  # DeepSeek-V3 balances without an auxiliary loss
        assert (apex_out.aux_loss - ref_out.aux_loss).abs().item() <= ROUTER_ATOL


def test_deepseek_correction_bias_is_carried_and_changes_routing():
    reference, apex = model_pair("deepseek_v3", "eager")
    for ref_layer, apex_layer in zip(reference.model.layers[1:], apex.model.layers[1:]):
        assert torch.equal(ref_layer.mlp.gate.e_score_correction_bias, apex_layer.mlp.gate.e_score_correction_bias)
    hidden = torch.randn(64, apex.config.hidden_size, generator=torch.Generator().manual_seed(0))
    gate = apex.model.layers[1].mlp.gate
    chosen = gate(hidden)[2]
    saved = gate.e_score_correction_bias.clone()
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
    unbiased = gate(hidden)[2]
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(saved)
    assert not torch.equal(chosen.sort(-1).values, unbiased.sort(-1).values), "the bias must matter in this test"


def test_gpt_oss_refuses_sdpa():
    reference, apex = model_pair("gpt_oss", "eager")
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        apex.set_attn_implementation("sdpa")
    assert ApexForCausalLM._from_config(apex.config).config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------------------------------
# Export back


@pytest.mark.parametrize("variant", EXPORTABLE)
def test_export_round_trip_restores_the_reference(variant):
    reference, apex = model_pair(variant, "eager")
    exported = export_model(apex, model_type_of(variant)).eval()
    exported.set_attn_implementation("eager")
    assert type(exported) is type(reference)
    original, restored = reference.state_dict(), exported.state_dict()
    assert set(original) == set(restored)
    for key, tensor in original.items():
        assert torch.equal(tensor, restored[key]), key
    for padding_side in ("right", "left"):
        assert logits_delta(reference, exported, padding_side) == 0.0


def test_export_names_the_knobs_a_family_cannot_hold():
    _, apex = model_pair("qwen3", "eager")
    with pytest.raises(ConversionError, match=r"qk_norm=True \(as llama: False\)"):
        export_model(apex, "llama")
    _, gemma = model_pair("gemma3_text", "eager")
    with pytest.raises(ConversionError, match="export to gemma3_text is not offered"):
        export_model(gemma, "gemma3_text")


def test_export_refuses_a_loop_and_a_routing_bias_the_family_lacks():
    _, apex = model_pair("llama", "eager")
    knobs = {k: v for k, v in apex.config.to_dict().items() if k not in ("num_hidden_layers", "layer_types")}
    looped = ApexForCausalLM(apex.config.__class__(**{**knobs, "max_refinement_steps": 2, "mlp_layer_types": None}))
    with pytest.raises(ConversionError, match="max_refinement_steps=2"):
        export_model(looped, "llama")
    _, mixtral = model_pair("mixtral", "eager")
    biased = ApexForCausalLM(mixtral.config)
    with torch.no_grad():
        biased.model.layers[0].mlp.gate.e_score_correction_bias[0] = 0.5
    with pytest.raises(ConversionError, match="e_score_correction_bias is non-zero"):
        export_model(biased, "mixtral")


def parity_table() -> str:
    """The README's table: every family, the Apex knobs it uses, the largest |delta logits| over eager / SDPA and
    right / left padding."""
    rows = ["| family | Apex knobs used | max \\|Δ logits\\| (fp32) |", "|---|---|---|"]
    for model_type, family in FAMILIES.items():
        variants = [v for v in REFERENCE_CONFIGS if model_type_of(v) == model_type]
        deltas = [
            logits_delta(*model_pair(v, impl), side)
            for v in variants
            for impl in implementations(v)
            for side in ("right", "left")
        ]
        rows.append(f"| {family.name} | {family.knobs} | {max(deltas):.1e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(parity_table())
