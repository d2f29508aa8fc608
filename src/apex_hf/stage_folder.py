"""The stage folder: what a training stage leaves in its `output_dir`, and what the next stage, the pipeline, the demo
and the scripts read from it.

A finished stage folder holds a complete model (weights, tokenizer with chat template, model code), a model card
(`README.md`), `trainer_state.json` (the log history, in the shape transformers' Trainer writes it, so that tools
which read Trainer logs read it) and `stage_summary.json`. The summary is written once everything else is there: a
folder that has one is a finished stage; `manifest.json` (below) follows it. The `checkpoint-<step>` folders a stage
writes on the way hold a `trainer_state.json` and a manifest too.

Standard library only, so that the scripts which read the results start without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


class NothingToResume(ValueError):
    """`--resume` named a folder with no run to continue."""


def write_json(path: Path, value: Any) -> None:
    """Indented, one value per line; what JSON cannot hold (a path, a dtype) is written as its text."""
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


SUMMARY_FILE = "stage_summary.json"
STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: TRL's stages write it through their Trainer


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """The stage's summary: written last, once everything else is in the folder."""
    write_json(folder / SUMMARY_FILE, summary)


def read_summary(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / SUMMARY_FILE).read_text())


def is_finished(folder: str | Path) -> bool:
    return (Path(folder) / SUMMARY_FILE).is_file()


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    write_json(folder / STATE_FILE, state)


def read_trainer_state(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def read_log_history(folder: str | Path) -> list[dict[str, Any]]:
    """Every log entry of the run (or checkpoint) in order: `{"step", "loss", ...}`, `{"step", "eval_loss", ...}`."""
    return read_trainer_state(folder)["log_history"]


# --------------------------------------------------------------------------------------------------------------------
# The manifest: `manifest.json` lists every file of a checkpoint or stage folder with its size and SHA-256, and is
# written last, so that a folder with a manifest was complete when it was written and any later damage (a truncated
# file, flipped bytes, a file deleted or added) is found by hashing it again. This module alone reads and writes it.

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
HASH_CHUNK = 8 << 20  # stream files in 8 MiB chunks: memory stays flat for any file size
CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+")  # a stage folder's checkpoints carry their own manifests


class DamagedFolder(ValueError):
    """A folder whose manifest is missing or does not match its files; the message names the file."""


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    """The files a manifest covers: every file under `folder` but those `_unlisted` leaves out."""
    names = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not _unlisted(relative.parts[0]):
            names.append(relative.as_posix())
    return sorted(names)


def _unlisted(top: str) -> bool:
    """Top-level entries a manifest leaves out: itself, the `checkpoint-<step>` folders (they come and go while a run
    trains, and each has its own manifest) and hidden entries (a checkpoint being saved, and what the Hub adds to a
    folder pushed and downloaded again: `.gitattributes`, `--local-dir`'s `.cache`)."""
    return top == MANIFEST_FILE or bool(CHECKPOINT_FOLDER.fullmatch(top)) or top.startswith(".")


def _hash_files(folder: Path, names: list[str]) -> list[str]:
    # hashlib releases the GIL on large buffers: files hash in parallel, so a sharded state costs about one pass
    # over its largest shards rather than over all of them
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_hash_file, [folder / name for name in names]))


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Hash every file of `folder` and write `manifest.json`; call it once the folder is otherwise complete."""
    folder = Path(folder)
    names = _listed_files(folder)
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": digest}
        for name, digest in zip(names, _hash_files(folder, names))
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_manifest(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The manifest's files, `{name: {"size", "sha256"}}`; `DamagedFolder` (naming the file relative to `folder`)
    when it is missing or unreadable."""
    path = Path(folder) / MANIFEST_FILE
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(entry, dict) and {"size", "sha256"} <= entry.keys() for entry in files.values()):
            raise ValueError("an entry lacks size or sha256")
    except FileNotFoundError:
        raise DamagedFolder(
            f"{MANIFEST_FILE} is missing (the folder was not finished, or not written by apex-hf)"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedFolder(f"{MANIFEST_FILE} is unreadable ({error})") from None
    return files


def manifest_problems(folder: str | Path) -> list[str]:
    """What is wrong with `folder` against its manifest, one line per file named relative to `folder` (missing,
    wrong size, wrong SHA-256, not listed); empty when it is intact. Sizes are compared first: a truncated file
    costs no hashing."""
    folder = Path(folder)
    try:
        files = read_manifest(folder)
    except DamagedFolder as error:
        return [str(error)]
    problems, to_hash = [], []
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
        else:
            to_hash.append(name)
    for name, digest in zip(to_hash, _hash_files(folder, to_hash)):
        if digest != files[name]["sha256"]:
            problems.append(f"{name} is damaged (its SHA-256 differs from the manifest)")
    problems += [
        f"{name} is not in the manifest (an extra file)" for name in _listed_files(folder) if name not in files
    ]
    return problems


def verify_folder(folder: str | Path) -> None:
    """Raise `DamagedFolder` naming the first damaged, missing or unlisted file of `folder`."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    problems = manifest_problems(folder)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DamagedFolder(f"{folder}: {problems[0]}{more}")


def check_model_folder(name_or_path: str | Path) -> None:
    """Before a stage, the pipeline or a conversion loads a model: a local folder with a manifest must match it, and a
    finished stage folder must have one. A Hub id, or a model folder from elsewhere without either, is not checked."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return
    if has_manifest(folder) or is_finished(folder):
        verify_folder(folder)


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, newest first."""
    output_dir = Path(output_dir)
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_FOLDER.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def first_manifest_problem(folder: Path) -> str | None:
    """The first file of `folder` that does not match its manifest (and how many more), or None if it is intact."""
    problems = manifest_problems(folder)
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def intact_checkpoints(
    output_dir: str | Path,
    say: Callable[[str], None],
    problem_of: Callable[[Path], str | None] = first_manifest_problem,
) -> Iterator[Path]:
    """The checkpoints of `output_dir` without a problem (`problem_of`), newest first, checked one at a time as they
    are asked for; says why each one in between is skipped. When none is intact: `NothingToResume`, listing every
    checkpoint and why it was rejected, never a silent fresh start."""
    rejected, any_intact = [], False
    for folder in checkpoint_folders(output_dir):
        problem = problem_of(folder)
        if problem:
            say(f"skipping {folder}: {problem}")
            rejected.append(f"{folder.name}: {problem}")
            continue
        any_intact = True
        yield folder
    if not any_intact:
        found = "; ".join(rejected) if rejected else "no checkpoint-<step> folder"
        raise NothingToResume(f"--resume: no usable checkpoint in {output_dir} (found {found})")
