"""Per-token early exit from the refinement loop (`refinement_exit_threshold`): exact at both ends, the cache stays
correct (cached generation equals recomputation with the same exits), and decoding runs fewer core layers."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from tiny_configs import VARIANTS, tiny_config

from apex_hf import ApexConfig, ApexForCausalLM


NEW_TOKENS = 6


def build(variant, **overrides):
    torch.manual_seed(0)
    if variant in LOOP_VARIANTS:
        variant, overrides = "gqa", {**LOOP_VARIANTS[variant], **overrides}
    config = tiny_config(variant, **overrides)
    config._attn_implementation = "eager"  # attention sinks (family_knobs) need it; one backend for every variant
    config._experts_implementation = "batched_mm"  # per-token expert compute: batch and row alone round alike
    return ApexForCausalLM(config).eval()


def ids(batch=2, length=7, seed=3):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, inputs, **kwargs):
    """Generated tokens and the logits of every step."""
    out = model.generate(
        inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def assert_same_generation(first, second):
    assert torch.equal(first[0], second[0])
    assert (first[1] - second[1]).abs().max() < 1e-4


def mid_threshold(model, inputs) -> float:
    """A threshold that some tokens reach after the first pass and some do not."""
    with torch.no_grad():
        scores = model(inputs).verifier_scores[0]
    return scores.median().item()


# Next to every variant: the verifier without the memory, and the loop state normalised at either place.
VERIFIER_ONLY = dict(memory_injection="none", refinement_verifier=True)
LOOP_VARIANTS = {
    "verifier_only": VERIFIER_ONLY,
    **{f"state_norm_{where}": dict(refinement_state_norm=where) for where in ("every_pass", "before_coda")},
}


@pytest.fixture(params=[*VARIANTS, *LOOP_VARIANTS])
def variant(request):
    return request.param


@torch.no_grad()
def test_exactness_at_both_ends(variant):
    model = build(variant)
    inputs = ids()
    full = model(inputs)
    never = model(inputs, refinement_exit_threshold=1.5)
    assert torch.equal(never.logits, full.logits)
    assert (never.refinement_steps_used == model.config.num_refinement_steps).all()
    always = model(inputs, refinement_exit_threshold=0.0)
    assert torch.equal(always.logits, model(inputs, num_refinement_steps=1).logits)
    assert (always.refinement_steps_used == 1).all()


@torch.no_grad()
def test_tokens_exit_on_their_own_score():
    model = build("gqa")
    inputs = ids()
    threshold = mid_threshold(model, inputs)
    out = model(inputs, refinement_exit_threshold=threshold)
    first_scores = model(inputs).verifier_scores[0]
    assert torch.equal(out.refinement_steps_used == 1, first_scores >= threshold)
    assert {1, 3} <= set(out.refinement_steps_used.unique().tolist())
    # A token that stays sees the exited ones through the keys and values of their last pass, so its logits differ
    # from the fixed-K run; a token that exits keeps its first-pass state.
    assert not torch.equal(out.logits, model(inputs).logits)


def test_cached_generation_equals_recomputation_with_the_same_exits(variant):
    model = build(variant)
    batch = ids(batch=2, length=7)
    batch[0, :3] = 0  # left padding
    mask = (torch.arange(7) >= 3).long().unsqueeze(0).repeat(2, 1)
    mask[1] = 1
    threshold = mid_threshold(model, batch)
    cached = greedy(model, batch, attention_mask=mask, refinement_exit_threshold=threshold)
    recomputed = greedy(model, batch, attention_mask=mask, refinement_exit_threshold=threshold, use_cache=False)
    assert_same_generation(cached, recomputed)


def test_decoding_runs_fewer_core_layers_when_tokens_exit():
    model = build("gqa")
    core = model.model.layers[model.config.num_prelude_layers]
    calls = []
    core.register_forward_hook(lambda *_: calls.append(1))
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    model.generate(ids(batch=1), **settings)
    full = len(calls)
    calls.clear()
    model.generate(ids(batch=1), refinement_exit_threshold=0.0, **settings)
    assert full == 3 * NEW_TOKENS and len(calls) == NEW_TOKENS  # one pass per step instead of three


@torch.no_grad()
def test_skipped_passes_cache_the_latest_computed_pass():
    model = build("gqa")
    cache = model(ids(batch=1), use_cache=True, refinement_exit_threshold=0.0).past_key_values
    config = model.config
    for core_index in range(config.num_core_layers):
        first = cache.layers[config.unrolled_core_index(0, core_index)]
        for step in (1, 2):
            skipped = cache.layers[config.unrolled_core_index(step, core_index)]
            assert torch.equal(skipped.keys, first.keys) and torch.equal(skipped.values, first.values)


def test_single_row_decoding_with_exits_equals_recomputation():
    """At batch 1 every step where the token exits skips the remaining passes and fills their cache slots."""
    model = build("gqa")
    inputs = ids(batch=1, length=9, seed=5)
    threshold = mid_threshold(model, inputs)
    cached = greedy(model, inputs, refinement_exit_threshold=threshold)
    recomputed = greedy(model, inputs, refinement_exit_threshold=threshold, use_cache=False)
    assert_same_generation(cached, recomputed)
    with torch.no_grad():
        used = model(cached[0], refinement_exit_threshold=threshold).refinement_steps_used
    assert len(set(used[0, inputs.shape[1] :].tolist())) > 1  # the decoded tokens did not all exit alike


def test_exits_are_off_in_training():
    model = build("gqa").train()
    out = model(ids(), labels=ids(), refinement_exit_threshold=0.0)
    assert (out.refinement_steps_used == 3).all()


def test_threshold_checks():
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="refinement_exit_threshold"):
        ApexConfig(num_refinement_steps=2, refinement_exit_threshold=0.5)  # no verifier without memory
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="refinement_exit_threshold"):
        ApexConfig(num_refinement_steps=2, memory_injection="gated_add", refinement_exit_threshold=-0.1)
    plain = build("gqa", memory_injection="none")
    with pytest.raises(ValueError, match="needs the verifier"):
        plain(ids(), refinement_exit_threshold=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        build("gqa")(ids(), refinement_exit_threshold=-1.0)


def test_the_verifier_works_without_the_memory():
    model = build("verifier_only").train()
    assert not hasattr(model.model.refinement, "memory_gate")
    out = model(ids(), labels=ids())
    assert len(out.verifier_scores) == 3 and out.memory_states == ()
    out.loss.backward()
    assert model.model.refinement.verifier.weight.grad.abs().sum() > 0  # the verifier loss trains it
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="refinement_verifier"):
        ApexConfig(num_refinement_steps=2, memory_injection="gated_add", refinement_verifier=False)
