"""GPU correctness of the fast paths (run on a CUDA machine; skipped elsewhere): bf16 vs fp32, experts kernels vs eager
experts, sdpa / flex vs eager attention, the chunked training loss, static-cache generation, the graphed decoders, a
few bf16 training steps."""

import pytest
import torch
from test_experts import PATHS, assert_close_as_reference, check_against_eager
from test_training_loss import whole_logits_loss
from tiny_configs import VARIANTS, tiny_config

from apex_hf import ApexForCausalLM
from apex_hf.decoding import GreedyDecoder, MultiTokenSpeculativeDecoder, SelfSpeculativeDecoder
from apex_hf.presets import LOOP_RECIPE, get_preset


pytestmark = pytest.mark.gpu


# GPU kernels (flex attention) need head sizes of at least 16.
GPU_SIZES = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64)
MLA_GPU_SIZES = dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def build(variant, dtype=torch.float32, attn="eager", experts="eager", decisive_routing=False, **overrides):
    torch.manual_seed(0)
    config = tiny_config(variant, **GPU_SIZES, **(MLA_GPU_SIZES if variant == "mla" else {}), **overrides)
    if attn == "sdpa" and config.attention_sinks:
        attn = "eager"  # SDPA cannot express attention sinks (and is refused); the eager path is the reference
    config._attn_implementation, config._experts_implementation = attn, experts
    model = ApexForCausalLM(config)
    if decisive_routing:
        # At random init all experts score alike, so bf16 rounding flips top-k choices and the comparison would
        # measure routing luck, not numerics. Sharper router logits make the choice robust.
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.data *= 50
    return model.to("cuda", dtype).eval()


def ids(batch=2, length=33):
    return torch.randint(3, 97, (batch, length), device="cuda", generator=torch.Generator("cuda").manual_seed(0))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("experts", ["apex_grouped_mm", "grouped_mm", "batched_mm"])
def test_expert_kernels_match_eager_forward_and_gradients(variant, experts):
    tokens = ids()
    reference, fast = build(variant).train(), build(variant, experts=experts).train()
    # A training forward with labels returns its loss without logits (the chunked loss); a forward without gradients
    # (which leaves the routers' balancing state alone) gives the logits.
    out_ref, out_fast = reference(tokens, labels=tokens), fast(tokens, labels=tokens)
    assert (out_ref.loss - out_fast.loss).abs() < 1e-4
    out_ref.loss.backward()
    out_fast.loss.backward()
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters()):
        assert torch.allclose(p_ref.grad, p_fast.grad, atol=1e-5, rtol=1e-3), name
    with torch.no_grad():
        assert (reference(tokens).logits - fast(tokens).logits).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["gqa", "family_knobs"])
