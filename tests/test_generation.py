"""Generation: KV cache equals recomputation, left padding, static cache, test-time refinement steps."""

import pytest
import torch
from tiny_configs import VARIANTS, tiny_config

from apex_hf import ApexForCausalLM


NEW_TOKENS = 8


def build(variant, attn="sdpa"):
    torch.manual_seed(0)
    config = tiny_config(variant)
    config._attn_implementation = "eager" if config.attention_sinks else attn  # SDPA cannot express sinks
    # Per-token expert compute so batched and single-row runs round identically.
    config._experts_implementation = "batched_mm"
    return ApexForCausalLM(config).eval()


def greedy(model, ids, mask=None, **kwargs):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores, dim=1)


@pytest.fixture(params=list(VARIANTS))
def model(request):
    return build(request.param)


def prompt(length=6, batch=1, seed=3):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_cached_generation_equals_recomputing_the_prefix(model):
    ids = prompt(batch=2)
    cached_tokens, cached_scores = greedy(model, ids)
    full_tokens, full_scores = greedy(model, ids, use_cache=False)
    assert torch.equal(cached_tokens, full_tokens)
    assert (cached_scores - full_scores).abs().max() < 1e-4


def test_left_padded_batch_equals_each_row_alone(model):
    short, long = prompt(4, seed=4), prompt(7, seed=5)
    batch = torch.zeros(2, 7, dtype=torch.long)
    batch[0, 3:], batch[1] = short[0], long[0]
    mask = (batch != 0).long()
    mask[1] = 1
    batch_tokens, batch_scores = greedy(model, batch, mask)
    for row, single in enumerate((short, long)):
        tokens, scores = greedy(model, single)
        assert torch.equal(batch_tokens[row], tokens[0])
        assert (batch_scores[row] - scores[0]).abs().max() < 1e-4


def test_static_cache_equals_dynamic_cache(model):
    ids = prompt(batch=2)
    dynamic_tokens, dynamic_scores = greedy(model, ids)
    static_tokens, static_scores = greedy(model, ids, cache_implementation="static")
    assert torch.equal(dynamic_tokens, static_tokens)
    assert (dynamic_scores - static_scores).abs().max() < 1e-4


def test_fewer_refinement_steps_at_inference(model):
    ids = prompt(batch=2)
    _, full_scores = greedy(model, ids)
    short_tokens, short_scores = greedy(model, ids, num_refinement_steps=1)
    recomputed_tokens, _ = greedy(model, ids, num_refinement_steps=1, use_cache=False)
    assert torch.equal(short_tokens, recomputed_tokens)  # the cache stays consistent with fewer passes
    assert not torch.allclose(full_scores, short_scores)


def test_raising_refinement_steps_up_to_the_cache_maximum():
    torch.manual_seed(0)
    model = ApexForCausalLM(tiny_config("gqa", num_refinement_steps=2, max_refinement_steps=4)).eval()
    ids = prompt(batch=1)
    tokens, _ = greedy(model, ids, num_refinement_steps=4)
    recomputed, _ = greedy(model, ids, num_refinement_steps=4, use_cache=False)
    assert torch.equal(tokens, recomputed)
    with pytest.raises(ValueError, match="max_refinement_steps"):
        greedy(model, ids, num_refinement_steps=5)


def test_logits_to_keep(model):
    ids = prompt(batch=2)
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    assert torch.allclose(full[:, -1:], last, atol=1e-6)


def test_the_cache_is_taken_under_both_names_and_returned_under_the_installed_ones():
    """transformers 5.25 passes the cache as `cache=`, earlier versions as `past_key_values=`: both must reach the
    layers (a cache that is silently dropped makes every decoding step run without its past)."""
    from transformers.cache_utils import DynamicCache

    from apex_hf.modeling.modeling_apex import CACHE_NAME

    model = build("gqa")
    ids = prompt(8)
    full = model(ids).logits[:, -1]
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=model.config)
        prefix = model(ids[:, :-1], use_cache=True, **{name: cache})
        assert getattr(prefix, CACHE_NAME) is cache and cache.get_seq_length() == 7
        step = model(ids[:, -1:], **{name: cache}).logits[:, -1]
        assert (step - full).abs().max() < 1e-5, name
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


@pytest.mark.parametrize("keyword", ["cache_params", "past_key_value", "num_refinement_step", "attention_masks"])
def test_an_unknown_keyword_is_an_error_not_silently_ignored(keyword):
    model = build("gqa")
    for forward in (model, model.model):
        with pytest.raises(TypeError, match=f"unexpected keyword argument.*'{keyword}'"):
            forward(prompt(), **{keyword: None})
