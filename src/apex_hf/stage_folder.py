"""The stage folder: what a training stage leaves in its `output_dir`, and what the next stage, the pipeline, the demo
and the scripts read from it.

A finished stage folder holds a complete model (weights, tokenizer with chat template, model code), a model card
(`README.md`), `trainer_state.json` (the log history, in the shape transformers' Trainer writes it, so that tools
which read Trainer logs read it) and `stage_summary.json`. The summary is written last: a folder that has one is a
finished stage. The `checkpoint-<step>` folders a stage writes on the way hold a `trainer_state.json` too.

Standard library only, so that the scripts which read the results start without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .outputs import write_json


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