@pytest.mark.parametrize("num_tokens", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_apex_grouped_mm_experts_paths_match_eager(variant, num_tokens, dtype, compiled, monkeypatch):
    """Each path of Apex's experts (gathered, every expert, grouped GEMMs) on the GPU's kernels, as is
    and under torch.compile; the routing is fixed, so bf16 rounding cannot flip an expert choice."""
    check_against_eager(variant, num_tokens, monkeypatch, "cuda", dtype, compiled)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_attention_backends_match_eager(variant, attn):
    if attn == "sdpa" and tiny_config(variant).attention_sinks:
        pytest.skip("SDPA cannot express attention sinks and is refused")
    tokens = ids()
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    with torch.no_grad():
        reference = build(variant)(tokens, attention_mask=mask).logits
        fast = build(variant, attn=attn)(tokens, attention_mask=mask).logits
    assert (reference - fast)[mask.bool()].abs().max() < 1e-4


# The MLA variant routes with sigmoid scores, which saturate into exact ties once the router is sharp, so any top-k
# choice there is rounding luck in either precision; its bf16 numerics are checked with dense layers instead.
@pytest.mark.parametrize("variant,overrides", [("gqa", {}), ("mla", {"num_experts": 0})])
def test_bf16_is_close_to_fp32(variant, overrides):
    tokens = ids()
    with torch.no_grad():
        kwargs = dict(experts="apex_grouped_mm", attn="sdpa", decisive_routing=True, **overrides)
        fp32 = build(variant, **kwargs)(tokens).logits
        bf16 = build(variant, torch.bfloat16, **kwargs)(tokens).logits
    assert (fp32 - bf16.float()).abs().max() / fp32.abs().max() < 0.05


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_cache_generation_matches_dynamic(variant):
    # fp32: greedy tokens of a random model sit on near-ties that bf16 rounding of two different kernels can flip.
    model = build(variant, attn="sdpa", experts="batched_mm")
    prompt = ids(length=9)
    dynamic = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    static = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_bf16_training_steps_stay_finite():
    model = build("gqa", torch.bfloat16, attn="sdpa", experts="apex_grouped_mm").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = ids(batch=4, length=64)
    first = None
    for _ in range(30):
        loss = model(tokens, labels=tokens).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < first


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_precision_training_under_autocast(variant):
    """fp32 weights under bf16 autocast, as Trainer/Accelerate run `bf16=True` (the verifier's BCE must opt out)."""
    model = build(variant, torch.float32, attn="sdpa", experts="apex_grouped_mm").train()
    tokens = ids(batch=2, length=32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.aux_losses["verifier_loss"].dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_chunked_training_loss_matches_whole_logits_in_bf16_in_a_quarter_of_the_memory():
    """At a 32k vocabulary and 16k tokens: the loss and both gradients as transformers' loss on the whole logits (bf16
    weights and activations, fp32 cross-entropy in both; the head's gradient sums its chunks in bf16), and the loss's
    peak memory at most a quarter of it."""
    from apex_hf.modeling.modeling_apex import chunked_causal_lm_loss

    torch.manual_seed(0)
    vocab = 32000
    head = torch.nn.Linear(512, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(4, 4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (4, 4096), device="cuda")
    labels[:, :100] = -100
    results = {}
    for name, loss_function in (("chunked", chunked_causal_lm_loss), ("whole", whole_logits_loss)):
        head.zero_grad()
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = loss_function(head, hidden, labels, vocab)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - start
        results[name] = (loss.detach(), hidden.grad.clone(), head.weight.grad.clone(), peak)
    (loss, hidden_grad, weight_grad, peak), (ref_loss, ref_hidden_grad, ref_weight_grad, ref_peak) = results.values()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for gradient, reference in ((hidden_grad, ref_hidden_grad), (weight_grad, ref_weight_grad)):
        assert (gradient.float() - reference.float()).norm() <= 1e-2 * reference.float().norm()
    assert peak <= ref_peak / 4, (peak, ref_peak)


@pytest.mark.parametrize("experts", ["apex_grouped_mm", "grouped_mm", "batched_mm"])
def test_expert_kernels_under_autocast_compute_in_bf16(experts):
    """transformers' expert kernels are no autocast ops: fp32 weights under bf16 autocast must give exactly the
    output of bf16 expert weights (not an fp32 GEMM), and the gradients must reach the fp32 weights."""
    model = build("gqa", torch.float32, attn="sdpa", experts=experts).train()
    reference = build("gqa", torch.float32, attn="sdpa", experts=experts).train()
    for name, module in reference.named_modules():
        if name.endswith("mlp.experts"):
            module.to(torch.bfloat16)
    tokens = ids(batch=2, length=32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, expected = model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    logits.float().sum().backward()
    experts_weight = next(p for n, p in model.named_parameters() if n.endswith("mlp.experts.gate_up_proj"))
    assert experts_weight.grad.dtype == torch.float32 and experts_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_regionally_compiled_layers_match_eager_forward_and_gradients(dtype):
    """The training fast path (`torch_compile: true` in the pre-training recipe compiles each decoder layer), with
    enough tokens (4 x 80) for the experts' grouped GEMMs. In bf16 it must be as close to fp32 as eager bf16 is."""
    tokens = ids(batch=4, length=80)
    # In bf16 the verifier's targets (argmax agreements) and the routers' top-k choices flip on rounding, which changes
    # losses and gradients wholesale, not by the kernels' numerics. So fp32 checks the whole model; bf16 the loop
    # without memory and verifier, with dense layers (the compiled experts in bf16 are checked with fixed routing, in
    # test_apex_grouped_mm_experts_paths_match_eager).
    overrides = {} if dtype == torch.float32 else {"memory_injection": "none", "num_experts": 0}
    kwargs = dict(attn="sdpa", experts="apex_grouped_mm", decisive_routing=True, **overrides)

    def loss_and_gradients(model):  # a training forward with labels returns no logits (the chunked loss)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        return {"loss": loss.detach(), **{name: p.grad for name, p in model.named_parameters()}}

    compiled = build("gqa", dtype, **kwargs).train()
    for layer in compiled.model.layers:
        layer.compile()
    exact = loss_and_gradients(build("gqa", torch.float32, **kwargs).train())
    fast = loss_and_gradients(compiled)
    if dtype == torch.float32:
        assert_close_as_reference(exact, fast, tolerance=1e-4)
    else:
        assert_close_as_reference(exact, fast, loss_and_gradients(build("gqa", dtype, **kwargs).train()))


@pytest.mark.parametrize("batch", [1, 2])  # compiled decode steps gather (2 pairs, 4 experts), or run every expert
def test_static_cache_compiled_generation_matches_eager(batch):
    """transformers compiles the forward for static-cache generation on a GPU; the tokens must not change."""
    model = build("gqa", attn="sdpa", experts="apex_grouped_mm")
    prompt = ids(batch=batch, length=9)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    eager = model.generate(prompt, **kwargs)
    compiled = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("batch", [1, 2])
def test_graphed_greedy_decoding_matches_generate(batch):
    """The decode step compiled and captured as one CUDA graph: the tokens of eager `generate`, and the graph is reused
    by the next call."""
    model = build("gqa", attn="sdpa", experts="apex_grouped_mm")
    prompt = ids(batch=batch, length=9)
    expected = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    decoder = GreedyDecoder(model, max_length=40, batch_size=batch)
    for _ in range(2):
        assert torch.equal(decoder.generate(prompt, max_new_tokens=24, ignore_eos=True), expected)
        assert decoder._run.graph is not None


@pytest.mark.parametrize("windows", [{}, dict(sliding_window=4, full_attention_interval=2)], ids=["full", "sliding"])
@pytest.mark.parametrize("speculation", ["fewer passes", "multi-token prediction"])
def test_graphed_speculative_decoding_matches_generate(speculation, windows):
    torch.manual_seed(0)
    config = tiny_config(
        num_refinement_steps=3,
        num_experts=4,
        num_experts_per_tok=2,
        num_mtp_layers=1,
        **LOOP_RECIPE,
        **GPU_SIZES,
        **windows,
    )
    model = ApexForCausalLM._from_config(config, attn_implementation="sdpa").to("cuda").eval()
    prompt = ids(batch=1, length=9)
    expected = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    if speculation == "fewer passes":
        decoder = SelfSpeculativeDecoder(model, max_length=40, draft_tokens=3)
    else:
        decoder = MultiTokenSpeculativeDecoder(model, max_length=40)
    for _ in range(2):
        assert torch.equal(decoder.generate(prompt, max_new_tokens=24, ignore_eos=True), expected)
        assert decoder._run.graph is not None and decoder.stats.rounds > 0


def test_apex_experts_are_the_gpu_default_and_generate_keeps_them():
    """transformers' `generate` swaps its grouped_mm for batched_mm while decoding; Apex's own experts stay."""
    config = tiny_config("gqa", **GPU_SIZES)
    model = ApexForCausalLM._from_config(config, attn_implementation="sdpa").to("cuda").eval()
    seen = []
    model.model.layers[0].mlp.experts.register_forward_hook(
        lambda module, args, output: seen.append(module.config._experts_implementation)
    )
    model.generate(ids(length=9), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert seen == ["apex_grouped_mm"] * 4


def test_benchmark_preset_trains_200_bf16_steps_without_nan():
    """bench-moe (2.5B parameters) at a normal learning rate: fp32 weights under bf16 autocast, AdamW 3e-4 with
    gradient clipping, 200 steps on one repeated batch, so the loss must also fall."""
    config = get_preset("bench-moe")
    model = ApexForCausalLM._from_config(config, attn_implementation="sdpa", experts_implementation="apex_grouped_mm")
    model = model.to("cuda").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    tokens = torch.randint(
        0, config.vocab_size, (2, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    losses = []
    for _ in range(200):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens, output_router_logits=True).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        assert torch.isfinite(loss) and torch.isfinite(grad_norm), f"step {len(losses)}: loss {loss}, grad {grad_norm}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
