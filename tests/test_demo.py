"""The CPU demo end to end, at test size: tokenizer -> apex-tiny -> a few dozen AdamW steps -> save_pretrained ->
reload in a fresh `python -I` process where apex_hf is blocked -> greedy generation with K=1 and the default K."""

from __future__ import annotations

import argparse
import json

import pytest

from apex_hf.demo import add_demo_arguments, run_demo


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "model"
    parser = add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--preset",
            "apex-tiny",
            "--max-chars",
            "40000",
            "--vocab-size",
            "320",
            "--steps",
            "40",
            "--batch-size",
            "8",
            "--seq-len",
            "32",
            "--lr",
            "5e-3",
            "--log-every",
            "20",
            "--max-new-tokens",
            "8",
            "--output-dir",
            str(output_dir),
        ]
    )
    return run_demo(args)


def test_demo_saves_a_hub_ready_folder(demo_result):
    from pathlib import Path

    folder = Path(demo_result["output_dir"])
    for name in ("config.json", "configuration_apex.py", "modeling_apex.py", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), f"{name} missing from {sorted(p.name for p in folder.iterdir())}"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "apex"
    assert config["auto_map"]["AutoConfig"] == "configuration_apex.ApexConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_apex.ApexForCausalLM"
    assert config["vocab_size"] == demo_result["vocab_size"]


def test_demo_loss_goes_down(demo_result):
    losses = demo_result["train_losses"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"training loss {first:.3f} -> {last:.3f}"
    assert demo_result["final_val_loss"] < demo_result["initial_val_loss"] - 0.3, demo_result
    # test-time compute: a held-out loss for every K the cache allows (apex-tiny: K = 1, 2)
    assert sorted(demo_result["val_loss_by_k"]) == [1, 2]


def test_demo_fresh_process_reload_generates(demo_result):
    reload = demo_result["reload"]
    assert reload is not None
    # loaded from the code save_pretrained copied next to the weights, not from the apex_hf package
    assert reload["model_class"].startswith("transformers_modules.")
    assert reload["model_class"].endswith("modeling_apex.ApexForCausalLM")
    assert sorted(reload["generations"]) == ["1", "2"]
    for gen in reload["generations"].values():
        assert len(gen["token_ids"]) > 0
        assert isinstance(gen["text"], str)
    assert reload["matches_in_process"], (reload, demo_result["local_generations"])
