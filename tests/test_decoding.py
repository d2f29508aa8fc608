"""The device-side decoding loops (`apex_hf.decoding`) against `generate`: same tokens, same stopping and padding, the
speculative rounds' bookkeeping, and the refusals. On the CPU the steps run without CUDA graphs, uncompiled (and once
compiled, counting the graphs); `test_gpu.py` runs them compiled and captured."""

import pytest
import torch
from tiny_configs import VARIANTS, tiny_config

from apex_hf import ApexForCausalLM
from apex_hf.decoding import GreedyDecoder, MultiTokenSpeculativeDecoder, SelfSpeculativeDecoder
from apex_hf.presets import LOOP_RECIPE


NEW_TOKENS = 20


def build(variant=None, **overrides):
    torch.manual_seed(0)
    config = tiny_config(variant, **overrides)
    config._attn_implementation = "eager" if config.attention_sinks else "sdpa"
    config._experts_implementation = "batched_mm"  # per-token expert compute: batched and single rows round alike
    return ApexForCausalLM(config).eval()


def looped(**overrides):
    """K = 3 with the loop recipe."""
    return build(num_refinement_steps=3, num_experts=4, num_experts_per_tok=2, **LOOP_RECIPE, **overrides)


def prompt(batch=2, length=7):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(1))


def reference(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_decoder_matches_generate_and_is_reused(variant):
    model, ids = build(variant), prompt()
    decoder = GreedyDecoder(model, max_length=40, batch_size=2)
    expected = reference(model, ids, eos_token_id=None)
    for _ in range(2):  # the second call reuses the decoder's cache and buffers
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True), expected)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "mistral"])
def test_greedy_decoder_decodes_transformers_own_models(family):
    """`scripts/benchmark.py` decodes transformers' Llama and Qwen3-MoE with it too. Their configs have no
    `layer_types` (Mistral's has a `sliding_window` instead), which the decoder's cache must do without."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16) if family == "qwen3_moe" else {}
    extra |= dict(sliding_window=4) if family == "mistral" else {}
    config = AutoConfig.for_model(family, vocab_size=97, intermediate_size=32, **shape, **extra)
    assert getattr(config, "layer_types", None) is None
    torch.manual_seed(0)
    model, ids = AutoModelForCausalLM.from_config(config).eval(), prompt()
    decoder = GreedyDecoder(model, max_length=40, batch_size=2)
    expected = reference(model, ids, eos_token_id=None)
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True), expected)


def test_greedy_decoder_stops_and_pads_as_generate():
    model, ids = build("gqa"), prompt()
    free_running = reference(model, ids, eos_token_id=None)
    end = int(free_running[0, ids.shape[1] + 5])  # row 0 ends at its sixth new token
    expected = reference(model, ids, eos_token_id=end)
    decoder = GreedyDecoder(model, max_length=40, batch_size=2, stop_check_every=3)
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=end, pad_token_id=0), expected)
    one_row = reference(model, ids[:1], eos_token_id=end)
    assert one_row.shape[1] == ids.shape[1] + 6  # generate stops there; so does the decoder
    single = GreedyDecoder(model, max_length=40)
    assert torch.equal(single.generate(ids[:1], max_new_tokens=NEW_TOKENS, eos_token_id=end), one_row)


@pytest.mark.parametrize(("draft_passes", "draft_tokens"), [(1, 1), (1, 4), (2, 3)])
def test_self_speculative_decoder_matches_generate(draft_passes, draft_tokens):
    model, ids = looped(), prompt(batch=1)
    expected = reference(model, ids, eos_token_id=None)
    decoder = SelfSpeculativeDecoder(model, max_length=40, draft_passes=draft_passes, draft_tokens=draft_tokens)
    for _ in range(2):
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True), expected)
        stats = decoder.stats
        assert stats.drafted == stats.rounds * draft_tokens and 0 <= stats.accepted <= stats.drafted
        assert stats.rounds + stats.accepted >= NEW_TOKENS - 1  # each round adds its accepted drafts and one token


def test_self_speculative_decoder_stops_at_the_end_token():
    model, ids = looped(), prompt(batch=1)
    end = int(reference(model, ids, eos_token_id=None)[0, ids.shape[1] + 8])
    expected = reference(model, ids, eos_token_id=end)
    decoder = SelfSpeculativeDecoder(model, max_length=40, draft_tokens=3)
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=end), expected)


def test_drafts_of_a_model_whose_later_passes_change_nothing_are_all_accepted():
    """With the pass gates at zero, every pass after the first returns its input: the K = 1 draft is the model, every
    draft is accepted and each round moves `draft_tokens + 1` tokens."""
    model = looped(refinement_pass_gate=True)
    model.model.pass_gates.data.zero_()
    ids = prompt(batch=1)
    decoder = SelfSpeculativeDecoder(model, max_length=40, draft_tokens=3)
    assert torch.equal(
        decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True), reference(model, ids, eos_token_id=None)
    )
    rounds = -(-(NEW_TOKENS - 1) // 4)  # the prefill gives the first token, each round four
    assert decoder.stats.rounds == rounds and decoder.stats.accepted == decoder.stats.drafted
    assert decoder.stats.tokens_per_round == 4


MTP_MODELS = {
    "K=1": (lambda: build(num_mtp_layers=1), {}),
    "K=3, two depths": (lambda: looped(num_mtp_layers=2), {}),
    "K=3, the first of two depths": (lambda: looped(num_mtp_layers=2), {"draft_tokens": 1}),
    "K=1, three depths": (lambda: build(num_mtp_layers=3), {}),
}


def rounds_by_guesses(model, sequence: torch.Tensor, prompt_length: int, new_tokens: int, depths: int):
    """The rounds and accepted drafts of a multi-token speculative decode of `new_tokens` after the prompt, from the
    MTP depths read over the whole sequence each round, without a cache. A round's drafts are the depths' guesses at
    its last read position: depth d reads the tokens d after each position, the previous depths' drafts past the
    end. `sequence` runs `depths` tokens past the decode, for the last round's drafts to be compared."""
    hidden = model.model(sequence).last_hidden_state
    length, end, rounds, accepted = prompt_length + 1, prompt_length + new_tokens, 0, 0
    while length < end:
        last = length - 2  # the model has read positions 0..last
        positions = torch.arange(last + 1).unsqueeze(0)
        states, drafts = hidden[:, : last + 1], []
        for depth in range(1, depths + 1):
            ahead = torch.cat([sequence[:, depth : last + 2], torch.tensor([drafts], dtype=torch.long)], dim=1)
            states, guesses = model.predict_ahead(depth, states, ahead, positions)
            drafts.append(int(guesses[0, last]))
        right = torch.tensor(drafts) == sequence[0, length : length + depths]
        taken = int(right.long().cumprod(0).sum())
        rounds, accepted, length = rounds + 1, accepted + taken, length + taken + 1
    return rounds, accepted


