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
starts, so a typo in the last stage fails in seconds, not hours. With `resume`, a stage whose folder already holds
its summary is skipped, and an unfinished post-training stage continues from its newest checkpoint.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .posttrain import config as posttrain_config
from .posttrain.stages import TRAINERS, run_stage
from .pretrain import config as pretrain_config
from .pretrain.train import run_pretrain
from .recipe import build_dataclass, read_recipe, read_yaml
from .stage_folder import is_finished


@dataclass(frozen=True)
class StageKind:
    """What the pipeline does with one kind of stage; each part belongs to that stage's config or trainer."""

    parse: Callable[..., Any]  # (a stage file's mapping, source=its name) -> the checked config
    continue_from: Callable[[dict[str, Any], Path], dict[str, Any]]  # the mapping, from the previous stage's folder
    run: Callable[[Any], Path]  # trains and returns the stage's folder
    resume: Callable[[Any], None] | None = None  # an unfinished stage goes on from its checkpoint; None: restarts


STAGES = {
    "pretrain": StageKind(pretrain_config.parse_pretrain_config, pretrain_config.continue_from, run_pretrain),
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


def run_pipeline(plan: list[PlannedStage], resume: bool = False) -> list[Path]:
    """Run the planned stages in order (see `plan_pipeline`); returns the stage folders."""
    outputs = []
    for index, planned in enumerate(plan, 1):
        done = is_finished(planned.output_dir)
        print(f"[pipeline] stage {index}/{len(plan)}: {planned.name} ({planned.stage}) -> {planned.output_dir}")
        if resume and done:
            print(f"[pipeline] {planned.name} already finished; skipped")
        else:
            _run(planned, resume)
        outputs.append(planned.output_dir)
    return outputs


def _run(planned: PlannedStage, resume: bool) -> None:
    kind = STAGES[planned.stage]
    if resume and kind.resume is not None:
        kind.resume(planned.recipe)
    kind.run(planned.recipe)
