"""The loop training recipe lives in the model: passes drawn per training forward, truncated backpropagation through
the loop, input injection, the exit loss. Active in train() with gradients, inactive in eval() and under no_grad."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from tiny_configs import tiny_config

from apex_hf import ApexConfig, ApexForCausalLM


def build(**overrides):
    torch.manual_seed(0)
    config = tiny_config("gqa", num_refinement_steps=2, max_refinement_steps=4, memory_injection="gated_add")
    for field, value in overrides.items():
        setattr(config, field, value)
    config.validate()
    return ApexForCausalLM(config)


def ids(batch=2, length=8):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(1))


def passes_run(model, forwards=12, **kwargs):
    """One verifier score per pass run, so their count is the passes of that forward."""
    return [len(model(ids(), **kwargs).verifier_scores) for _ in range(forwards)]


def test_sampled_passes_vary_in_training_and_stay_fixed_in_eval_and_without_gradients():
    model = build(refinement_sampling="uniform", refinement_sampling_min=1, refinement_sampling_max=4)
    model.train()
    drawn = passes_run(model)
    assert set(drawn) == {1, 2, 3, 4}
    with torch.no_grad():  # e.g. GRPO's rollouts: train mode, no gradients
        assert set(passes_run(model, forwards=4)) == {2}
    model.eval()
    assert set(passes_run(model, forwards=4)) == {2}
    model.train()
    assert set(passes_run(model, forwards=4, num_refinement_steps=3)) == {3}  # an explicit K always wins


def test_every_rank_draws_the_same_passes():
    first, second = build(refinement_sampling="uniform").train(), build(refinement_sampling="uniform").train()
    torch.manual_seed(123)  # the global RNG must not matter: ranks and data loaders consume it differently
    drawn = passes_run(first)
    torch.manual_seed(7)
    assert passes_run(second) == drawn


def test_poisson_draws_stay_within_bounds():
    model = build(refinement_sampling="poisson", refinement_sampling_min=2, refinement_sampling_max=3).train()
    assert set(passes_run(model, forwards=16)) == {2, 3}


def loop_gradients(model):
    model.train()
    model(ids(), labels=ids()).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("injection, exit_loss", [("add", 0.0), ("scaled_add", 0.0), ("adapter", 0.0), ("add", 1.0)])
def test_truncated_backprop_reaches_every_loop_parameter(injection, exit_loss):
    model = build(
        num_refinement_steps=3,
        refinement_backprop_steps=1,
        refinement_input_injection=injection,
        refinement_exit_loss_coef=exit_loss,
    )
    grads = loop_gradients(model)
    missing = [name for name, grad in grads.items() if grad is None or not grad.abs().sum() > 0]
    # The pass gates of unused slots and the fourth pass do not run; everything else must learn.
    assert missing == [], missing


def test_truncated_backprop_drops_the_gradient_of_earlier_passes():
    full = loop_gradients(build(num_refinement_steps=3, refinement_input_injection="add"))
    truncated = loop_gradients(
        build(num_refinement_steps=3, refinement_input_injection="add", refinement_backprop_steps=1)
    )
    core = "model.layers.1.self_attn.q_proj.weight"  # layer 1 is the shared core
    assert not torch.allclose(full[core], truncated[core])
    # With nothing injected, truncation leaves the prelude without gradient: only the last pass is differentiated.
    no_injection = loop_gradients(build(num_refinement_steps=3, refinement_backprop_steps=1, memory_injection="none"))
    assert no_injection["model.layers.0.self_attn.q_proj.weight"] is None


def test_input_injection_adapter_starts_as_addition_and_never_runs_at_one_pass():
    added, adapted = build(refinement_input_injection="add").eval(), build(refinement_input_injection="adapter").eval()
    adapted.load_state_dict(added.state_dict(), strict=False)  # same weights, the adapter keeps its [I, I] start
    assert torch.allclose(added(ids()).logits, adapted(ids()).logits, atol=1e-5)
    plain = build().eval()
    plain.load_state_dict(added.state_dict())
    assert torch.equal(plain(ids(), num_refinement_steps=1).logits, added(ids(), num_refinement_steps=1).logits)
    assert not torch.allclose(plain(ids()).logits, added(ids()).logits)


def test_scaled_injection_keeps_the_state_scale_and_never_runs_at_one_pass():
    added = build(refinement_input_injection="add").eval()
    scaled = build(refinement_input_injection="scaled_add").eval()
    scaled.load_state_dict(added.state_dict())
    assert torch.equal(added(ids(), num_refinement_steps=1).logits, scaled(ids(), num_refinement_steps=1).logits)
    assert not torch.allclose(added(ids()).logits, scaled(ids()).logits)
    state, prelude_output = torch.randn(2, 64, 32), torch.randn(2, 64, 32)  # unit scale, uncorrelated
    rms = lambda x: x.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(added.model.input_injection(state, prelude_output)) == pytest.approx(2**0.5, rel=0.1)
    assert rms(scaled.model.input_injection(state, prelude_output)) == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("state_norm", ["none", "every_pass", "before_coda"])
def test_exit_loss_reads_each_earlier_pass_out_as_a_model_with_that_many_passes(state_norm):
    """Exit k of a training forward is what the model computes at num_refinement_steps=k (memory and state norm
    included), and the loss is the final pass's plus the coefficient times the mean of the exits' losses."""
    model = build(
        num_refinement_steps=3,
        refinement_input_injection="add",
        refinement_exit_loss_coef=0.5,
        refinement_state_norm=state_norm,
    ).train()
    loss = model(ids(), labels=ids()).loss
    exit_losses = [model.model.aux_losses[f"exit_loss_pass{k}"] for k in (1, 2)]
    model.eval()
    with torch.no_grad():
        for k, exit_loss in zip((1, 2), exit_losses):
            torch.testing.assert_close(exit_loss, model(ids(), labels=ids(), num_refinement_steps=k).loss)
        final = model(ids(), labels=ids()).loss
    torch.testing.assert_close(loss.detach(), final + 0.5 * torch.stack(exit_losses).mean())


def test_exit_loss_only_in_training_forwards_with_labels():
    model = build(num_refinement_steps=3, refinement_exit_loss_coef=1.0)
    plain = build(num_refinement_steps=3)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(ids(), labels=ids()).loss, plain(ids(), labels=ids()).loss)
    model.train()
    with torch.no_grad():  # train mode without gradients (a rollout): no exits read out
        assert model.model(ids()).exit_hidden_states is None
    assert len(model.model(ids()).exit_hidden_states) == 2  # read out for the verifier's targets, even without labels
    assert model(ids()).loss is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(refinement_sampling="geometric"), "refinement_sampling"),
        (dict(refinement_sampling_min=3, refinement_sampling_max=2), "refinement_sampling_min/max"),
        (dict(refinement_sampling_max=5), "refinement_sampling_min/max"),
        (dict(refinement_backprop_steps=0), "refinement_backprop_steps"),
        (dict(refinement_input_injection="concat"), "refinement_input_injection"),
        (dict(refinement_state_norm=True), "refinement_state_norm"),
    ],
)
def test_recipe_fields_are_checked(overrides, field):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=field):
        ApexConfig(num_refinement_steps=2, max_refinement_steps=4, **overrides)


def import_script(name: str):
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_measure_loop_smoke_runs_every_variant(tmp_path, capsys):
    measure_loop = import_script("measure_loop")
    out = tmp_path / "loop.json"
    assert measure_loop.main(["--smoke", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    report = __import__("json").loads(out.read_text())
    assert [row["variant"] for row in report["rows"]] == [
        "k1",
        "k3_plain",
        "k3_recipe",
        "k3_recipe_memory",
        "unique_depth",
        "k1_equal_flops",
    ]
    assert report["data"]["held_out_files"] > 0 and "| k3_recipe |" in table
    assert sorted(report["rows"][2]["bpb_by_passes"]) == [str(k) for k in range(1, 7)]
    curve = report["rows"][2]["exit_curve"]  # k3_recipe has a verifier: fixed K, then every threshold
    assert curve[0]["refinement_exit_threshold"] is None and curve[0]["num_refinement_steps"] == 3
    assert curve[0]["passes_skipped"] == 0 and len(curve) > 3
    fewer_passes = [p for p in curve if p["num_refinement_steps"] == 2 and p["refinement_exit_threshold"] is None]
    assert fewer_passes[0]["passes_skipped"] == pytest.approx(1 / 3)
    assert "exit_curve" in report["rows"][3]  # k3_recipe_memory: the verifier with the memory
    assert "exit_curve" not in report["rows"][0]  # k1: nothing to exit from


def test_measure_decoding_on_the_cpu_times_every_way_with_the_same_tokens(tmp_path, capsys):
    """A model trained with two MTP depths (`k3_recipe_mtp`), decoded by `measure_decoding.py --device cpu`: every way,
    the speculative ones with their acceptance, gives `generate`'s tokens."""
    measure_loop = import_script("measure_loop")
    models = tmp_path / "models"
    assert measure_loop.main(["--smoke", "--variants", "k3_recipe_mtp", "--no-decode", "--models", str(models)]) == 0
    measure_decoding = import_script("measure_decoding")
    out = tmp_path / "decoding.json"
    sizes = ["--prompts", "2", "--prompt-length", "16", "--new-tokens", "8", "--drafts", "1x2"]
    model = str(models / "k3_recipe_mtp-seed0")
    measure_decoding.main(["--model", model, "--device", "cpu", *sizes, "--packages", "accelerate", "--out", str(out)])
    rows = {row["way"]: row for row in __import__("json").loads(out.read_text())["rows"]}
    speculative = [
        "self-speculative, 2 drafts at K = 1",
        "multi-token speculative, 1 MTP draft",
        "multi-token speculative, 2 MTP drafts",
    ]
    assert list(rows) == ["generate, dynamic cache", "generate, assisted by K = 1", "graphed greedy", *speculative]
    assert all(row["same_tokens"] == 1.0 and row["tokens_per_s"] > 0 for row in rows.values())
    assert all(0 <= rows[way]["acceptance"] <= 1 for way in speculative)
    assert "| multi-token speculative, 1 MTP draft |" in capsys.readouterr().out


def test_measure_loop_trains_variants_in_parallel_processes_and_measures_decode_alone(tmp_path, capsys):
    measure_loop = import_script("measure_loop")
    out, models = tmp_path / "loop.json", tmp_path / "models"
    argv = ["--smoke", "--parallel", "--variants", "k1", "k3_recipe", "--models", str(models), "--out", str(out)]
    assert measure_loop.main(argv) == 0
    report = __import__("json").loads(out.read_text())
    assert [row["variant"] for row in report["rows"]] == ["k1", "k3_recipe"]
    assert sorted(p.name for p in models.iterdir()) == ["k1-seed0", "k3_recipe-seed0"]  # each process saved its model
    curve = report["rows"][1]["exit_curve"]
    assert all(point["decode_tokens_per_s"] > 0 for point in curve)  # measured afterwards, from the saved model
    assert "decode k3_recipe-seed0" in capsys.readouterr().out