@pytest.mark.parametrize(("make", "options"), MTP_MODELS.values(), ids=MTP_MODELS)
def test_multi_token_speculative_decoder_matches_generate_and_drafts_the_mtp_guesses(make, options):
    """The tokens of `generate`, and the rounds that the MTP depths' guesses over the whole sequence predict: their
    caches, rolled back after each rejected draft, read as the whole sequence does, and each depth reads the drafts of
    the depths before it."""
    model, ids = make(), prompt(batch=1)
    decoder = MultiTokenSpeculativeDecoder(model, max_length=40, **options)
    depths = decoder.draft_tokens
    longer = model.generate(ids, max_new_tokens=NEW_TOKENS + depths, do_sample=False, eos_token_id=None)
    for _ in range(2):
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True), longer[:, :-depths])
        stats = decoder.stats
        assert (stats.rounds, stats.accepted) == rounds_by_guesses(model, longer, ids.shape[1], NEW_TOKENS, depths)
        assert stats.drafted == stats.rounds * depths


@pytest.mark.parametrize("depths", [1, 2])
def test_multi_token_drafts_of_a_model_that_learned_a_cycle_are_accepted(depths):
    """Trained for a moment on a repeating sequence, the MTP depths guess the tokens ahead: every draft is accepted,
    `depths + 1` tokens a round, and the output is still `generate`'s."""
    model = build(num_mtp_layers=depths).train()
    cycle = torch.tensor([[5, 17, 42, 8, 63, 29, 71]]).repeat(1, 6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(cycle, labels=cycle).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ids = cycle[:, :9]
    decoder = MultiTokenSpeculativeDecoder(model, max_length=40)
    out = decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert torch.equal(out, reference(model, ids, eos_token_id=None))
    assert torch.equal(out[0, 9:], cycle[0, 9 : 9 + NEW_TOKENS])  # it learned the cycle
    assert decoder.stats.acceptance == 1.0 and decoder.stats.rounds == -(-(NEW_TOKENS - 1) // (depths + 1))


def test_multi_token_speculative_decoder_stops_at_the_end_token():
    model, ids = looped(num_mtp_layers=1), prompt(batch=1)
    end = int(reference(model, ids, eos_token_id=None)[0, ids.shape[1] + 8])
    expected = reference(model, ids, eos_token_id=end)
    decoder = MultiTokenSpeculativeDecoder(model, max_length=40)
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=end), expected)


