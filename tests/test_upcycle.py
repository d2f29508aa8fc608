"""Function-preserving upcycling: at initialisation the upcycled model's logits (and greedy generation) are the
source's; one optimizer step moves the new parts."""

from __future__ import annotations

import pytest
import torch
from test_conversion import forward_kwargs, make_batch, model_pair
from tiny_configs import tiny_config

from apex_hf import ApexForCausalLM
from apex_hf.convert.families import ConversionError
from apex_hf.convert.upcycle import upcycle_model, upcycle_to_moe, upcycle_to_refinement


MOE_ATOL = 1e-5  # k copies of the MLP weighted by k weights that sum to 1: equal up to fp32 rounding


def single_pass_apex(**overrides) -> ApexForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, **overrides)
    config._attn_implementation = "eager"
    return ApexForCausalLM(config).eval()


@torch.no_grad()
def max_logit_delta(source, upcycled) -> float:
    kwargs = forward_kwargs("left")
    keep = kwargs["attention_mask"].bool()
    return (source(**kwargs).logits[keep] - upcycled(**kwargs).logits[keep]).abs().max().item()


def one_step(model: ApexForCausalLM) -> None:
    """One AdamW step on a small batch, with the load-balancing loss as a trainer adds it."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("source_kind", ["apex", "converted-llama"])
def test_dense_to_moe_keeps_the_logits_and_the_experts_then_diverge(source_kind):
    source = single_pass_apex() if source_kind == "apex" else model_pair("llama", "eager")[1]
    upcycled = upcycle_to_moe(source, num_experts=4, num_experts_per_tok=2).eval()
    assert upcycled.config.mlp_layer_types == ["sparse"] * source.config.num_hidden_layers
    delta = max_logit_delta(source, upcycled)
    print(f"{source_kind} dense -> MoE: max |delta logits| = {delta:.2e}")
    assert delta <= MOE_ATOL

    experts = upcycled.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[3])
    router_before = upcycled.model.layers[0].mlp.gate.weight.detach().clone()
    one_step(upcycled)
    assert not torch.equal(upcycled.model.layers[0].mlp.gate.weight, router_before)
    assert not torch.allclose(experts.gate_up_proj[0], experts.gate_up_proj[3])  # the copies saw different tokens


@pytest.mark.parametrize("memory_injection", ["gated_add", "cross_attention"])
def test_single_pass_to_refinement_is_exact_at_init_and_the_gates_then_open(memory_injection):
    source = single_pass_apex(num_experts=4, num_experts_per_tok=2)
    upcycled = upcycle_to_refinement(source, num_refinement_steps=3, memory_injection=memory_injection).eval()
    assert (upcycled.config.num_refinement_steps, upcycled.config.num_hidden_layers) == (3, 8)
    assert max_logit_delta(source, upcycled) == 0.0

    input_ids, attention_mask, _ = make_batch("left")
    kwargs = dict(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        assert torch.equal(source.generate(**kwargs), upcycled.generate(**kwargs))

    one_step(upcycled)
    assert upcycled.model.pass_gates.abs().min() > 0
    assert upcycled.model.refinement.memory_gate.abs().min() > 0


def test_both_at_once_from_a_converted_family_with_a_new_split():
    _, source = model_pair("qwen3", "eager")  # QK-norm and sliding layers, all in one core after conversion
    upcycled = upcycle_model(
        source, num_experts=3, num_experts_per_tok=1, num_refinement_steps=2, num_prelude_layers=1, num_coda_layers=1
    ).eval()
    config = upcycled.config
    assert (config.num_prelude_layers, config.num_core_layers, config.num_coda_layers) == (1, 1, 1)
    assert config.physical("layer_types") == source.config.layer_types
    assert max_logit_delta(source, upcycled) <= MOE_ATOL


def test_upcycling_refuses_what_it_cannot_preserve():
    moe = single_pass_apex(num_experts=4)
    with pytest.raises(ConversionError, match="already has expert layers"):
        upcycle_to_moe(moe, num_experts=4)
    looped = upcycle_to_refinement(single_pass_apex(), num_refinement_steps=2)
    with pytest.raises(ConversionError, match="already loops"):
        upcycle_to_refinement(looped, num_refinement_steps=3)
    with pytest.raises(ConversionError, match="at least one of the source's 4 layers"):
        upcycle_to_refinement(single_pass_apex(), num_refinement_steps=2, num_prelude_layers=2, num_coda_layers=2)
    with pytest.raises(ConversionError, match="nothing to upcycle"):
        upcycle_model(single_pass_apex())


@pytest.mark.parametrize("variant", ["deepseek_v3", "gemma3_text", "gpt_oss", "glm4", "mixtral"])
def test_converted_families_loop_with_unchanged_logits(variant):
    """MLA, per-layer-type RoPE with sandwich norms, attention sinks, partial rotary, sliding experts: all loop."""
    _, source = model_pair(variant, "eager")
    upcycled = upcycle_to_refinement(source, num_refinement_steps=2, num_prelude_layers=1, num_coda_layers=1).eval()
    assert upcycled.config.num_hidden_layers == 4
    assert max_logit_delta(source, upcycled) == 0.0
