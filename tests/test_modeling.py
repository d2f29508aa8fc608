"""Model-level behaviour: causality, attention backends, refinement-loop outputs, bad input."""

import pytest
import torch
from tiny_configs import VARIANTS, tiny_config

from apex_hf import ApexForCausalLM


def build(config, attn="eager", experts=None, seed=0):
    if attn == "sdpa" and config.attention_sinks:
        pytest.skip(
            "SDPA cannot express attention sinks and is refused (test_conversion.py::test_gpt_oss_refuses_sdpa)"
        )
    torch.manual_seed(seed)
    config._attn_implementation = attn
    if experts is not None:
        config._experts_implementation = experts
    return ApexForCausalLM(config).eval()


def perturb_after(ids: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(3, 97, (ids.shape[0], ids.shape[1] - t - 1), generator=generator)
    return changed


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causality_every_feature_on(variant, attn):
    """Changing tokens after t must leave logits, verifier scores and memory at positions <= t bit-for-bit unchanged.

    `batched_mm` experts compute each token on its own, so the check is exact. `grouped_mm` / eager experts batch the
    rows routed to one expert together and the GEMM's rounding can depend on how many rows there are; that is
    checked separately below with a float tolerance."""
    model = build(tiny_config(variant), attn, experts="batched_mm")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 12), generator=generator)
    t = 6
    with torch.no_grad():
        a, b = model(ids), model(perturb_after(ids, t, generator))
    assert not torch.equal(a.logits[:, t + 1 :], b.logits[:, t + 1 :]), "the perturbation must reach later positions"
    assert torch.equal(a.logits[:, : t + 1], b.logits[:, : t + 1])
    assert len(a.verifier_scores) == model.config.num_refinement_steps
    for score_a, score_b in zip(a.verifier_scores, b.verifier_scores):
        assert torch.equal(score_a[:, : t + 1], score_b[:, : t + 1])
    for memory_a, memory_b in zip(a.memory_states, b.memory_states):
        assert torch.equal(memory_a[:, : t + 1], memory_b[:, : t + 1])


@pytest.mark.parametrize("experts", ["apex_grouped_mm", "grouped_mm", "eager"])
def test_causality_of_row_grouping_expert_kernels(experts):
    """Expert kernels that group tokens per expert: the past is unchanged up to GEMM rounding (no information leak:
    the same check with batched_mm above is exact)."""
    model = build(tiny_config("gqa"), "sdpa", experts=experts)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (2, 12), generator=generator)
    with torch.no_grad():
        a, b = model(ids), model(perturb_after(ids, 6, generator))
    assert (a.logits[:, :7] - b.logits[:, :7]).abs().max() < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eager_matches_sdpa(variant):
    """fp32, padded batch: eager and sdpa agree to 1e-5 (differences are summation order only)."""
    eager, sdpa = build(tiny_config(variant), "eager"), build(tiny_config(variant), "sdpa")
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        delta = (eager(ids, attention_mask=mask).logits - sdpa(ids, attention_mask=mask).logits)[mask.bool()]
    assert delta.abs().max() < 1e-5


