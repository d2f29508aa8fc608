"""The demo end to end on the tiny pipeline (recipes/apex-tiny): every stage runs, the report measures each stage
before → after, the plot is written, and the final folder answers in a fresh process where apex_hf is blocked."""

from __future__ import annotations

import argparse
import json

import pytest

from apex_hf.demo import RELOAD_QUESTIONS, REPO_ROOT, add_demo_arguments, format_report, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    parser = add_demo_arguments(argparse.ArgumentParser())
    pipeline = REPO_ROOT / "recipes" / "apex-tiny" / "pipeline.yaml"
    args = parser.parse_args(["--pipeline", str(pipeline), "--output-dir", str(output_dir), "--threads", "2"])
    return output_dir, run_demo(args)


def test_the_report_has_every_stage_measured_before_and_after(demo):
    output_dir, report = demo
    rows = {row["stage"]: row for row in report["stages"]}
    assert list(rows) == ["pretrain", "sft", "dpo", "grpo", "lora"]
    assert rows["pretrain"]["after"] < rows["pretrain"]["before"]  # held-out loss of a pre-training run falls
    for row in rows.values():
        assert row["before"] is not None and row["after"] is not None, row
        assert row["seconds"] > 0
    assert rows["grpo"]["metric"] == "held-out mean reward"
    assert rows["grpo"]["second_metric"] == "groups without reward variance"
    assert all(0 <= share <= 1 for share in rows["grpo"]["second"])
    assert rows["dpo"]["metric"] == "held-out reward accuracy" and rows["dpo"]["second_metric"] == "reward margin"
    for row in rows.values():
        assert all(0 <= accuracy <= 1 for accuracy in row["accuracy"] if accuracy is not None), row
    assert rows["lora"]["accuracy_task"] == "multiplication" and len(rows["lora"]["accuracy"]) == 2
    assert rows["lora"]["kept"][0] == rows["grpo"]["accuracy"][1]  # arithmetic before and after the new skill
    assert rows["sft"]["accuracy"][0] == rows["pretrain"]["accuracy"][1]  # each stage starts where the last ended
    assert json.loads((output_dir / "report.json").read_text())["stages"] == report["stages"]
    table = format_report(report["stages"])
    assert table.count("\n") == 6 and "held-out mean reward" in table


def test_each_stage_moves_what_it_optimises_at_the_tiny_scale(demo):
    """The direction of the demo's targets at this scale (a few steps of a 0.3M-parameter model): each stage's held-out
    metric moves the way its training pushes it. The accuracy targets need the demo's scale (README, "Quick start")."""
    _, report = demo
    rows = {row["stage"]: row for row in report["stages"]}
    for stage in ("pretrain", "sft", "lora"):  # language-model loss on held-out text / chats
        assert rows[stage]["after"] < rows[stage]["before"], rows[stage]
    dpo = rows["dpo"]  # the policy starts as its reference: no preference, no margin
    assert dpo["before"] == 0 and dpo["after"] > 0 and dpo["second"][0] == 0 < dpo["second"][1], dpo


def test_the_curves_are_saved_as_png(demo):
    output_dir, _ = demo
    assert (output_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_final_model_answers_in_a_process_without_apex_hf(demo):
    _, report = demo
    assert report["reload"]["model_class"].startswith("transformers_modules.")
    assert report["reload"]["model_class"].endswith("modeling_apex.ApexForCausalLM")
    answers = report["reload"]["answers"]
    assert len(answers) == 2 * RELOAD_QUESTIONS  # held-out arithmetic and the LoRA skill
    for item in answers:
        assert isinstance(item["answer"], str) and isinstance(item["right"], bool)
        assert item["right"] == (f"\\boxed{{{item['reference']}}}" in item["answer"]), item
