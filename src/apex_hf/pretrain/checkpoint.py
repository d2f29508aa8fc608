"""Fault tolerance: atomic, resumable checkpoints, and a clean stop on SIGTERM.

A `checkpoint-<step>` folder holds what a run needs to go on as if it had never stopped: Accelerate's `save_state`
(model weights, optimizer, the learning-rate scheduler, every process's RNG states; FSDP and DeepSpeed shards in their
own formats), each process's data position (`data_state_<rank>.json`), the log history (`trainer_state.json`) and the
tokenizer, `checkpoint.json` (the step and the number of processes). It is written as `.checkpoint-<step>.partial`
and renamed once complete, with its manifest (`apex_hf.stage_folder`: every file's size and SHA-256) written last, so
a folder named `checkpoint-<step>` is never half-written. A crash while renaming or a disk that lost data can still
leave a damaged folder: `find_checkpoints` checks every file against the manifest (a truncated file, flipped bytes
in the weights or the optimizer state, a missing file) and skips a damaged checkpoint for the newest intact one;
`restore_checkpoint` also falls back to an older checkpoint when loading one fails.

Only writing the state holds up training. Hashing the files (one core's SHA-256 takes about 13 s for bench-moe's 21 GB
optimizer state), flushing them to disk, the rename and the rotation need nothing but the files, and a
`CheckpointPublisher` does them in a background thread while the next steps run, as torchtitan's asynchronous
checkpointing does. A run killed before the rename leaves only `.checkpoint-<step>.partial`, which resuming ignores.

Writing the state itself is bound by the disk: bench-moe's 31 GB took 40 s on an H100 machine, steps stopped. With
`checkpoint_staging_dir` (a folder in host memory, such as /dev/shm) the state is written there instead, at memory
speed, and the publisher first moves it to `.checkpoint-<step>.partial` on the disk, beside the steps: torchtitan's
asynchronous checkpointing stages to host memory for the same reason. The manifest, the rename and what a crash
leaves are as without it (a crash mid-move leaves a `.partial` folder and the staged copy, which the next save of that
checkpoint replaces).

These checkpoints are for resuming (`resume_from_checkpoint: latest`); the model to use is the final folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

from ..stage_folder import (
    checkpoint_folders,
    first_manifest_problem,
    intact_checkpoints,
    read_trainer_state,
    write_json,
    write_manifest,
    write_trainer_state,
)


CHECKPOINT_INFO = "checkpoint.json"  # the step and the number of processes; the files are in the manifest


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk, so the rename publishes durable data."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(path)


class CheckpointPublisher:
    """Publishes checkpoints in a background thread, one at a time (`publish_checkpoint`). `wait()` returns once the
    one in flight is published, and raises its error if it failed; the training loop waits before the next
    checkpoint, before stopping and at the end, so no error goes unseen and no two checkpoints compete for the disk."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-publisher")
        self._in_flight: Future | None = None
        self.seconds = 0.0  # spent publishing, beside the training steps

    def submit(self, written: Path, partial: Path, final: Path, total_limit: int | None) -> None:
        self.wait()
        self._in_flight = self._executor.submit(self._publish, written, partial, final, total_limit)

    def _publish(self, written: Path, partial: Path, final: Path, total_limit: int | None) -> None:
        started = time.perf_counter()
        try:
            move_staged(written, partial)
            publish_checkpoint(partial, final, total_limit)
        finally:
            self.seconds += time.perf_counter() - started

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def wait(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()


def publish_checkpoint(partial: Path, final: Path, total_limit: int | None) -> None:
    """The manifest (last: a checkpoint with a manifest was complete), the files flushed to disk, the rename to
    `final`, then the oldest checkpoints beyond `total_limit` deleted."""
    write_manifest(partial)
    _fsync_tree(partial)
    if final.exists():  # this step was saved before (a run resumed from it and stopped again at once)
        _delete(final)
    os.replace(partial, final)
    if total_limit is not None:
        for old in checkpoint_folders(final.parent)[total_limit:]:
            _delete(old)


def staged_folder(staging_dir: Path, partial: Path) -> Path:
    """Where `partial`'s state is written in `staging_dir`: named for its absolute path, the same name on every
    process, and different for two runs that share the staging folder."""
    key = hashlib.sha256(str(partial.resolve()).encode()).hexdigest()[:16]
    return staging_dir / f"apex-hf-{key}"


def move_staged(written: Path, partial: Path) -> None:
    """A checkpoint written in the staging folder moved to `partial` on the disk (copied, then the staged copy
    deleted, when they are different file systems); nothing to do for one written in place."""
    if written != partial:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(written, partial)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    data_state: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer,
    total_limit: int | None = None,
    publisher: CheckpointPublisher | None = None,
    staging_dir: Path | None = None,
) -> Path:
    """Write the state for `output_dir/checkpoint-<step>`; every process calls it (saving sharded state is
    collective), into `.checkpoint-<step>.partial` or, given `staging_dir`, into host memory. The main process then
    publishes it (`move_staged`, `publish_checkpoint`): before returning, or through `publisher` in the background,
    in which case the folder appears later. Returns the folder's name."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    written = partial if staging_dir is None else staged_folder(staging_dir, partial)
    if accelerator.is_main_process:
        if publisher is not None:
            publisher.wait()
        for leftover in {partial, written}:  # left by a run that died while saving
            shutil.rmtree(leftover, ignore_errors=True)
        written.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(written))
    write_json(written / f"data_state_{accelerator.process_index}.json", data_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokenizer.save_pretrained(written)
        write_trainer_state(written, trainer_state)
        write_json(written / CHECKPOINT_INFO, {"step": step, "num_processes": accelerator.num_processes})
        if publisher is None:
            move_staged(written, partial)
            publish_checkpoint(partial, final, total_limit)
        else:
            publisher.submit(written, partial, final, total_limit)
    accelerator.wait_for_everyone()
    return final


def check_staging_room(staging_dir: Path, state_bytes: int, accelerator: Accelerator) -> None:
    """Refuse `checkpoint_staging_dir` before training where a checkpoint could not be staged: across machines (each
    would stage in its own memory, and only the main process moves the files) or without room for `state_bytes`."""
    machines = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    if machines > 1:
        raise ValueError(
            f"checkpoint_staging_dir={str(staging_dir)!r} works on one machine; this run spans {machines}: "
            "leave it out (checkpoints are then written to output_dir directly)"
        )
    free = shutil.disk_usage(staging_dir).free
    if free < state_bytes:
        raise ValueError(
            f"checkpoint_staging_dir={str(staging_dir)!r} has {free / 2**30:.1f} GiB free, and a checkpoint of this "
            f"model and optimizer takes about {state_bytes / 2**30:.1f} GiB: choose a larger folder (in host memory, "
            "such as /dev/shm), or leave it out"
        )


def _delete(folder: Path) -> None:
    """Rename first: a crash during the slow delete must not leave a damaged folder under a checkpoint's name."""
    doomed = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def check_checkpoint(folder: Path, num_processes: int) -> str | None:
    """Why `folder` cannot be resumed from (its first damaged file), or None if it is intact."""
    problem = first_manifest_problem(folder)
    if problem:
        return problem
    try:
        manifest = json.loads((folder / CHECKPOINT_INFO).read_text())
        step = manifest["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"no readable {CHECKPOINT_INFO} ({error})"
    if manifest["num_processes"] != num_processes:
        raise ValueError(
            f"{folder} (step {step}) was written by {manifest['num_processes']} processes; resume it with as many "
            f"(this run has {num_processes})"
        )
    return None


def find_checkpoints(output_dir: Path, requested: str, num_processes: int, say) -> list[Path]:
    """Checkpoints to try, best first: `requested` itself (a folder, which must be complete), or for "latest" every
    complete `checkpoint-<step>` of `output_dir`, newest first, after saying why each damaged one is skipped. None at
    all is `NothingToResume`, listing what was found and why each was rejected: never a silent fresh start."""
    if requested != "latest":
        folder = Path(requested)
        problem = check_checkpoint(folder, num_processes) if folder.is_dir() else "no such folder"
        if problem:
            raise ValueError(f"resume_from_checkpoint={requested!r}: cannot resume from it: {problem}")
        return [folder]
    return list(intact_checkpoints(output_dir, say, lambda folder: check_checkpoint(folder, num_processes)))


def restore_checkpoint(accelerator: Accelerator, candidates: list[Path], say) -> tuple[Path, dict, dict] | None:
    """Restore the first candidate every process can load: `(folder, trainer_state, data_state)`, or None when none
    loads. The processes agree on each attempt, so that all of them continue from the same step."""
    for folder in candidates:
        error = None
        try:
            accelerator.load_state(str(folder))
            trainer_state = read_trainer_state(folder)
            data_state = json.loads((folder / f"data_state_{accelerator.process_index}.json").read_text())
        except Exception as caught:  # a damaged file surfaces as whatever its reader raises
            error = caught
        failed = torch.tensor([float(error is not None)], device=accelerator.device)
        if accelerator.reduce(failed, "sum").item() == 0:
            return folder, trainer_state, data_state
        say(f"skipping {folder}: loading it failed ({error or 'on another process'})")
    return None


class StopRequest:
    """SIGTERM (a scheduler's preemption notice, `kill`, torchrun passing one on) asks the run to stop after the
    current optimizer step, with a checkpoint. Every process must stop at the same step, because saving is
    collective, so `agreed()` sums the processes' flags, over a CPU (gloo) group: it does not wait on the GPU. A
    context manager: the previous handler is back on exit."""

    def __init__(self, accelerator: Accelerator):
        self.requested = False
        self._group = None
        if accelerator.num_processes > 1:
            self._group = dist.new_group(backend="gloo")
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        if self._group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, group=self._group)
        return bool(flag.item())

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class TrainingStopped(RuntimeError):
    """Raised after the checkpoint that a SIGTERM asked for is written. An `--overwrite` run is not resumable (its
    work folder is discarded, the old folder stays as it was), and says so."""

    def __init__(self, step: int, checkpoint: Path, resumable: bool = True):
        then = (
            f"saved {checkpoint}. Run again with --resume to continue."
            if resumable
            else "the --overwrite run was discarded, the output folder is as it was; run it again to replace it."
        )
        super().__init__(f"stopped by SIGTERM after step {step}; {then}")
        self.step, self.checkpoint = step, checkpoint