@pytest.mark.parametrize("variant", [None, "gqa"], ids=["full attention", "sliding windows"])
def test_assisted_generation_with_a_fewer_passes_draft_is_greedy_decoding(variant):
    """transformers' assisted generation, drafting with the same model at K = 1: plain greedy decoding's tokens."""
    model, ids = build(variant, num_refinement_steps=3, **LOOP_RECIPE), prompt(batch=1)
    draft = model.fewer_passes_draft(1)
    expected = reference(model, ids, eos_token_id=None)
    assert torch.equal(reference(model, ids, eos_token_id=None, assistant_model=draft), expected)


def test_fewer_passes_draft_shares_every_weight_and_leaves_the_model_alone():
    model, ids = looped(), prompt(batch=1)
    full = model(ids).logits
    draft = model.fewer_passes_draft(2)
    assert draft.config.num_refinement_steps == 2 and model.config.num_refinement_steps == 3
    shared = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert {name: p.data_ptr() for name, p in draft.named_parameters()} == shared
    assert torch.equal(draft(ids).logits, model(ids, num_refinement_steps=2).logits)
    assert torch.equal(draft(ids, num_refinement_steps=1).logits, model(ids, num_refinement_steps=1).logits)
    draft.generation_config.num_assistant_tokens = 9  # what assisted generation tunes on its draft
    draft.register_forward_hook(lambda *args: None)
    assert model.generation_config.num_assistant_tokens != 9 and not model._forward_hooks
    assert torch.equal(model(ids).logits, full)


def test_fewer_passes_draft_refuses_a_transformers_whose_crop_fails_on_empty_layers(monkeypatch):
    """transformers before 5.22 slices the missing tensors of a cache layer that holds nothing when assisted generation
    crops it, and a draft at fewer passes leaves the later passes' layers empty."""
    from transformers.cache_utils import DynamicLayer

    def crop_as_before_5_22(self, tokens_to_remove):
        self.keys = self.keys[..., :tokens_to_remove, :]

    monkeypatch.setattr(DynamicLayer, "crop", crop_as_before_5_22)
    with pytest.raises(RuntimeError, match="transformers >= 5.22"):
        looped().fewer_passes_draft(1)


@pytest.mark.parametrize("passes", [0, 3, 1.0])
def test_fewer_passes_draft_refuses_passes_it_cannot_draft_with(passes):
    with pytest.raises(ValueError, match=f"num_refinement_steps={passes!r}.*1..2"):
        looped().fewer_passes_draft(passes)


SLIDING_WINDOW_SPECULATION = {
    "fewer passes": (
        lambda: build("gqa", num_refinement_steps=3, **LOOP_RECIPE),
        lambda model: SelfSpeculativeDecoder(model, max_length=40, draft_tokens=4),
    ),
    "multi-token prediction": (
        lambda: build("gqa", num_mtp_layers=2),
        lambda model: MultiTokenSpeculativeDecoder(model, max_length=40),
    ),
}