def test_refinement_outputs_shapes_and_ranges():
    config = tiny_config("gqa")
    model = build(config)
    ids = torch.randint(3, 97, (2, 7))
    out = model(ids, output_hidden_states=True, output_router_logits=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1  # every pass of the core is an unrolled layer
    assert len(out.router_logits) == config.mlp_layer_types.count("sparse")
    assert len(out.memory_states) == config.num_refinement_steps
    for score in out.verifier_scores:
        assert score.shape == (2, 7) and bool(((score >= 0) & (score <= 1)).all())


def test_fewer_refinement_steps_change_the_output():
    model = build(tiny_config("gqa"))
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        full, short = model(ids), model(ids, num_refinement_steps=1)
    assert len(short.verifier_scores) == 1
    assert not torch.allclose(full.logits, short.logits)
    with pytest.raises(ValueError, match="num_refinement_steps=4"):
        model(ids, num_refinement_steps=4)


def test_k1_without_memory_is_a_plain_decoder():
    """K = 1 and memory off: no refinement modules exist, the model is a standard pre-norm decoder."""
    model = build(tiny_config())
    assert not any("refinement" in name for name, _ in model.named_parameters())
    assert model(torch.randint(3, 97, (1, 5))).verifier_scores == ()


def test_token_id_out_of_range_is_a_clear_error():
    model = build(tiny_config())
    with pytest.raises(IndexError, match=r"token id 97, outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[5, 97, 3]]))
    with pytest.raises(IndexError, match="token id -1"):
        model(torch.tensor([[5, -1, 3]]))


def warnings_of(call) -> str:
    """What `call` logged through the model's logger (`warning_once` logs each message once per process)."""
    from transformers.testing_utils import CaptureLogger

    from apex_hf.modeling.modeling_apex import logger

    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        call()
    return captured.out


def test_sequence_longer_than_supported_runs_with_a_warning():
    """As in transformers' models: past max_position_embeddings a RoPE that does not extrapolate runs and says so."""
    model = build(tiny_config(max_position_embeddings=16))
    logged = warnings_of(lambda: model(torch.randint(3, 97, (1, 17))))
    assert "Sequence length 17 (cached + new tokens) exceeds max_position_embeddings=16" in logged
    assert warnings_of(lambda: model(torch.randint(3, 97, (1, 16)))) == ""
    positions = warnings_of(lambda: model(torch.randint(3, 97, (1, 3)), position_ids=torch.tensor([[3, 4, 16]])))
    assert "Position 16 in position_ids exceeds max_position_embeddings=16" in positions
    # A RoPE scaling that extrapolates lifts the limit.
    dynamic = build(tiny_config(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    assert warnings_of(lambda: dynamic(torch.randint(3, 97, (1, 40)))) == ""


def test_static_cache_longer_than_supported_warns_before_decoding():
    """A static cache counts its tokens on the device, so the check reads its capacity instead (no sync per step,
    which would break compiled decoding): `generate` sizes it to the positions it will feed."""
    model = build(tiny_config(max_position_embeddings=16, sliding_window=None))
    prompt = torch.randint(3, 97, (1, 5))
    kwargs = dict(do_sample=False, pad_token_id=0, cache_implementation="static")
    # 5 + 12 tokens feed 16 positions (the last new token is not fed back), which the cache is sized to.
    assert warnings_of(lambda: model.generate(prompt, max_new_tokens=12, **kwargs)) == ""
    logged = warnings_of(lambda: model.generate(prompt, max_new_tokens=13, **kwargs))
    assert "A static cache of 17 tokens exceeds max_position_embeddings=16" in logged


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
)
def test_rope_scaling_types_run(rope_parameters):
    model = build(tiny_config("gqa", rope_parameters=dict(rope_parameters, rope_theta=10000.0)))
    assert torch.isfinite(model(torch.randint(3, 97, (1, 9))).logits).all()


def test_expert_capacity_drops_tokens_only_in_training():
    config = tiny_config("gqa", expert_capacity_factor=0.25)
    model = build(config)
    router = model.model.layers[0].mlp.gate
    hidden = torch.randn(16, config.hidden_size)
    model.train()
    _, weights, index = router(hidden)
    capacity = config.expert_capacity(16)
    for expert in range(config.num_experts):
        assert int(((index == expert) & (weights > 0)).sum()) <= capacity
    assert (weights == 0).any()
    model.eval()
    assert (router(hidden)[1] > 0).all()


def test_aux_loss_free_bias_moves_only_in_training_forwards():
    config = tiny_config("gqa")
    model = build(config)
    ids = torch.randint(3, 97, (2, 16))
    routers = [m.mlp.gate for m in model.model.layers]
    with torch.no_grad():
        model(ids)
        model(ids)
    assert all(r.e_score_correction_bias.abs().sum() == 0 for r in routers)
    model.train()
    with torch.no_grad():  # generation inside a trainer (GRPO's rollouts): train mode, no gradients
        model.generate(ids, max_new_tokens=3, do_sample=False)
        model(ids)
    assert all(r.e_score_correction_bias.abs().sum() == 0 and r.expert_load.sum() == 0 for r in routers)
    model(ids)  # accumulates the load of this step
    model(ids)  # applies it before routing
    biases = torch.stack([r.e_score_correction_bias for r in routers])
    assert biases.abs().max() == pytest.approx(config.router_bias_update_rate)
