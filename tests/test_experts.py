"""Apex's own experts implementation, "apex_grouped_mm", against the eager loop, forward and gradients, on each of
its paths: a gathered reduction for fewer (token, expert) pairs than experts under torch.compile, every expert on
every token for decode-sized batches, and tokens permuted into grouped GEMMs."""

import copy

import pytest
import torch
from tiny_configs import tiny_config

from apex_hf import ApexForCausalLM
from apex_hf.modeling import modeling_apex


# 8 experts, top-2: 3 tokens choose 6 pairs (< 8 experts), 40 tokens 80, 300 tokens exceed EVERY_EXPERT_MAX_TOKENS.
PATHS = {3: "grouped", 40: "every expert", 300: "grouped"}
TRACED_PATHS = {**PATHS, 3: "gathered"}  # the paths compiled code takes


def experts_case(variant, num_tokens, device="cpu", dtype=torch.float32):
    """An experts module with random weights (biases too, for `family_knobs`), and random inputs and routing."""
    generator = torch.Generator().manual_seed(0)
    config = tiny_config(variant, num_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    experts = (modeling_apex.ApexBiasedExperts if config.expert_bias else modeling_apex.ApexExperts)(config)
    for parameter in experts.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    hidden_states = torch.randn(num_tokens, config.hidden_size, generator=generator)
    scores = torch.randn(num_tokens, config.num_experts, generator=generator).softmax(-1)
    top_k_weights, top_k_index = scores.topk(config.num_experts_per_tok, dim=-1)
    experts = experts.to(device, dtype)
    hidden_states, top_k_weights = (t.to(device, dtype).requires_grad_() for t in (hidden_states, top_k_weights))
    return experts, (hidden_states, top_k_index.to(device), top_k_weights)


def forward_and_gradients(experts, inputs, implementation, compiled=False):
    """The output and the gradients of the inputs and weights, named."""
    experts.config._experts_implementation = implementation
    output = (torch.compile(experts) if compiled else experts)(*inputs)
    hidden_states, _, top_k_weights = inputs
    names = ["hidden_states", "top_k_weights", *(name for name, _ in experts.named_parameters())]
    grads = torch.autograd.grad((output.float() ** 2).sum(), [hidden_states, top_k_weights, *experts.parameters()])
    return {"output": output, **dict(zip(names, grads))}


def relative_error(expected, actual):
    return ((expected.float() - actual.float()).norm() / expected.float().norm().clamp(min=1e-12)).item()


def assert_close_as_reference(exact, fast, reference=None, tolerance=1e-5):
    """Each tensor of `fast` within `tolerance` of `exact`; or, given the `reference` path run in the same low
    precision as `fast`, no further from `exact` than twice the reference's error (and at most 1e-2 more)."""
    for name, expected in exact.items():
        bound = tolerance if reference is None else 2 * relative_error(expected, reference[name]) + 1e-2
        error = relative_error(expected, fast[name])
        assert error <= bound, f"{name}: relative error {error:.3g} > {bound:.3g}"


def check_against_eager(
    variant, num_tokens, monkeypatch, device="cpu", dtype=torch.float32, compiled=False, traced=False
):
    """fp32: equal to the eager loop up to rounding. Lower precision: as close to the fp32 eager loop as the eager
    loop in that precision is. `compiled`: the fast path under torch.compile (which path runs is checked eagerly);
    `traced`: eagerly, the path compiled code would take."""
    if traced:
        monkeypatch.setattr(modeling_apex, "is_compiling", lambda: True)
    paths = []
    for name, label in [
        ("_gathered_experts_forward", "gathered"),
        ("_every_expert_forward", "every expert"),
        ("_grouped_experts_forward", "grouped"),
    ]:
        function = getattr(modeling_apex, name)
        if not compiled:
            monkeypatch.setattr(modeling_apex, name, lambda *args, f=function, p=label: paths.append(p) or f(*args))
    experts, inputs = experts_case(variant, num_tokens, device, dtype)
    fast = forward_and_gradients(experts, inputs, "apex_grouped_mm", compiled)
    assert compiled or paths == [(TRACED_PATHS if traced else PATHS)[num_tokens]]
    if dtype == torch.float32:
        assert_close_as_reference(forward_and_gradients(experts, inputs, "eager"), fast)
        return
    exact_inputs = tuple(t.detach().float().requires_grad_() if t.is_floating_point() else t for t in inputs)
    exact = forward_and_gradients(copy.deepcopy(experts).float(), exact_inputs, "eager")
    assert_close_as_reference(exact, fast, forward_and_gradients(experts, inputs, "eager"))


@pytest.mark.parametrize("variant", ["gqa", "family_knobs"])  # plain SwiGLU; biases + GPT-OSS's clamped gate
@pytest.mark.parametrize("num_tokens", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apex_grouped_mm_experts_match_eager(variant, num_tokens, dtype, monkeypatch):
    check_against_eager(variant, num_tokens, monkeypatch, dtype=dtype)


@pytest.mark.parametrize("variant", ["gqa", "family_knobs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_code_gathers_few_pairs_and_matches_eager(variant, dtype, monkeypatch):
    check_against_eager(variant, 3, monkeypatch, dtype=dtype, traced=True)


def test_grouped_linear_in_torch_equals_transformers():
    """Where transformers lacks its private `_grouped_linear`, the grouped GEMMs run `_grouped_linear_in_torch`: the
    same product, forward and gradients, an expert without rows included."""
    from transformers.integrations.moe import _grouped_linear

    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([3, 3, 8, 10], dtype=torch.int32)  # expert 1 gets no rows
    rows = torch.randn(10, 8, generator=generator).requires_grad_()
    weight = torch.randn(4, 12, 8, generator=generator).requires_grad_()
    bias = torch.randn(10, 12, generator=generator).requires_grad_()
    results = []
    for grouped_linear in (_grouped_linear, modeling_apex._grouped_linear_in_torch):
        output = grouped_linear(rows, weight, offsets, bias=bias)
        results.append([output, *torch.autograd.grad((output**2).sum(), [rows, weight, bias])])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("variant", ["gqa", "family_knobs"])
def test_grouped_experts_on_the_plain_torch_grouped_linear_match_eager(variant, monkeypatch):
    monkeypatch.setattr(modeling_apex, "_grouped_linear", modeling_apex._grouped_linear_in_torch)
    check_against_eager(variant, 300, monkeypatch)


@pytest.mark.parametrize("flag", ["_is_expert_parallel", "num_experts"])
def test_expert_parallel_sentinels_go_to_transformers_forward(flag, monkeypatch):
    """Under expert parallelism foreign tokens carry sentinel ids, which transformers' own forward masks. transformers
    >= 5.23 flags it with `_is_expert_parallel`; earlier versions only shrink `num_experts` to the rank's experts."""
    calls = []
    monkeypatch.setattr(modeling_apex, "grouped_mm_experts_forward", lambda *args: calls.append(args))
    experts, inputs = experts_case("gqa", 300)
    experts.config._experts_implementation = "apex_grouped_mm"
    experts(*inputs)
    assert not calls
    if flag == "_is_expert_parallel":
        experts._is_expert_parallel = True
    else:
        experts.__dict__.pop("_is_expert_parallel", None)
        experts.num_experts = experts.config.num_experts // 2
    experts(*inputs)
    assert len(calls) == 1


@pytest.mark.parametrize("cuda,expected", [(True, "apex_grouped_mm"), (False, "eager")])
def test_default_experts_implementation(cuda, expected, monkeypatch):
    """Apex's own experts on a GPU; the eager loop without one (torch's grouped_mm has no fast CPU kernel)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert ApexForCausalLM._from_config(tiny_config("gqa")).config._experts_implementation == expected
    chosen = ApexForCausalLM._from_config(tiny_config("gqa"), experts_implementation="grouped_mm")
    assert chosen.config._experts_implementation == "grouped_mm"