@pytest.mark.parametrize("speculation", list(SLIDING_WINDOW_SPECULATION))
def test_speculative_decoders_keep_what_sliding_window_layers_roll_back_to(speculation):
    """Sliding-window layers (a window of 3, shorter than a round's drafts and the sequence): a rejected round must not
    overwrite cache entries the next round reads, as a static cache's ring of `sliding_window` entries would. Same
    tokens as `generate`, whose cache keeps each sliding layer's window, with drafts rejected along the way."""
    make_model, make_decoder = SLIDING_WINDOW_SPECULATION[speculation]
    model, ids = make_model(), prompt(batch=1)
    assert "sliding_attention" in model.config.layer_types and model.config.sliding_window < NEW_TOKENS
    decoder = make_decoder(model)
    expected = reference(model, ids, eos_token_id=None)
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True), expected)
    assert decoder.stats.accepted < decoder.stats.drafted  # rolled back at least once


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GreedyDecoder(looped(refinement_exit_threshold=0.9), max_length=40), "refinement_exit_threshold"),
        (lambda: GreedyDecoder(looped(), max_length=40, cuda_graph=True), "cuda_graph=True needs"),
        (lambda: GreedyDecoder(looped(), max_length=0), "max_length=0"),
        (lambda: SelfSpeculativeDecoder(looped(), max_length=40, draft_passes=3), "draft_passes=3"),
        (lambda: SelfSpeculativeDecoder(build(), max_length=40), "draft_passes=1"),
        (lambda: SelfSpeculativeDecoder(looped(), max_length=40, draft_tokens=0), "draft_tokens=0"),
        (lambda: MultiTokenSpeculativeDecoder(looped(), max_length=40), "num_mtp_layers=0"),
        (lambda: MultiTokenSpeculativeDecoder(looped(num_mtp_layers=2), max_length=40, draft_tokens=3), "1..2"),
    ],
)
def test_decoders_refuse_what_they_cannot_do(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("depths", "depth"), [(2, 3), (2, 0), (0, 1)])
def test_predict_ahead_refuses_a_depth_the_model_does_not_have(depths, depth):
    model = build(num_mtp_layers=depths)
    states, ids = torch.zeros(1, 2, model.config.hidden_size), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=f"depth={depth} is invalid: this model has num_mtp_layers={depths}"):
        model.predict_ahead(depth, states, ids, torch.arange(2).unsqueeze(0))


@pytest.mark.parametrize(
    ("ids", "max_new_tokens", "message"),
    [
        (prompt(batch=1), NEW_TOKENS, "built for batch_size=2"),
        (prompt(length=30), NEW_TOKENS, "does not fit this decoder's max_length=40"),
        (prompt(), 0, "max_new_tokens=0"),
        (prompt().float(), NEW_TOKENS, "token ids"),
    ],
)
def test_greedy_decoder_refuses_calls_it_was_not_built_for(ids, max_new_tokens, message):
    decoder = GreedyDecoder(build(), max_length=40, batch_size=2)
    with pytest.raises(ValueError, match=message):
        decoder.generate(ids, max_new_tokens=max_new_tokens)


def test_greedy_decoder_takes_a_tokenizer_s_mask_and_refuses_padding():
    model, ids = build(), prompt()
    decoder = GreedyDecoder(model, max_length=40, batch_size=2)
    expected = reference(model, ids, eos_token_id=None)
    mask = torch.ones_like(ids)
    assert torch.equal(decoder.generate(ids, mask, max_new_tokens=NEW_TOKENS, ignore_eos=True), expected)
    mask[1, 0] = 0
    with pytest.raises(ValueError, match="without padding"):
        decoder.generate(ids, mask, max_new_tokens=NEW_TOKENS)


def test_compiled_steps_match_generate_in_one_graph_each_without_recompiling():
    """The steps as a GPU runs them, compiled (`torch.compile`; the CUDA-graph capture needs a GPU, `test_gpu.py`):
    the same tokens as `generate`; each step function is one graph, without graph breaks (the greedy step; the
    self-speculative round's catch-up, draft and verify; the multi-token round), and a second call compiles nothing,
    so a captured graph replays the code every later step would run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, ids = looped(num_mtp_layers=2), prompt(batch=1)
    expected = reference(model, ids, eos_token_id=None)
    greedy = GreedyDecoder(model, max_length=40, compile=True)
    speculative = SelfSpeculativeDecoder(model, max_length=40, draft_tokens=3, compile=True)
    multi_token = MultiTokenSpeculativeDecoder(model, max_length=40, compile=True)  # two depths
    decoders = (greedy, speculative, multi_token)
    for decoder, graphs in zip(decoders, (1, 1 + 3, 1 + 3 + 1)):
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True), expected)
        assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    for decoder in decoders:
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True), expected)
    assert counters["stats"]["unique_graphs"] == 5


def test_compiled_step_on_sliding_window_layers_compiles_once():
    """Sliding-window layers (a window of 3, shorter than the output): the compiled greedy step is one graph that no
    later step recompiles, so a captured graph replays what every later step would run. transformers' sliding static
    layer counts its fill on the host, which recompiles the step as the count changes (and a captured graph would
    replay one count); the decoders' caches keep every position instead."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, ids = build("gqa"), prompt(batch=1)
    assert "sliding_attention" in model.config.layer_types and model.config.sliding_window < NEW_TOKENS
    decoder = GreedyDecoder(model, max_length=40, compile=True)
    for _ in range(2):
        out = decoder.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert torch.equal(out, reference(model, ids, eos_token_id=None))
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
