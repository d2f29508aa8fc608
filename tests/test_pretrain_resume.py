"""Pre-training fault tolerance: a run killed with SIGKILL and resumed logs the same losses as one that never stopped
(exactly: CPU arithmetic is deterministic, the stated tolerance is 1e-6), a truncated checkpoint is skipped, SIGTERM
ends in a checkpoint and exit code 143, a run never silently overwrites another's checkpoints, and checkpoints are
published in the background without losing an error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from apex_hf.pretrain import checkpoint as checkpoint_module
from apex_hf.pretrain import pretrain
from apex_hf.pretrain.checkpoint import (
    CheckpointPublisher,
    check_staging_room,
    move_staged,
    publish_checkpoint,
    save_checkpoint,
    staged_folder,
)
from apex_hf.stage_folder import first_manifest_problem, is_finished, read_log_history, read_summary, write_manifest


REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO_ROOT / "recipes" / "apex-tiny" / "pretrain.yaml"
# 120 steps of about 0.05 s: long enough to stop mid-run, short enough for the suite
RUN = ["--max_steps", "120", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "10"]
LOSS_TOLERANCE = 1e-6


def _command(output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "apex_hf.cli",
        "pretrain",
        "--config",
        str(TINY_RECIPE),
        *RUN,
        "--output_dir",
        str(output_dir),
        *extra,
    ]


def _env() -> dict[str, str]:
    """Every run compared here uses one thread: the thread count changes float summation order, so a resumed run on
    two threads drifts from a one-thread reference by ~1e-5 within a hundred steps."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(output_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(output_dir, *extra),
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120, gone: Path | None = None) -> None:
    """Until `path` exists (and `gone`, if given, no longer does)."""
    deadline = time.monotonic() + timeout
    while not path.exists() or (gone is not None and gone.exists()):
        assert process.poll() is None, f"the run ended before {path} appeared: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear (or {gone} did not go) in {timeout}s"
        time.sleep(0.02)


