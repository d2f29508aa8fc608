"""SFT / DPO / GRPO stages and the pipeline, on the tiny recipes in recipes/apex-tiny (CPU, a few steps each)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_hub import run_without_apex_hf
from tiny_configs import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from apex_hf import ApexForCausalLM
from apex_hf.pipeline import plan_pipeline, run_pipeline
from apex_hf.posttrain.config import load_recipe
from apex_hf.posttrain.stages import build_trainer, run_stage
from apex_hf.stage_folder import (
    MANIFEST_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    is_finished,
    read_log_history,
    read_summary,
    write_manifest,
)
from apex_hf.tokenizer import TURN_END_TOKEN, prepare_chat_tokenizer


REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = REPO_ROOT / "recipes" / "apex-tiny"


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes name their data files relative to the working directory


def recipe(stage, base, out, *overrides, file=None):
    file = RECIPES / f"{file or stage}.yaml"
    return load_recipe(file, stage, ["--model.name_or_path", str(base), "--output_dir", str(out), *overrides])


def logged_keys(folder):
    return {key for entry in read_log_history(folder) for key in entry}


def test_the_stage_folder_keeps_the_log_history_where_the_trainer_writes_it():
    from transformers.trainer import TRAINER_STATE_NAME

    assert STATE_FILE == TRAINER_STATE_NAME


def test_sft_full_fine_tune_logs_apex_statistics_and_writes_a_loadable_folder(base_model, tmp_path):
    out = run_stage(recipe("sft", base_model, tmp_path / "sft"))
    keys = logged_keys(out)
    # TRL's own (router load-balancing loss included), then Apex's
    assert {"loss", "learning_rate", "aux_loss", "train_tokens_per_second"} <= keys
    assert {"apex/verifier_loss", "apex/consistency_loss", "apex/router_z_loss"} <= keys
    assert "apex/expert_load_max_violation" in keys
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "generation" in tokenizer.chat_template and "endgeneration" in tokenizer.chat_template
    assert tokenizer.eos_token == TURN_END_TOKEN and model.config.eos_token_id == tokenizer.eos_token_id
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "- apex" in card and "- sft" in card


def test_sft_with_lora_merges_into_the_folder_and_keeps_the_adapter(base_model, tmp_path):
    out = run_stage(recipe("sft", base_model, tmp_path / "lora", file="lora"))
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    moved = [
        name for (name, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(p, q)
    ]
    assert any("self_attn.q_proj" in name for name in moved)
    assert any("experts.gate_up_proj" in name for name in moved)
    assert not any("embed_tokens" in name or "mlp.gate.weight" in name for name in moved)
    assert "- lora" in (out / "README.md").read_text()


def test_dpo_without_peft_reloads_the_reference_model_from_the_path(base_model, tmp_path):
    trainer = build_trainer(recipe("dpo", base_model, tmp_path / "dpo"))
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert trainer.ref_model.config._name_or_path == str(base_model)
    trainer.train()
    policy, reference = trainer.model.model.embed_tokens.weight, trainer.ref_model.model.embed_tokens.weight
    assert not torch.equal(policy, reference)
    assert any("rewards/accuracies" in entry for entry in trainer.state.log_history)


def test_grpo_with_kl_logs_each_reward(base_model, tmp_path):
    out = run_stage(recipe("grpo", base_model, tmp_path / "grpo"))
    keys = logged_keys(out)
    for name in ("accuracy_reward", "format_reward", "length_reward"):
        assert {f"rewards/{name}/mean", f"rewards/{name}/std"} <= keys
    assert {"kl", "reward", "apex/verifier_loss", "aux_loss"} <= keys
    assert "eval_reward" in read_summary(out)["final_eval"]


def test_a_stage_resumes_from_its_checkpoint_with_the_same_losses(base_model, tmp_path):
    steps = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    run_stage(recipe("sft", base_model, tmp_path / "full", *steps))
    uninterrupted = [e["loss"] for e in read_log_history(tmp_path / "full") if "loss" in e]

    run_stage(recipe("sft", base_model, tmp_path / "cut", *steps))
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")  # as if stopped after the step-2 checkpoint
    (tmp_path / "cut" / SUMMARY_FILE).unlink()
    (tmp_path / "cut" / MANIFEST_FILE).unlink()
    state_file = tmp_path / "cut" / "checkpoint-2" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["log_history"][0]["loss"] = 123.0  # a marker: only a run restored from this checkpoint carries it
    state_file.write_text(json.dumps(state))
    write_manifest(state_file.parent)  # the edited checkpoint counts as intact
    run_stage(recipe("sft", base_model, tmp_path / "cut", *steps, "--resume_from_checkpoint", "latest"))
    resumed = [e["loss"] for e in read_log_history(tmp_path / "cut") if "loss" in e]
    assert resumed[0] == 123.0
    assert resumed[1:] == pytest.approx(uninterrupted[1:], rel=1e-5)


def test_pipeline_feeds_each_stage_the_previous_output_and_the_result_is_remote_code(tmp_path):
    plan = plan_pipeline(RECIPES / "pipeline.yaml", ["--output_dir", str(tmp_path)])
    assert [p.name for p in plan] == ["pretrain", "sft", "dpo", "grpo", "lora"]
    for previous, current in zip(plan, plan[1:]):
        assert current.recipe.model.name_or_path == str(previous.output_dir)
    folders = run_pipeline(plan)
    assert all(is_finished(folder) for folder in folders)

    final = AutoModelForCausalLM.from_pretrained(folders[-1]).eval()
    ids = torch.randint(5, 200, (1, 6))
    result = run_without_apex_hf(tmp_path, folders[-1], ids)
    assert torch.equal(result["logits"], final(ids).logits.detach())

    # --resume skips the finished stages
    assert run_pipeline(plan_pipeline(RECIPES / "pipeline.yaml", ["--output_dir", str(tmp_path)]), resume=True)


def test_chat_template_marks_assistant_tokens_and_a_grown_tokenizer_resizes_the_model():
    """Apex's own BPE reserves the turn markers; a foreign tokenizer without them grows, and the model with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1, "hello": 2, "<eos>": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    model = ApexForCausalLM(tiny_config(vocab_size=4, pad_token_id=None, bos_token_id=None, eos_token_id=3))
    assert prepare_chat_tokenizer(foreign, model) is True
    assert model.get_input_embeddings().num_embeddings == len(foreign) == 6
    assert foreign.eos_token == TURN_END_TOKEN and model.config.eos_token_id == foreign.convert_tokens_to_ids(
        "<|im_end|>"
    )
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    encoded = foreign.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    answer = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert foreign.convert_ids_to_tokens(answer) == ["hello", TURN_END_TOKEN]
    model(torch.tensor([encoded["input_ids"]]))  # every id is inside the resized embeddings


