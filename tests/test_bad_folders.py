"""Damaged and occupied folders: every case asserts the error type, that the message names the problem (the file or
the folder), and that what was on disk is byte-for-byte unchanged (`snapshot` before and after, hidden siblings
included, so a leftover staging folder fails too).

One tiny pre-training run (`finished`: 6 steps, checkpoints at steps 2 and 4) is built once; each case damages a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from apex_hf import cli
from apex_hf.outputs import OutputExists, atomic_output_dir, check_output_dir
from apex_hf.stage_folder import (
    MANIFEST_FILE,
    SUMMARY_FILE,
    DamagedFolder,
    NothingToResume,
    check_model_folder,
    verify_folder,
    write_manifest,
)


REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = REPO_ROOT / "recipes" / "apex-tiny"
RUN = ["--max_steps", "6", "--eval_steps", "0", "--save_steps", "2", "--logging_steps", "2"]


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes name their data files relative to the repository root


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished pre-training folder with two checkpoints."""
    output_dir = tmp_path_factory.mktemp("finished") / "pretrain"
    result = subprocess.run(
        [sys.executable, "-m", "apex_hf.cli", "pretrain", "--config", str(TINY / "pretrain.yaml"), *RUN]
        + ["--output_dir", str(output_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture
def stage(finished, tmp_path) -> Path:
    """A copy of the finished folder to damage."""
    return Path(shutil.copytree(finished, tmp_path / "pretrain"))


@pytest.fixture
def partial(stage) -> Path:
    """A run that stopped after its step-4 checkpoint: no summary, no manifest, no final weights."""
    for name in (SUMMARY_FILE, MANIFEST_FILE, "model.safetensors", "README.md"):
        (stage / name).unlink()
    return stage


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in `folder`'s parent (hidden siblings and their files included)."""
    root = folder.parent
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`apex-hf ARGV` in this process: its exit status and its stderr (stdout is in `capsys.last_out`)."""
    try:
        status = cli.main(argv)
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    capsys.last_out = captured.out
    return status, captured.err


# --------------------------------------------------------------------------------------------------------------------
# damage


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def flip(path: Path, where: float = 0.5, count: int = 64) -> None:
    """Flip `count` bytes from the relative position `where`: the size stays, the contents do not."""
    data = bytearray(path.read_bytes())
    start = min(int(len(data) * where), len(data) - count)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_tensor(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path: Path, key: str, value) -> None:
    values = json.loads(path.read_text())
    values[key] = value
    path.write_text(json.dumps(values, indent=2))


def edit_recorded_hash(manifest: Path, name: str) -> None:
    values = json.loads(manifest.read_text())
    values["files"][name]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(values, indent=2))


# name: (what is damaged, relative to the folder; how; the text the message must hold)
STAGE_DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "weights truncated to half": ("model.safetensors", truncate, "model.safetensors has"),
    "weights truncated to nothing": ("model.safetensors", lambda p: truncate(p, 0.0), "model.safetensors has 0"),
    "weights lose their last byte": ("model.safetensors", lambda p: truncate(p, 0.99999), "model.safetensors has"),
    "weight bytes flipped (middle)": ("model.safetensors", flip, "model.safetensors is damaged"),
    "weight bytes flipped (end)": ("model.safetensors", lambda p: flip(p, 1.0), "model.safetensors is damaged"),
    "weights header flipped": ("model.safetensors", lambda p: flip(p, 0.0, 4), "model.safetensors is damaged"),
    "one weight byte flipped": ("model.safetensors", lambda p: flip(p, 0.7, 1), "model.safetensors is damaged"),
    "a tensor missing": ("model.safetensors", drop_tensor, "model.safetensors"),
    "weights missing": ("model.safetensors", Path.unlink, "model.safetensors is missing"),
    "config missing": ("config.json", Path.unlink, "config.json is missing"),
    "config mismatched (hidden_size)": (
        "config.json",
        lambda p: edit_json(p, "hidden_size", 96),
        "config.json",
    ),
    "config mismatched (vocab_size)": ("config.json", lambda p: edit_json(p, "vocab_size", 999), "config.json"),
    "config bytes flipped": ("config.json", lambda p: flip(p, 0.5, 2), "config.json is damaged"),
    "tokenizer truncated": ("tokenizer.json", truncate, "tokenizer.json has"),
    "tokenizer missing": ("tokenizer.json", Path.unlink, "tokenizer.json is missing"),
    "tokenizer bytes flipped": ("tokenizer.json", lambda p: flip(p, 0.5, 8), "tokenizer.json is damaged"),
    "tokenizer config edited": (
        "tokenizer_config.json",
        lambda p: edit_json(p, "eos_token", "<|bos|>"),
        "tokenizer_config.json",
    ),
    "model code edited": ("modeling_apex.py", lambda p: flip(p, 0.5, 1), "modeling_apex.py is damaged"),
    "model code missing": ("configuration_apex.py", Path.unlink, "configuration_apex.py is missing"),
    "log history edited": ("trainer_state.json", lambda p: edit_json(p, "global_step", 99), "trainer_state.json"),
    "summary edited": ("stage_summary.json", lambda p: edit_json(p, "eval_loss_after", 0.1), "stage_summary.json"),
    "model card edited": ("README.md", lambda p: p.write_text(p.read_text() + "x"), "README.md"),
    "an extra file": ("notes.txt", lambda p: p.write_text("mine"), "notes.txt is not in the manifest"),
    "an extra file in a subfolder": (
        "extra/weights.bin",
        lambda p: (p.parent.mkdir(), p.write_bytes(b"\0" * 8)),
        "extra/weights.bin is not in the manifest",
    ),
    "manifest missing": (MANIFEST_FILE, Path.unlink, "manifest.json is missing"),
    "manifest not JSON": (MANIFEST_FILE, lambda p: p.write_text("{"), "manifest.json is unreadable"),
    "manifest truncated": (MANIFEST_FILE, truncate, "manifest.json is unreadable"),
    "manifest without files": (MANIFEST_FILE, lambda p: p.write_text("{}"), "manifest.json is unreadable"),
    "manifest entry without hash": (
        MANIFEST_FILE,
        lambda p: edit_json(p, "files", {"config.json": {"size": 1}}),
        "manifest.json is unreadable",
    ),
    "manifest hash edited": (MANIFEST_FILE, lambda p: edit_recorded_hash(p, "config.json"), "config.json is damaged"),
    "manifest lists a file that is not there": (
        MANIFEST_FILE,
        lambda p: edit_json(p, "files", {**json.loads(p.read_text())["files"], "x.bin": {"size": 1, "sha256": ""}}),
        "x.bin is missing",
    ),
}

CHECKPOINT_DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "optimizer bytes flipped": ("optimizer.bin", flip, "optimizer.bin is damaged"),
    "optimizer truncated": ("optimizer.bin", truncate, "optimizer.bin has"),
    "optimizer missing": ("optimizer.bin", Path.unlink, "optimizer.bin is missing"),
    "weight bytes flipped": ("model.safetensors", flip, "model.safetensors is damaged"),
    "weights truncated": ("model.safetensors", truncate, "model.safetensors has"),
    "a tensor missing": ("model.safetensors", drop_tensor, "model.safetensors"),
    "RNG state flipped": ("random_states_0.pkl", lambda p: flip(p, 0.5, 4), "random_states_0.pkl is damaged"),
    "data position edited": ("data_state_0.json", lambda p: p.write_text(p.read_text() + " "), "data_state_0.json"),
    "step info edited": ("checkpoint.json", lambda p: edit_json(p, "step", 3), "checkpoint.json"),
    "manifest missing": (MANIFEST_FILE, Path.unlink, "manifest.json"),
}


@pytest.mark.parametrize("case", STAGE_DAMAGE, ids=str)
def test_verify_names_the_damaged_file_of_a_stage_folder(case, stage, capsys):
    name, damage, message = STAGE_DAMAGE[case]
    damage(stage / name)
    before = snapshot(stage)
    status, err = run_cli(["verify", str(stage)], capsys)
    assert status == 2 and message in err and str(stage) in err
    assert err.count("\n") == 1  # one line, no traceback
    with pytest.raises(DamagedFolder, match=message.replace(".", r"\.")):
        verify_folder(stage)
    assert snapshot(stage) == before


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE, ids=str)
def test_verify_names_the_damaged_file_of_a_checkpoint(case, stage, capsys):
    name, damage, message = CHECKPOINT_DAMAGE[case]
    checkpoint = stage / "checkpoint-4"
    damage(checkpoint / name)
    before = snapshot(stage)
    status, err = run_cli(["verify", str(checkpoint)], capsys)
    assert status == 2 and message in err and str(checkpoint) in err
    assert snapshot(stage) == before


def test_verify_passes_an_intact_folder_and_each_checkpoint(finished, capsys):
    for folder in (finished, finished / "checkpoint-2", finished / "checkpoint-4"):
        status, err = run_cli(["verify", str(folder)], capsys)
        assert status == 0 and not err and f"{folder}: intact" in capsys.last_out


def test_verify_passes_a_folder_as_the_hub_gives_it_back(stage, capsys):
    (stage / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (stage / ".cache" / "huggingface").mkdir(parents=True)
    (stage / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("abc\n")
    status, err = run_cli(["verify", str(stage)], capsys)
    assert status == 0, err


def test_verify_of_a_missing_folder_names_it(tmp_path, capsys):
    status, err = run_cli(["verify", str(tmp_path / "nowhere")], capsys)
    assert status == 2 and "nowhere is not a folder" in err


# --------------------------------------------------------------------------------------------------------------------
# resume


def pretrain_argv(output_dir: Path, *flags: str, steps: int = 6, config: Path = TINY / "pretrain.yaml") -> list[str]:
    run = ["--max_steps", str(steps), *RUN[2:]]
    return ["pretrain", "--config", str(config), *run, "--output_dir", str(output_dir), *flags]


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE, ids=str)
@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_resume_with_every_checkpoint_damaged_is_an_error_listing_each(command, case, partial, finished, capsys):
    name, damage, message = CHECKPOINT_DAMAGE[case]
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        damage(partial / checkpoint / name)
    before = snapshot(partial)
    if command == "pretrain":
        argv = pretrain_argv(partial, "--resume")
    else:  # the Trainer's checkpoints carry the same manifest; checked before the model is loaded
        argv = posttrain_argv("sft", partial, finished, "--resume")
    status, err = run_cli(argv, capsys)
    assert status == 2 and "no usable checkpoint" in err, err
    assert f"checkpoint-4: {message}" in err and f"checkpoint-2: {message}" in err
    assert "starting at step 0" not in err
    assert snapshot(partial) == before


def test_resume_when_no_intact_checkpoint_loads_is_an_error_not_a_fresh_start(partial, capsys):
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # damaged before it was hashed: the manifest matches
        (partial / checkpoint / "optimizer.bin").write_bytes(b"not a torch file")
        write_manifest(partial / checkpoint)
    before = snapshot(partial)
    status, err = run_cli(pretrain_argv(partial, "--resume"), capsys)
    assert status == 2 and f"none of the checkpoints in {partial} could be loaded" in err, err
    assert f"skipping {partial}/checkpoint-4: loading it failed" in capsys.last_out
    assert snapshot(partial) == before


def test_resume_into_a_partial_run_without_checkpoints_is_an_error(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    before = snapshot(folder)
    status, err = run_cli(pretrain_argv(folder, "--resume"), capsys)
    assert status == 2 and "no usable checkpoint" in err and "no checkpoint-<step> folder" in err
    assert snapshot(folder) == before


def test_resume_skips_a_damaged_newest_checkpoint_for_the_older_one(partial, capsys):
    flip(partial / "checkpoint-4" / "optimizer.bin")
    status, err = run_cli(pretrain_argv(partial, "--resume"), capsys)
    assert status == 0, err
    assert f"skipping {partial}/checkpoint-4: optimizer.bin is damaged" in capsys.last_out + err
    verify_folder(partial)
    assert json.loads((partial / SUMMARY_FILE).read_text())["resumed_from_step"] == 2


def test_a_trainer_stage_writes_manifests_and_resume_skips_its_damaged_newest_checkpoint(finished, tmp_path, capsys):
    out = tmp_path / "sft"
    steps = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    status, err = run_cli(posttrain_argv("sft", out, finished, *steps), capsys)
    assert status == 0, err
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        verify_folder(folder)
    for name in (SUMMARY_FILE, MANIFEST_FILE, "model.safetensors"):  # as if stopped after the step-2 checkpoint
        (out / name).unlink()
    flip(out / "checkpoint-2" / "optimizer.pt")
    status, err = run_cli(posttrain_argv("sft", out, finished, *steps, "--resume"), capsys)
    assert status == 0, err
    assert f"skipping {out}/checkpoint-2: optimizer.pt is damaged" in capsys.last_out
    verify_folder(out)


# --------------------------------------------------------------------------------------------------------------------
# occupied output folders


def posttrain_argv(stage: str, output_dir: Path, model: Path, *flags: str, file: str | None = None) -> list[str]:
    recipe = str(TINY / f"{file or stage}.yaml")
    return [stage, "--config", recipe, "--model.name_or_path", str(model), "--output_dir", str(output_dir), *flags]


# name: (argv for an output folder `out` and an input folder `source`; what `out` holds; the message)
RERUNS: dict[str, tuple[Callable[[Path, Path], list[str]], str, str]] = {
    "pretrain into a finished run": (lambda out, src: pretrain_argv(out), "finished", "--overwrite replaces it"),
    "pretrain into a partial run": (lambda out, src: pretrain_argv(out), "partial", "--resume continues it"),
    "pretrain --resume into a finished run": (
        lambda out, src: pretrain_argv(out, "--resume"),
        "finished",
        "no run to continue",
    ),
    "pretrain --resume into nothing": (
        lambda out, src: pretrain_argv(out, "--resume"),
        "nothing",
        "no run to continue",
    ),
    "pretrain --resume --overwrite": (
        lambda out, src: pretrain_argv(out, "--resume", "--overwrite"),
        "partial",
        "exclude each other",
    ),
    "pretrain into a file": (lambda out, src: pretrain_argv(out), "file", "is a file"),
    "sft into a finished run": (lambda out, src: posttrain_argv("sft", out, src), "finished", "finished run"),
    "sft into a partial run": (lambda out, src: posttrain_argv("sft", out, src), "partial", "partial run"),
    "sft --resume into a finished run": (
        lambda out, src: posttrain_argv("sft", out, src, "--resume"),
        "finished",
        "no run to continue",
    ),
    "dpo into a finished run": (lambda out, src: posttrain_argv("dpo", out, src), "finished", "finished run"),
    "grpo into a finished run": (lambda out, src: posttrain_argv("grpo", out, src), "finished", "finished run"),
    "the LoRA stage into a finished run": (
        lambda out, src: posttrain_argv("sft", out, src, file="lora"),
        "finished",
        "finished run",
    ),
    "the LoRA stage into a partial run": (
        lambda out, src: posttrain_argv("sft", out, src, file="lora"),
        "partial",
        "--resume continues it",
    ),
    "convert into a finished folder": (lambda out, src: ["convert", str(src), str(out)], "finished", "--overwrite"),
    "convert into a partial folder": (lambda out, src: ["convert", str(src), str(out)], "partial", "--overwrite"),
    "export into a finished folder": (
        lambda out, src: ["export", str(src), str(out), "--to", "llama"],
        "finished",
        "--overwrite",
    ),
    "upcycle into a finished folder": (
        lambda out, src: ["upcycle", str(src), str(out), "--experts", "4"],
        "finished",
        "--overwrite",
    ),
    "merge-lora into a finished folder": (
        lambda out, src: ["merge-lora", str(src / "adapter"), str(out)],
        "finished",
        "--overwrite",
    ),
    "merge-lora into a file": (lambda out, src: ["merge-lora", str(src / "adapter"), str(out)], "file", "is a file"),
    "convert into a folder with only .git": (lambda out, src: ["convert", str(src), str(out)], "git", ".git"),
}


def occupy(out: Path, finished: Path, holds: str) -> None:
    if holds == "finished":
        shutil.copytree(finished, out)
    elif holds == "partial":
        shutil.copytree(finished / "checkpoint-2", out / "checkpoint-2")
    elif holds == "file":
        out.write_text("not a folder")
    elif holds == "git":  # someone's clone: hidden, but not ours to replace
        (out / ".git").mkdir(parents=True)
        (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


@pytest.mark.parametrize("case", RERUNS, ids=str)
def test_a_command_refuses_an_occupied_output_folder(case, finished, tmp_path, capsys):
    argv, holds, message = RERUNS[case]
    out = tmp_path / "out"
    occupy(out, finished, holds)
    before = snapshot(out)
    started = time.perf_counter()
    status, err = run_cli(argv(out, finished), capsys)
    assert status == 2 and message in err and str(out) in err, err
    assert err.count("\n") == 1
    assert time.perf_counter() - started < 30  # refused before a model or a dataset is loaded
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["pipeline", "demo"])
@pytest.mark.parametrize("stage_name", ["pretrain", "grpo"])
def test_the_pipeline_and_the_demo_refuse_any_occupied_stage_folder(command, stage_name, finished, tmp_path, capsys):
    root = tmp_path / "run"
    occupy(root / stage_name, finished, "finished")
    before = snapshot(root / stage_name)
    if command == "pipeline":
        argv = ["pipeline", str(TINY / "pipeline.yaml"), "--output_dir", str(root)]
    else:
        import torch

        threads = str(torch.get_num_threads())  # the demo sets torch's thread count: keep this process's
        argv = ["demo", "--pipeline", str(TINY / "pipeline.yaml"), "--output-dir", str(root), "--threads", threads]
    status, err = run_cli(argv, capsys)
    assert status == 2 and f"{root / stage_name} already holds a finished run" in err, err
    assert snapshot(root / stage_name) == before


@pytest.mark.parametrize(
    "resume, overwrite, actions",
    [
        (True, False, ["skip", "resume", "run", "run", "run"]),
        (False, True, ["run"] * 5),
    ],
)
def test_the_pipeline_plans_each_stage_by_what_its_folder_holds(resume, overwrite, actions, finished, tmp_path):
    from apex_hf.pipeline import check_stage_folders, plan_pipeline

    root = tmp_path / "run"
    occupy(root / "pretrain", finished, "finished")
    occupy(root / "sft", finished, "partial")
    plan = plan_pipeline(TINY / "pipeline.yaml", ["--output_dir", str(root)])
    before = snapshot(root)
    assert check_stage_folders(plan, resume=resume, overwrite=overwrite) == actions
    assert snapshot(root) == before


def test_pipeline_resume_refuses_to_skip_a_damaged_finished_stage(finished, tmp_path, capsys):
    root = tmp_path / "run"
    occupy(root / "pretrain", finished, "finished")
    flip(root / "pretrain" / "model.safetensors")
    before = snapshot(root)
    status, err = run_cli(["pipeline", str(TINY / "pipeline.yaml"), "--output_dir", str(root), "--resume"], capsys)
    assert status == 2 and "model.safetensors is damaged" in err and str(root / "pretrain") in err
    assert snapshot(root) == before


# --------------------------------------------------------------------------------------------------------------------
# loaders of a previous stage's folder


def continue_recipe(folder: Path) -> Path:
    """A pre-training recipe continuing from `folder` (its model and tokenizer), next to it."""
    recipe = folder.with_name("continue.yaml")
    recipe.write_text(
        (TINY / "pretrain.yaml")
        .read_text()
        .replace("  preset: apex-tiny", f"  name_or_path: {folder}")
        .replace("  train_vocab_size: 512", "  {}")
    )
    return recipe


LOADER_DAMAGE = [
    "weight bytes flipped (middle)",
    "a tensor missing",
    "config mismatched (hidden_size)",
    "manifest missing",
]


@pytest.mark.parametrize("case", LOADER_DAMAGE, ids=str)
@pytest.mark.parametrize(
    "argv",
    [
        lambda out, src: posttrain_argv("sft", out, src),
        lambda out, src: pretrain_argv(out, config=continue_recipe(src)),
        lambda out, src: ["upcycle", str(src), str(out), "--experts", "4"],
        lambda out, src: ["merge-lora", str(src / "adapter"), str(out), "--base", str(src)],
    ],
    ids=["sft", "pretrain", "upcycle", "merge-lora"],
)
def test_a_stage_reading_a_damaged_folder_names_the_file(case, argv, stage, tmp_path, capsys):
    name, damage, message = STAGE_DAMAGE[case]
    damage(stage / name)
    if "merge-lora" in argv(tmp_path, stage):
        (stage / "adapter").mkdir()
        (stage / "adapter" / "adapter_config.json").write_text("{}")
    before = snapshot(stage)
    out = tmp_path / "new"
    status, err = run_cli(argv(out, stage), capsys)
    assert status == 2 and message in err and str(stage) in err, err
    assert snapshot(stage) == before and not out.exists()


def test_a_model_folder_from_elsewhere_without_a_manifest_is_not_checked(stage):
    for name in (MANIFEST_FILE, SUMMARY_FILE):
        (stage / name).unlink()
    check_model_folder(stage)  # a plain `save_pretrained` folder: nothing to check against
    (stage / SUMMARY_FILE).write_text("{}")
    with pytest.raises(DamagedFolder, match="manifest.json is missing"):
        check_model_folder(stage)  # a finished stage must have one


# --------------------------------------------------------------------------------------------------------------------
# --overwrite: the old folder is replaced only by a complete new one


@pytest.mark.parametrize("failing", ["write_summary", "write_model_card", "save"])
def test_a_failed_overwrite_leaves_the_old_run_exactly_as_it_was(failing, stage, monkeypatch):
    from apex_hf.pretrain import train

    def fail(*args, **kwargs):
        raise OSError(f"disk full in {failing}")

    monkeypatch.setattr(train, failing, fail)
    before = snapshot(stage)
    config = train.load_pretrain_config(TINY / "pretrain.yaml", [*RUN, "--output_dir", str(stage)])
    with pytest.raises(OSError, match=f"disk full in {failing}"):
        train.run_pretrain(config, overwrite=True)
    assert snapshot(stage) == before


def test_a_killed_overwrite_leaves_the_old_run_exactly_as_it_was(stage):
    before = {name: digest for name, digest in snapshot(stage).items() if not name.startswith(".")}
    argv = pretrain_argv(stage, "--overwrite", steps=400)  # long enough to be killed mid-run
    run = subprocess.Popen([sys.executable, "-m", "apex_hf.cli", *argv], cwd=REPO_ROOT, stderr=subprocess.PIPE)
    work = stage.with_name(f".{stage.name}.overwrite") / "checkpoint-2"
    deadline = time.monotonic() + 120
    while not work.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert work.exists(), "the new run trained somewhere other than next to the old folder"
    assert {name: digest for name, digest in snapshot(stage).items() if not name.startswith(".")} == before
    # the next run clears what the killed one left
    status = subprocess.run([sys.executable, "-m", "apex_hf.cli", *pretrain_argv(stage, "--overwrite")], cwd=REPO_ROOT)
    assert status.returncode == 0
    assert sorted(p.name for p in stage.parent.iterdir()) == ["pretrain"]
    verify_folder(stage)


def test_a_stopped_overwrite_leaves_the_old_run_and_says_it_was_discarded(stage):
    before = snapshot(stage)
    argv = pretrain_argv(stage, "--overwrite", steps=400)
    run = subprocess.Popen(
        [sys.executable, "-m", "apex_hf.cli", *argv], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    work = stage.with_name(f".{stage.name}.overwrite") / "checkpoint-2"
    deadline = time.monotonic() + 120
    while not work.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "the --overwrite run was discarded, the output folder is as it was" in stderr.decode()
    assert snapshot(stage) == before  # the old run whole, and nothing left beside it


def test_a_successful_overwrite_replaces_the_folder_whole(stage, capsys):
    (stage / "old-notes.txt").write_text("from the earlier run")
    status, err = run_cli(pretrain_argv(stage, "--overwrite", steps=2), capsys)
    assert status == 0, err
    assert not (stage / "old-notes.txt").exists() and not (stage / "checkpoint-4").exists()
    assert sorted(p.name for p in stage.parent.iterdir()) == ["pretrain"]
    verify_folder(stage)


@pytest.mark.parametrize("holds", ["nothing", "finished", "partial"])
def test_atomic_output_dir_keeps_the_old_folder_when_the_writer_fails(holds, finished, tmp_path):
    out = tmp_path / "out"
    occupy(out, finished, holds)
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_output_dir(out, overwrite=True) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert snapshot(out) == before


def test_atomic_output_dir_replaces_a_folder_only_when_complete(finished, tmp_path):
    out = tmp_path / "out"
    occupy(out, finished, "finished")
    with pytest.raises(OutputExists, match="already holds a finished run"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "weights.bin").write_bytes(b"new")
        assert (out / "model.safetensors").is_file()  # the old folder is still whole while the new one is written
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    verify_folder(out)


@pytest.mark.parametrize(
    "holds, resume, overwrite, error",
    [
        ("nothing", True, False, NothingToResume),
        ("finished", True, False, NothingToResume),
        ("finished", False, False, OutputExists),
        ("partial", False, False, OutputExists),
        ("partial", True, True, ValueError),
        ("file", False, True, OutputExists),
    ],
)
def test_check_output_dir_rule(holds, resume, overwrite, error, finished, tmp_path):
    out = tmp_path / "out"
    occupy(out, finished, holds)
    with pytest.raises(error, match=str(out)) if error is not ValueError else pytest.raises(error):
        check_output_dir(out, resume=resume, overwrite=overwrite)


def test_manifest_written_last_covers_every_file_but_checkpoints(tmp_path):
    folder = tmp_path / "folder"
    (folder / "checkpoint-3").mkdir(parents=True)
    (folder / "checkpoint-3" / "optimizer.bin").write_bytes(b"state")
    (folder / "sub").mkdir()
    (folder / "sub" / "a.bin").write_bytes(b"a" * 10_000_000)
    (folder / "b.json").write_text("{}")
    files = write_manifest(folder)["files"]
    assert sorted(files) == ["b.json", "sub/a.bin"]
    assert files["sub/a.bin"]["sha256"] == hashlib.sha256(b"a" * 10_000_000).hexdigest()
    verify_folder(folder)
