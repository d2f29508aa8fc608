"""`ApexTrainingStats`: per-layer router statistics checked by hand against the routers' outputs, refinement-memory
statistics, layer names under wrappers."""

import math
from collections import defaultdict

import pytest
import torch
from tiny_configs import VARIANTS, tiny_config

from apex_hf import ApexForCausalLM
from apex_hf.metrics import ApexTrainingStats, layer_name


def build(variant, **overrides):
    torch.manual_seed(0)
    return ApexForCausalLM(tiny_config(variant, **overrides)).train()


@pytest.mark.parametrize(
    "module_name, expected",
    [
        ("model.layers.3.mlp.gate", "layer_3"),
        ("model.layers.12._orig_mod.mlp.gate", "layer_12"),  # regional compilation
        ("base_model.model.model.layers.1.mlp.gate", "layer_1"),  # PEFT
        ("module._orig_mod.model.layers.0.mlp.gate", "layer_0"),  # DDP around a compiled model
        ("mtp.0.layer.mlp.gate", "mtp_0"),
        ("base_model.model.mtp.1.layer._orig_mod.mlp.gate", "mtp_1"),
    ],
)
def test_layer_name_under_wrappers(module_name, expected):
    assert layer_name(module_name) == expected


def hand_router_statistics(router_output, scoring: str, num_experts: int) -> tuple[float, float]:
    """(max load violation, mean routing entropy) of one router call, written out."""
    router_logits, _, top_k_index = router_output
    if scoring == "softmax":
        probabilities = router_logits.softmax(dim=-1)
    else:
        scores = router_logits.sigmoid()
        probabilities = scores / scores.sum(dim=-1, keepdim=True)
    entropy = -(probabilities * probabilities.log()).sum(dim=-1).mean().item()
    load = torch.bincount(top_k_index.flatten(), minlength=num_experts).float()
    return ((load.max() - load.mean()) / load.mean()).item(), entropy


@pytest.mark.parametrize("variant", list(VARIANTS))  # softmax and sigmoid routing
def test_per_layer_router_statistics(variant):
    """Layer 0 dense, layers 1 (the core, one call per refinement pass) and 2 sparse, plus one MTP depth: keys for
    exactly the three MoE layers, each the mean over that layer's router calls."""
    model = build(variant, first_k_dense_replace=1, num_mtp_layers=1)
    config = model.config
    calls = defaultdict(list)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_hook(lambda m, args, out, name=name: calls[layer_name(name)].append(out))
    stats = ApexTrainingStats(model)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    logs = stats.pop()

    layers = {"layer_1", "layer_2", "mtp_0"}
    assert set(calls) == layers
    assert len(calls["layer_1"]) == config.num_refinement_steps
    per_layer = {key for key in logs if key.count("/") == 2}
    assert per_layer == {
        f"apex/{stat}/{layer}" for stat in ("expert_load_max_violation", "router_entropy") for layer in layers
    }
    for layer, outputs in calls.items():
        hand = [hand_router_statistics(output, config.router_scoring, config.num_experts) for output in outputs]
        violation, entropy = (sum(values) / len(values) for values in zip(*hand))
        assert logs[f"apex/expert_load_max_violation/{layer}"] == pytest.approx(violation, rel=1e-5)
        assert logs[f"apex/router_entropy/{layer}"] == pytest.approx(entropy, rel=1e-5)
        assert 0 <= logs[f"apex/router_entropy/{layer}"] <= math.log(config.num_experts)
    every_call = [
        hand_router_statistics(output, config.router_scoring, config.num_experts)
        for outputs in calls.values()
        for output in outputs
    ]
    violation, entropy = (sum(values) / len(values) for values in zip(*every_call))
    assert logs["apex/expert_load_max_violation"] == pytest.approx(violation, rel=1e-5)
    assert logs["apex/router_entropy"] == pytest.approx(entropy, rel=1e-5)


def test_memory_statistics_read_the_last_pass():
    model = build("gqa")
    stats = ApexTrainingStats(model)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 8:] = 0
    for mask in (None, attention_mask):
        out = model(ids, attention_mask=mask, labels=ids)
        logs = stats.pop()
        memory = out.memory_states[-1].detach()
        real_tokens = memory[mask.bool()] if mask is not None else memory
        gate = model.model.refinement.memory_gate.detach()
        assert logs["apex/memory_rms"] == pytest.approx(real_tokens.pow(2).mean().sqrt().item(), rel=1e-5)
        assert logs["apex/memory_gate_abs_mean"] == pytest.approx(gate.abs().mean().item(), rel=1e-5)


def test_no_memory_statistics_without_refinement_memory():
    model = build("gqa", memory_injection="none")
    assert not model.config.has_refinement_memory
    stats = ApexTrainingStats(model)
    ids = torch.randint(3, 97, (2, 12))
    model(ids, labels=ids)
    logs = stats.pop()
    assert "apex/consistency_loss" in logs  # the refinement loop runs, only without memory (and verifier)
    assert not any(key.startswith("apex/memory") for key in logs)


def test_multi_token_prediction_loss_is_logged():
    """The causal LM adds it after the backbone's forward has ended: it is read from the model's output."""
    model = build("gqa", num_mtp_layers=1)
    stats = ApexTrainingStats(model)
    tokens = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = [model(tokens, labels=tokens).mtp_loss.item() for _ in range(2)]
    assert stats.pop()["apex/mtp_loss"] == pytest.approx(sum(losses) / 2)
    model(tokens).logits.sum()  # no labels, no MTP loss: nothing to record
    assert "apex/mtp_loss" not in stats.pop()


def test_statistics_in_compiled_layers_recompile_nothing_and_match_eager():
    """Traced by torch.compile, the hooks' counts and names became guards that failed on every router call: a layer
    recompiled on each step until Dynamo's limit. They run eagerly instead: after the first step no graph is built,
    and the statistics are the uncompiled model's."""
    from accelerate.utils import compile_regions
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    input_ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    logged = []
    for compiled in (False, True):
        model = build("gqa")
        stats = ApexTrainingStats(model)
        if compiled:
            model = compile_regions(model, backend="eager")  # the guards are Dynamo's: no need to generate code
        for step in range(3):
            if step == 1:
                graphs_after_first_step = counters["stats"]["unique_graphs"]
            model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
        logged.append(stats.pop())
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step > 0
    assert logged[1].keys() == logged[0].keys() and len(logged[0]) > 4
    for name, value in logged[0].items():
        if name.startswith("apex/"):
            assert logged[1][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    torch._dynamo.reset()