@pytest.mark.parametrize(
    "stage, overrides, message",
    [
        (
            "sft",
            ["--learning_rat", "1e-4"],
            "unknown field(s) for SFTConfig: 'learning_rat' (did you mean 'learning_rate'?)",
        ),
        ("sft", ["--model.dtyp", "float32"], "did you mean 'dtype'?"),
        ("sft", ["--data.datasets", "[{path: json, data_files: data/demo/nope.jsonl}]"], "nope.jsonl not found"),
        ("grpo", ["--num_generations", "3"], "divisible by num_generations"),
        ("grpo", ["--reward_funcs", "[accuracy, no_such_reward]"], "no_such_reward"),
        ("grpo", ["--reward_weights", "[1.0]"], "reward_weights has 1 values for 3 reward_funcs"),
        ("sft", ["--reward_funcs", "[accuracy]"], "reward_funcs is a GRPO field"),
        ("sft", ["--peft.lora_alpah", "8"], "did you mean 'lora_alpha'?"),
    ],
)
def test_bad_recipes_fail_before_anything_is_loaded(tmp_path, stage, overrides, message):
    file = RECIPES / ("lora.yaml" if "--peft.lora_alpah" in overrides else f"{stage}.yaml")
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_recipe(file, stage, ["--output_dir", str(tmp_path / "out"), *overrides])
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_command_line_overrides_are_typed_like_yaml_but_no_stays_a_string():
    from apex_hf.recipe import apply_overrides

    raw = apply_overrides(
        {"model": {"dtype": "float32"}},
        [
            "--save_strategy",
            "no",
            "--learning_rate=1e-4",
            "--push_to_hub",
            "--model.dtype",
            "bfloat16",
            "--bf16",
            "false",
        ],
    )
    assert raw == {
        "model": {"dtype": "bfloat16"},
        "save_strategy": "no",
        "learning_rate": "1e-4",  # YAML 1.1; the numeric field converts it (below)
        "push_to_hub": True,
        "bf16": False,
    }
    stage = load_recipe(RECIPES / "sft.yaml", "sft", ["--learning_rate", "1e-4", "--warmup_steps", "0.1"])
    assert stage.args.learning_rate == 1e-4 and stage.args.warmup_steps == 0.1


def test_missing_model_folder_is_named(tmp_path):
    stage_recipe = recipe("sft", tmp_path / "no_such_model", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        build_trainer(stage_recipe)


@pytest.fixture
def bf16_gpu(monkeypatch):
    """The GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU."""
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)


@pytest.mark.parametrize("pipeline", sorted(RECIPES.parent.glob("*/pipeline.yaml")), ids=lambda p: p.parent.name)
def test_every_shipped_pipeline_and_its_stage_files_parse(pipeline, tmp_path, bf16_gpu):
    plan = plan_pipeline(pipeline, ["--output_dir", str(tmp_path)])
    assert [p.output_dir for p in plan] == [tmp_path / p.name for p in plan]


def test_the_single_gpu_lora_recipe_parses(bf16_gpu):
    lora = load_recipe(RECIPES.parent / "apex-7b-lora" / "lora.yaml", "sft")
    assert lora.peft and lora.args.bf16 and lora.args.gradient_checkpointing and lora.args.max_length == 4096
