"""Converting, exporting and upcycling checkpoint folders: what lands in OUT, the command line, and bad input (an
unsupported family, missing tensors, an inexpressible knob, an existing OUT, a failure half-way)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_conversion import forward_kwargs, logits_delta, model_pair, reference_config
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, MixtralForCausalLM

from apex_hf import ApexForCausalLM
from apex_hf.cli import main
from apex_hf.convert.families import ConversionError, apex_config_from, convert_checkpoint


def save_reference(variant: str, folder, tokenizer=None):
    reference, _ = model_pair(variant, "eager")
    reference.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return reference


def saved_keys(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as weights:
        return set(weights.keys())


@torch.no_grad()
def test_per_expert_mixtral_checkpoint_converts_with_tokenizer(tmp_path, tiny_tokenizer):
    reference = save_reference("mixtral", tmp_path / "mixtral", tiny_tokenizer)
    # transformers saves Mixtral in its original per-expert layout; the converter reads it through the mapping
    assert "model.layers.0.block_sparse_moe.experts.5.w3.weight" in saved_keys(tmp_path / "mixtral")

    assert main(["convert", str(tmp_path / "mixtral"), str(tmp_path / "apex")]) == 0
    apex = AutoModelForCausalLM.from_pretrained(tmp_path / "apex", attn_implementation="eager")
    assert type(apex) is ApexForCausalLM and apex.config.num_experts == 6
    assert logits_delta(reference, apex, "left") <= 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "apex").get_vocab() == tiny_tokenizer.get_vocab()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apex", "mixtral"]  # no staging folder left


@torch.no_grad()
def test_export_checkpoint_writes_the_family_layout(tmp_path, tiny_tokenizer):
    reference = save_reference("mixtral", tmp_path / "mixtral", tiny_tokenizer)
    convert_checkpoint(tmp_path / "mixtral", tmp_path / "apex")
    assert main(["export", str(tmp_path / "apex"), str(tmp_path / "back"), "--to", "mixtral"]) == 0
    assert saved_keys(tmp_path / "back") == saved_keys(tmp_path / "mixtral")
    exported = MixtralForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    assert logits_delta(reference, exported, "right") == 0.0
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()


def test_missing_tensor_is_named_and_nothing_is_written(tmp_path):
    save_reference("llama", tmp_path / "llama")
    weights = load_file(tmp_path / "llama" / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing 1 tensor\(s\).*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_checkpoint(tmp_path / "llama", tmp_path / "apex")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_unsupported_family_and_missing_config(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "apex")])
    assert exit_info.value.code == 2
    assert "unsupported model family 'gpt2'; supported: ['deepseek_v3', 'gemma3_text'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "apex")
    assert not (tmp_path / "apex").exists()


def test_inexpressible_knob_is_named(tmp_path):
    config = reference_config("gemma3_text")
    config.final_logit_softcapping = 30.0
    with pytest.raises(ConversionError, match=r"gemma3_text: config\.final_logit_softcapping=30\.0 cannot be"):
        apex_config_from(config)


def test_existing_output_and_a_failure_half_way_leave_no_partial_folder(tmp_path, monkeypatch):
    save_reference("llama", tmp_path / "llama")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        convert_checkpoint(tmp_path / "llama", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ApexForCausalLM, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(tmp_path / "llama", tmp_path / "apex")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "taken"]


@torch.no_grad()
def test_upcycle_command_from_a_family_checkpoint(tmp_path, tiny_tokenizer):
    reference = save_reference("llama", tmp_path / "llama", tiny_tokenizer)
    command = ["upcycle", str(tmp_path / "llama"), str(tmp_path / "up"), "--experts", "4", "--refinement-steps", "2"]
    assert main([*command, "--prelude-layers", "1", "--coda-layers", "1"]) == 0
    upcycled = AutoModelForCausalLM.from_pretrained(tmp_path / "up", attn_implementation="eager")
    config = json.loads((tmp_path / "up" / "config.json").read_text())
    assert (config["num_experts"], config["num_refinement_steps"], config["num_core_layers"]) == (4, 2, 1)
    assert upcycled.config.mlp_layer_types == ["sparse"] * 4 and upcycled.config.refinement_pass_gate
    assert logits_delta(reference, upcycled, "left") <= 1e-5
    assert (tmp_path / "up" / "tokenizer.json").is_file()
    kwargs = forward_kwargs("right")
    assert torch.isfinite(upcycled(**kwargs).logits).all()


def test_gpt_oss_refuses_an_older_transformers(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(
        ConversionError, match=r"gpt_oss: converting needs transformers >= 5\.23 \(installed: 5\.17\.0\)"
    ):
        apex_config_from(reference_config("gpt_oss"))
