"""Writing output folders: a folder all at once (built next to its final place and renamed there, so it is either
complete or absent, never half-written), and the JSON files in them."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json(path: Path, value: Any) -> None:
    """Indented, one value per line; what JSON cannot hold (a path, a dtype) is written as its text."""
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def check_new_output_dir(output_dir: str | Path) -> Path:
    """`output_dir` as a Path; an error if it exists and is anything but an empty folder (nothing is overwritten)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} already exists and is not an empty folder; choose a new output folder")
    return output_dir


@contextmanager
def atomic_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a hidden staging folder next to `output_dir`; rename it to `output_dir` when the block ends cleanly,
    delete it when the block raises. Next to it, so the rename stays on one file system and is atomic."""
    output_dir = check_new_output_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        staging.replace(output_dir)  # also replaces an empty output_dir
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