def _losses(output_dir: Path) -> dict[int, float]:
    history = read_log_history(output_dir)
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def _checkpoints(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    """The reference run, in a subprocess like the others (`_env`)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    run = _start(output_dir)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    return _losses(output_dir)


def test_sigkill_resume_matches_an_uninterrupted_run_and_skips_a_truncated_checkpoint(tmp_path, uninterrupted):
    output_dir = tmp_path / "out"
    run = _start(output_dir, "--save_total_limit", "2")
    # save_total_limit: checkpoint-10 goes once checkpoint-30 is whole (a save is published first, then the oldest
    # removed, so a kill between the two leaves one extra checkpoint, never too few)
    _wait_for(output_dir / "checkpoint-30", run, gone=output_dir / "checkpoint-10")
    run.send_signal(signal.SIGKILL)
    run.wait()
    kept = _checkpoints(output_dir)
    assert 10 not in kept and 2 <= len(kept) <= 3 and kept[-1] >= 30, kept
    newest, older = kept[-1], kept[-2]
    weights = output_dir / f"checkpoint-{newest}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk that lost the end of a file
    (output_dir / f".checkpoint-{newest + 10}.partial").mkdir()  # a save the kill interrupted

    resumed = subprocess.run(
        _command(output_dir, "--resume"), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert f"skipping {output_dir}/checkpoint-{newest}: model.safetensors has" in output
    assert f"resumed from {output_dir}/checkpoint-{older} at step {older}" in output

    losses = _losses(output_dir)
    assert sorted(losses) == sorted(uninterrupted)  # the log history runs from step 1, without gaps or repeats
    for step, loss in uninterrupted.items():
        assert losses[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step
    summary = read_summary(output_dir)
    assert summary["resumed_from_step"] == older


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path, uninterrupted):
    """Through a staging folder (`checkpoint_staging_dir`): the checkpoints it stages resume exactly, and none is
    left in it."""
    output_dir, staging = tmp_path / "out", tmp_path / "staging"
    staging.mkdir()
    run = _start(output_dir, "--checkpoint_staging_dir", str(staging))
    _wait_for(output_dir / "checkpoint-10", run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = _checkpoints(output_dir)[-1]
    assert f"stopped by SIGTERM after step {stopped_at}" in stderr
    assert 10 <= stopped_at < 120 and not is_finished(output_dir)
    info = json.loads((output_dir / f"checkpoint-{stopped_at}" / "checkpoint.json").read_text())
    manifest = json.loads((output_dir / f"checkpoint-{stopped_at}" / "manifest.json").read_text())
    assert info["step"] == stopped_at and len(manifest["files"]["optimizer.bin"]["sha256"]) == 64

    with pytest.raises(FileExistsError, match="holds a partial run .*--resume continues it"):  # no restart over it
        pretrain(TINY_RECIPE, [*RUN, "--output_dir", str(output_dir)])
    resumed = _start(output_dir, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    losses = _losses(output_dir)
    assert losses[120] == pytest.approx(uninterrupted[120], abs=LOSS_TOLERANCE)
    assert sorted(losses) == sorted(uninterrupted)
    assert list(staging.iterdir()) == []


def test_resume_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ValueError, match="cannot resume from it: no such folder"):
        pretrain(TINY_RECIPE, ["--output_dir", str(tmp_path / "a"), "--resume_from_checkpoint", str(tmp_path / "x")])
    foreign = tmp_path / "b" / "checkpoint-5"
    foreign.mkdir(parents=True)
    with pytest.raises(ValueError, match="manifest.json is missing"):
        pretrain(TINY_RECIPE, ["--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", str(foreign)])
    (foreign / "checkpoint.json").write_text(json.dumps({"step": 5, "num_processes": 4}))
    write_manifest(foreign)
    with pytest.raises(ValueError, match="written by 4 processes; resume it with as many"):
        pretrain(TINY_RECIPE, ["--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])


def _save(
    output_dir: Path,
    step: int,
    tokenizer,
    publisher: CheckpointPublisher | None,
    total_limit: int | None = None,
    staging_dir: Path | None = None,
):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    trainer_state = {"log_history": []}
    return save_checkpoint(
        accelerator, output_dir, step, {}, trainer_state, tokenizer, total_limit, publisher, staging_dir
    )


def test_checkpoints_are_published_in_the_background_and_their_errors_raised(tmp_path, monkeypatch, tiny_tokenizer):
    """Writing the state returns at once; the manifest, the flush, the rename and the rotation follow in the
    background, one checkpoint at a time; an error there is raised by the next `wait` (the loop's next checkpoint,
    stop or end), never lost."""
    publisher, released = CheckpointPublisher(), threading.Event()

    def publish_when_released(partial, final, total_limit):
        assert released.wait(timeout=60)
        publish_checkpoint(partial, final, total_limit)

    monkeypatch.setattr(checkpoint_module, "publish_checkpoint", publish_when_released)
    first = _save(tmp_path, 10, tiny_tokenizer, publisher)
    assert publisher.busy and not first.exists() and (tmp_path / ".checkpoint-10.partial").is_dir()
    released.set()
    second = _save(tmp_path, 20, tiny_tokenizer, publisher, total_limit=1)  # waits for the first before writing
    publisher.wait()
    assert not publisher.busy and not first.exists() and first_manifest_problem(second) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20"]

    def fail(partial, final, total_limit):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "publish_checkpoint", fail)
    _save(tmp_path, 30, tiny_tokenizer, publisher)
    with pytest.raises(OSError, match="No space left"):
        publisher.wait()
    assert (tmp_path / ".checkpoint-30.partial").is_dir() and not (tmp_path / "checkpoint-30").exists()


@pytest.fixture
def host_memory_folder(tmp_path):
    """A folder in /dev/shm where there is one (another file system than tmp_path's, so the move copies), else in
    tmp_path."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    folder = Path(tempfile.mkdtemp(dir=root))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_staged_checkpoint_is_moved_to_the_disk_in_the_background(
    tmp_path, monkeypatch, tiny_tokenizer, host_memory_folder
):
    """With a staging folder, the state is written there and the publisher moves it next to the run, where it holds
    the same files and bytes as one written in place; the staging folder is left empty."""
    staging, publisher, released = host_memory_folder, CheckpointPublisher(), threading.Event()

    def move_when_released(written, partial):
        assert released.wait(timeout=60)
        move_staged(written, partial)

    monkeypatch.setattr(checkpoint_module, "move_staged", move_when_released)
    staged = _save(tmp_path / "staged", 10, tiny_tokenizer, publisher, staging_dir=staging)
    assert publisher.busy and not (tmp_path / "staged" / ".checkpoint-10.partial").exists()
    written = staged_folder(staging, staged.with_name(".checkpoint-10.partial"))
    assert list(staging.iterdir()) == [written] and (written / "optimizer.bin").is_file()
    released.set()
    publisher.wait()
    in_place = _save(tmp_path / "in_place", 10, tiny_tokenizer, publisher=None)  # written in place, at once
    assert list(staging.iterdir()) == [] and first_manifest_problem(staged) is None
    manifests = [json.loads((folder / "manifest.json").read_text())["files"] for folder in (staged, in_place)]
    assert manifests[0] == manifests[1]


def test_the_staging_folder_is_refused_without_room_or_across_machines(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    with pytest.raises(ValueError, match=r"checkpoint_staging_dir='.*' has .* GiB free, .* about 1048576.0 GiB"):
        check_staging_room(tmp_path, 2**50, accelerator)
    check_staging_room(tmp_path, 1, accelerator)
    monkeypatch.setattr(Accelerator, "num_processes", 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="works on one machine; this run spans 2"):
        check_staging_room(tmp_path, 1, accelerator)


def test_a_failing_run_finishes_publishing_its_checkpoint_first(tmp_path, monkeypatch):
    """A run that fails after a checkpoint leaves that checkpoint published and intact, to resume from, even while
    its publishing is slow."""
    from apex_hf.pretrain.train import PretrainRun

    def slow_publish(partial, final, total_limit):
        time.sleep(2)
        publish_checkpoint(partial, final, total_limit)

    def fail_after_step_7(self, step, stop):
        if step == 7:
            raise RuntimeError("the GPU fell off the bus")
        return between_steps(self, step, stop)

    between_steps = PretrainRun.between_steps
    monkeypatch.setattr(checkpoint_module, "publish_checkpoint", slow_publish)
    monkeypatch.setattr(PretrainRun, "between_steps", fail_after_step_7)
    monkeypatch.chdir(REPO_ROOT)
    output_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="fell off the bus"):
        pretrain(TINY_RECIPE, [*RUN, "--save_steps", "5", "--output_dir", str(output_dir)])
    assert _checkpoints(output_dir) == [5] and first_manifest_problem(output_dir / "checkpoint-5") is None
