"""`apex-hf pipeline FILE`: run stages in order, each stage's output folder becoming the next stage's model.

```yaml
output_dir: outputs/apex-small          # stage N writes to <output_dir>/<name>
stages:
  - {stage: pretrain, config: pretrain.yaml}
  - {stage: sft, config: sft.yaml}
  - {stage: dpo, config: dpo.yaml, overrides: {learning_rate: 5.0e-6}}
  - {stage: grpo, config: grpo.yaml}
  - {stage: sft, name: lora, config: lora.yaml}
```

`config` paths are relative to the pipeline file. Every stage file is read and checked before the first stage
starts, so a typo in the last stage fails in seconds, not hours. So is every stage folder (`stage_action`), by what it
holds and the flag given:

| a stage folder holds  | no flag | `--resume`                                   | `--overwrite`               |
|-----------------------|---------|----------------------------------------------|-----------------------------|
| nothing               | run     | run                                          | run                         |
| a partial run         | error   | continue from its newest intact checkpoint   | replace it once run again   |
| a finished run        | error   | skip it, once it matches its manifest        | replace it once run again   |

A stage reads the previous stage's folder only after checking it against its manifest, so a damaged file is named
rather than trained on.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .outputs import Holds, check_output_dir, folder_holds
from .posttrain import config as posttrain_config
from .posttrain.stages import TRAINERS, run_stage
from .pretrain import config as pretrain_config
from .pretrain.train import run_pretrain
from .recipe import build_dataclass, read_recipe, read_yaml
from .stage_folder import verify_folder


def _resume_pretrain(config: pretrain_config.PretrainConfig) -> None:
    config.resume_from_checkpoint = "latest"


@dataclass(frozen=True)
class StageKind:
    """What the pipeline does with one kind of stage; each part belongs to that stage's config or trainer."""

    parse: Callable[..., Any]  # (a stage file's mapping, source=its name) -> the checked config
    continue_from: Callable[[dict[str, Any], Path], dict[str, Any]]  # the mapping, from the previous stage's folder
    run: Callable[..., Path]  # (config, overwrite=) -> trains and returns the stage's folder
    resume: Callable[[Any], None]  # makes an unfinished stage go on from its newest intact checkpoint


STAGES = {
    "pretrain": StageKind(
        pretrain_config.parse_pretrain_config, pretrain_config.continue_from, run_pretrain, _resume_pretrain
    ),
    **{
        stage: StageKind(
            partial(posttrain_config.parse_recipe, stage=stage),
            posttrain_config.continue_from,
            run_stage,
            posttrain_config.Recipe.resume_latest,
        )
        for stage in TRAINERS
    },
}


@dataclass
class StageEntry:
    stage: str
    config: str
    name: str | None = None  # default: the stage; names must be unique
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            close = difflib.get_close_matches(str(self.stage), list(STAGES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {tuple(STAGES)}{hint}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must be a mapping of the stage file's fields, got {self.overrides!r}")
        self.name = self.name or self.stage


@dataclass
class PipelineConfig:
    output_dir: str
    stages: list[StageEntry]


@dataclass
class PlannedStage:
    name: str
    stage: str
    recipe: Any  # a Recipe, or a PretrainConfig for the pre-training stage
    output_dir: Path


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def plan_pipeline(path: str | Path, overrides: list[str] | None = None) -> list[PlannedStage]:
    """Read the pipeline and every stage file, wire each stage's model to the previous stage's output, check all."""
    path = Path(path)
    raw = read_recipe(path, overrides)
    config = build_dataclass(PipelineConfig, raw, str(path))
    if not isinstance(config.stages, list):
        raise ValueError(f"{path}: stages must be a list of {{stage, config}} entries, got {config.stages!r}")
    entries = [build_dataclass(StageEntry, entry, f"{path} stages[{i}]") for i, entry in enumerate(config.stages)]
    names = [entry.name for entry in entries]
    if not entries or len(set(names)) != len(names):
        raise ValueError(f"{path}: stages must be a non-empty list with unique names, got {names}")

    plan: list[PlannedStage] = []
    for entry in entries:
        kind, source = STAGES[entry.stage], path.parent / entry.config
        output_dir = Path(config.output_dir) / entry.name
        stage_raw = {**_merge(read_yaml(source), entry.overrides), "output_dir": str(output_dir)}
        if plan:  # the previous stage's folder is this stage's model (and tokenizer)
            stage_raw = kind.continue_from(stage_raw, plan[-1].output_dir)
        plan.append(PlannedStage(entry.name, entry.stage, kind.parse(stage_raw, source=str(source)), output_dir))
    return plan


def stage_action(planned: PlannedStage, resume: bool, overwrite: bool) -> str:
    """ "run", "resume" or "skip", by the table of the module docstring; raises where the table says error, and for a
    finished stage it would skip whose files do not match its manifest."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the pipeline, or run it again")
    holds, _ = folder_holds(planned.output_dir)
    if resume and holds is Holds.FINISHED:
        verify_folder(planned.output_dir)  # the next stage reads it
        return "skip"
    if resume and holds is Holds.PARTIAL:
        return "resume"
    check_output_dir(planned.output_dir, overwrite=overwrite)
    return "run"


def check_stage_folders(plan: list[PlannedStage], resume: bool = False, overwrite: bool = False) -> list[str]:
    """Every stage's `stage_action`, before the first stage starts: a folder in the way fails in seconds."""
    return [stage_action(planned, resume, overwrite) for planned in plan]


def run_pipeline(plan: list[PlannedStage], resume: bool = False, overwrite: bool = False) -> list[Path]:
    """Run the planned stages in order (see `plan_pipeline`); returns the stage folders."""
    actions = check_stage_folders(plan, resume, overwrite)
    for index, (planned, action) in enumerate(zip(plan, actions), 1):
        print(f"[pipeline] stage {index}/{len(plan)}: {planned.name} ({planned.stage}) -> {planned.output_dir}")
        kind = STAGES[planned.stage]
        if action == "skip":
            print(f"[pipeline] {planned.name} already finished and intact; skipped")
            continue
        if action == "resume":
            kind.resume(planned.recipe)
        kind.run(planned.recipe, overwrite=overwrite)
    return [planned.output_dir for planned in plan]
