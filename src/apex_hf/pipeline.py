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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import apply_overrides, build_dataclass, parse_recipe, read_yaml


STAGES = ("pretrain", "sft", "dpo", "grpo")


@dataclass
class StageEntry:
    stage: str
    config: str
    name: str | None = None  # default: the stage; names must be unique
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {STAGES}")
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
    raw = apply_overrides(read_yaml(path), overrides or [])
    config = build_dataclass(PipelineConfig, raw, str(path))
    entries = [build_dataclass(StageEntry, entry, f"{path} stages[{i}]") for i, entry in enumerate(config.stages)]
    names = [entry.name for entry in entries]
    if not entries or len(set(names)) != len(names):
        raise ValueError(f"{path}: stages must be a non-empty list with unique names, got {names}")

    plan: list[PlannedStage] = []
    for entry in entries:
        source = path.parent / entry.config
        stage_raw = _merge(read_yaml(source), entry.overrides)
        output_dir = Path(config.output_dir) / entry.name
        stage_raw["output_dir"] = str(output_dir)
        if plan:  # the previous stage's folder is this stage's model (and tokenizer)
            model = stage_raw.setdefault("model", {})
            model.pop("preset", None)
            model.pop("tokenizer_name_or_path", None)
            model["name_or_path"] = str(plan[-1].output_dir)
        if entry.stage == "pretrain":
            from .pretrain.config import parse_pretrain_config

            if plan:  # continued pre-training: the previous folder's model and tokenizer
                stage_raw["tokenizer"] = {}
            recipe = parse_pretrain_config(stage_raw, source=str(source))
        else:
            recipe = parse_recipe(stage_raw, entry.stage, source=str(source))
        plan.append(PlannedStage(entry.name, entry.stage, recipe, output_dir))
    return plan


def run_pipeline(plan: list[PlannedStage], resume: bool = False) -> list[Path]:
    """Run the planned stages in order (see `plan_pipeline`); returns the stage folders."""
    from .stages import SUMMARY_FILE, run_stage

    outputs = []
    for index, planned in enumerate(plan, 1):
        done = (planned.output_dir / SUMMARY_FILE).is_file()
        print(f"[pipeline] stage {index}/{len(plan)}: {planned.name} ({planned.stage}) -> {planned.output_dir}")
        if resume and done:
            print(f"[pipeline] {planned.name} already finished; skipped")
        elif planned.stage == "pretrain":
            from .pretrain.train import run_pretrain

            run_pretrain(planned.recipe)
        else:
            if resume and planned.output_dir.is_dir():
                planned.recipe.args.resume_from_checkpoint = "latest"
            run_stage(planned.recipe)
        outputs.append(planned.output_dir)
    return outputs
