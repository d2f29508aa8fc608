"""What training prints: one short line per log step (`apex_hf.metrics.console_line`) in `apex-hf pretrain` and the
TRL stages, while the trackers and the log history keep every value, the per-layer router statistics included."""

from pathlib import Path

import pytest
from test_pretrain import TINY_RECIPE, _tensorboard_scalars

from apex_hf.metrics import console_line
from apex_hf.posttrain.config import load_recipe
from apex_hf.posttrain.stages import ShortPrinterCallback, ShortProgressCallback, build_trainer, run_stage
from apex_hf.pretrain import pretrain
from apex_hf.stage_folder import read_log_history


REPO_ROOT = Path(__file__).resolve().parent.parent
PER_LAYER_KEY = "apex/router_entropy/layer_1"
MAX_LINE = 200


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes name their data files relative to the working directory


def console_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


def assert_short_console(text: str, prefix: str) -> list[str]:
    """The log lines that start with `prefix`; every one short and free of Apex's statistics, none at all elsewhere."""
    lines = console_lines(text)
    logged = [line for line in lines if line.startswith(prefix)]
    assert logged, text
    assert all(len(line) <= MAX_LINE for line in logged), max(logged, key=len)
    assert not [line for line in lines if "apex/" in line or "layer_" in line]
    return logged


def test_console_line_keeps_a_handful_of_scalars():
    entry = {
        "loss": 5.98,
        "grad_norm": 2.5,
        "learning_rate": 1e-3,
        "train_tokens_per_second": 4079.2,
        "mean_token_accuracy": 0.25,
        "num_tokens": 916.0,
        **{f"apex/router_entropy/layer_{i}": 1.2 for i in range(30)},
        **{f"apex/expert_load_max_violation/layer_{i}": 0.7 for i in range(30)},
    }
    line = console_line(entry)
    assert line == "loss 5.9800 | token accuracy 0.250 | lr 1.00e-03 | grad norm 2.500 | 4,079 tokens/s"
    held_out = {"eval_loss": 5.5, "eval_mean_token_accuracy": 0.5, "eval_runtime": 0.1, "epoch": 1.0}
    assert console_line(held_out) == "held-out loss 5.5000 | token accuracy 0.500"
    assert console_line({"epoch": 1.0, "total_flos": 3.0}) == ""


def test_pretrain_console_is_short_and_the_trackers_get_every_value(tmp_path, capsys):
    output_dir = pretrain(
        TINY_RECIPE,
        [
            *["--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--logging_steps", "2"],
            *["--eval_steps", "4", "--report_to", "tensorboard"],
        ],
    )
    captured = capsys.readouterr()
    logged = assert_short_console(captured.out + captured.err, "[pretrain] step")
    assert any(line.startswith("[pretrain] step 2: loss ") for line in logged)
    assert any(line.startswith("[pretrain] step 4: held-out loss ") for line in logged)

    history = read_log_history(output_dir)
    assert PER_LAYER_KEY in [entry for entry in history if "loss" in entry][-1]
    assert PER_LAYER_KEY in _tensorboard_scalars(output_dir / output_dir.name)


def sft_recipe(base_model, output_dir, *overrides):
    overrides = ["--model.name_or_path", str(base_model), "--output_dir", str(output_dir), *overrides]
    return load_recipe(REPO_ROOT / "recipes" / "apex-tiny" / "sft.yaml", "sft", overrides)


def test_trl_stage_console_is_short_and_the_log_history_gets_every_value(base_model, tmp_path, capsys):
    output_dir = run_stage(sft_recipe(base_model, tmp_path / "sft", "--max_steps", "2"))
    captured = capsys.readouterr()
    logged = assert_short_console(captured.out + captured.err, "[sft] step")
    assert logged[0].startswith("[sft] step 1: loss ")
    assert "grad norm" in logged[0] and "tokens/s" in logged[0]

    history = read_log_history(output_dir)
    assert PER_LAYER_KEY in history[0]


def test_trl_stage_without_progress_bars_prints_short_lines(base_model, tmp_path, capsys):
    trainer = build_trainer(sft_recipe(base_model, tmp_path / "sft", "--disable_tqdm", "true"))
    printers = [c for c in trainer.callback_handler.callbacks if "Printer" in type(c).__name__]
    assert [type(c) for c in printers] == [ShortPrinterCallback]
    assert not any(type(c).__name__ == "ProgressCallback" for c in trainer.callback_handler.callbacks)

    trainer.log({"loss": 1.0, "learning_rate": 1e-3, "grad_norm": 0.5, "apex/router_entropy/layer_0": 1.0})
    assert capsys.readouterr().out == "[sft] step 0: loss 1.0000 | lr 1.00e-03 | grad norm 0.500\n"
    assert trainer.state.log_history[-1]["apex/router_entropy/layer_0"] == 1.0


def test_trl_stage_keeps_its_progress_bar(base_model, tmp_path):
    trainer = build_trainer(sft_recipe(base_model, tmp_path / "sft"))
    assert [type(c) for c in trainer.callback_handler.callbacks if "Progress" in type(c).__name__] == [
        ShortProgressCallback
    ]
