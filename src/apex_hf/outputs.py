"""Writing output folders: the rule for a folder that already holds something (`check_output_dir`), a folder written
all at once (built next to its final place and renamed there, so it is either complete or absent, never
half-written), a training run's folders (`RunFolder`), and the JSON files in them.

What a command does with its output folder, by what the folder holds and the flag given:

| the folder holds                              | no flag | `--resume`        | `--overwrite`             |
|-----------------------------------------------|---------|-------------------|---------------------------|
| nothing (absent or empty)                     | write   | error             | write                     |
| a partial run (checkpoints, no summary)       | error   | continue it       | replace it (see below)    |
| a finished run or model (summary or manifest) | error   | error             | replace it (see below)    |

`--overwrite` replaces the old folder only once the new one is complete: a run that fails or is killed leaves it as
it was.

Every error names the folder, what it holds and the flag to use. `--resume` exists where resuming makes sense
(pre-training and the trainer stages); `apex-hf pipeline --resume` has its own rule (`apex_hf.pipeline`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .stage_folder import MANIFEST_FILE, SUMMARY_FILE, NothingToResume, write_manifest


class Holds(Enum):
    """What an output folder holds, for `check_output_dir`."""

    NOTHING = "nothing"
    PARTIAL = "a partial run"
    FINISHED = "a finished run"


class OutputExists(FileExistsError):
    """The output folder holds work the command would overwrite, and no flag said what to do with it."""


def folder_holds(folder: str | Path) -> tuple[Holds, str]:
    """What `folder` holds and, for the error messages, in words."""

    folder = Path(folder)
    if not folder.exists():
        return Holds.NOTHING, "nothing"
    if not folder.is_dir():
        return Holds.FINISHED, "a file, not a folder"
    # a checkpoint being saved or deleted is part of a run; any other hidden entry (`.git`) is someone's work
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".checkpoint-"))
    if not entries:
        return Holds.NOTHING, "nothing"
    if SUMMARY_FILE in entries:
        return Holds.FINISHED, f"a finished run ({SUMMARY_FILE})"
    if MANIFEST_FILE in entries:
        return Holds.FINISHED, f"a finished model folder ({MANIFEST_FILE})"
    checkpoints = [name for name in entries if name.startswith("checkpoint-")]
    if checkpoints:
        return Holds.PARTIAL, f"a partial run (checkpoints {', '.join(checkpoints)}; no {SUMMARY_FILE})"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return Holds.PARTIAL, f"a partial run or other files ({shown}; no {SUMMARY_FILE})"


def check_output_dir(
    output_dir: str | Path, resume: bool = False, overwrite: bool = False, resumable: bool = True
) -> Holds:
    """The rule of the module docstring's table, checked before anything is loaded: returns what `output_dir` holds
    when the command may go on, raises `OutputExists` or `NothingToResume` naming the folder and the flag otherwise.
    Commands without `--resume` pass `resumable=False` (the message then offers `--overwrite` alone)."""
    output_dir = Path(output_dir)
    holds, words = folder_holds(output_dir)
    if resume and overwrite:
        raise ValueError(f"--resume and --overwrite exclude each other: continue the run in {output_dir} or redo it")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExists(f"{output_dir} is a file, not a folder; choose another output folder")
    if resume and holds is not Holds.PARTIAL:
        hint = "; --overwrite trains it again" if holds is Holds.FINISHED else "; run without --resume to start"
        raise NothingToResume(f"--resume: {output_dir} holds {words}, no run to continue{hint}")
    if holds is Holds.NOTHING or overwrite or resume:  # resume: a partial run, checked above
        return holds
    flags = "--overwrite replaces it"
    if holds is Holds.PARTIAL and resumable:
        flags = "--resume continues it, " + flags
    raise OutputExists(f"{output_dir} already holds {words}; {flags} (or choose another output folder)")


def check_new_output_dir(output_dir: str | Path, overwrite: bool = False) -> Path:
    """`output_dir` as a Path, checked by `check_output_dir` for a command that cannot resume."""
    check_output_dir(output_dir, overwrite=overwrite, resumable=False)
    return Path(output_dir)


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`. An absent or empty `target` is replaced in one rename; a full one
    is first renamed aside and deleted only once `new` is in place, so its contents are never half-deleted."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        new.replace(target)
        return
    # a crash between the two renames leaves the old folder whole under this name, never half of it
    old = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
    target.replace(old)
    new.replace(target)
    shutil.rmtree(old)


@contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden staging folder next to `output_dir`; when the block ends cleanly, write its manifest and put it
    at `output_dir` (`replace_folder`); delete it when the block raises, leaving `output_dir` as it was. Next to it,
    so that the renames stay on one file system and are atomic."""

    output_dir = check_new_output_dir(output_dir, overwrite=overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        write_manifest(staging)
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_main_process() -> bool:
    """Rank 0 of a `torchrun` / `accelerate launch` job (or a single process): the one that moves folders."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class RunFolder:
    """The folders of one training run. `work` holds its checkpoints while it trains: `final` itself for a new or
    resumed run, a hidden sibling with `--overwrite` (so that the old run stays whole until the new one is done).
    The finished stage's files are written to `staging` and then `publish`ed. Names are fixed rather than random:
    every process of a multi-process run must find the same folders."""

    final: Path
    work: Path

    @property
    def staging(self) -> Path:
        return self.final.with_name(f".{self.final.name}.staging")

    @classmethod
    def open(cls, output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> RunFolder:
        """Check `output_dir` (`check_output_dir`), choose the work folder, and clear what an earlier failed run
        left in the hidden ones."""
        final = Path(output_dir)
        holds = check_output_dir(final, resume=resume, overwrite=overwrite)
        work = final.with_name(f".{final.name}.overwrite") if holds is not Holds.NOTHING and overwrite else final
        folder = cls(final, work)
        if is_main_process():
            for leftover in {folder.staging, work} - {final}:
                shutil.rmtree(leftover, ignore_errors=True)
        return folder

    def new_staging(self) -> Path:
        """An empty staging folder (main process)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def publish(self) -> None:
        """Move the staged files into `work` (the summary last among them), write the manifest, and for
        `--overwrite` put `work` in place of `final`. Main process only, once every process has saved. A crash
        before the summary is moved leaves a partial run, never a finished-looking one."""

        self.work.mkdir(parents=True, exist_ok=True)
        staged = sorted(self.staging.iterdir(), key=lambda path: path.name == SUMMARY_FILE)
        for path in staged:
            destination = self.work / path.name
            if destination.is_dir():
                shutil.rmtree(destination)
            path.replace(destination)
        self.staging.rmdir()
        write_manifest(self.work)
        if self.work != self.final:
            replace_folder(self.work, self.final)

    def discard(self) -> None:
        """After a failure: delete the staging folder and an `--overwrite` run's work folder; `final` stays as it
        was (a new or resumed run's checkpoints stay too: they are what `--resume` continues from)."""
        if is_main_process():
            for folder in {self.staging, self.work} - {self.final}:
                shutil.rmtree(folder, ignore_errors=True)
