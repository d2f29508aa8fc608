"""Post-training recipes: one YAML file per SFT, DPO or GRPO stage, in the layout of alignment-handbook.

A stage file holds the fields of the stage's TRL config (`SFTConfig`, `DPOConfig`, `GRPOConfig`) at its top level,
plus these sections:

```yaml
model:            # PosttrainModelArguments: where the model and the tokenizer come from
  name_or_path: outputs/apex-small/pretrain
data:             # DataArguments (apex_hf.recipe): TRL's dataset mixture, plus optional held-out datasets
  datasets:
    - {path: json, data_files: data/demo/sft_train.jsonl, columns: [messages]}
  eval_datasets:
    - {path: json, data_files: data/demo/sft_test.jsonl}
peft:             # LoraConfig fields; absent: a full fine-tune (apex_hf.posttrain.lora has the default targets)
  r: 16
reward_funcs: [accuracy, format]   # GRPO only: registry names or dotted paths (apex_hf.posttrain.rewards)
learning_rate: 1.0e-4              # ...and any other field of the stage's TRL config
```

Everything is checked when the file is read, before a model is loaded: an unknown field (with a suggestion), a value of
the wrong kind or out of range (`TRAINING_RANGES`), a missing or empty local data file, an unknown reward function, and
the TRL config's own checks (e.g. `num_generations` must divide the generation batch). `--key value` and `--section.key
value` on the command line override the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl.scripts.utils import DatasetMixtureConfig

from ..recipe import (
    DataArguments,
    ModelArguments,
    Range,
    build_dataclass,
    check_data_files,
    model_from_folder,
    read_recipe,
)


SECTIONS = ("model", "data", "peft", "reward_funcs")
DTYPES = ("float32", "bfloat16", "float16", "auto")  # "auto": the checkpoint's dtype

_AT_LEAST_0: Range = (">= 0", lambda v: v >= 0)
_AT_LEAST_1: Range = (">= 1", lambda v: v >= 1)
_POSITIVE: Range = ("> 0", lambda v: v > 0)
_BETA: Range = ("in [0, 1)", lambda v: 0 <= v < 1)
# Ranges of the TRL / transformers training fields that accept nonsense without a word: `max_steps: -3` trains by
# epochs, a negative batch size or learning rate fails deep in the trainer. A field a stage's config lacks is skipped.
TRAINING_RANGES: dict[str, Range] = {
    "max_steps": ("-1 (train for num_train_epochs) or >= 1", lambda v: v == -1 or v >= 1),
    "num_train_epochs": _POSITIVE,
    "learning_rate": _POSITIVE,
    "per_device_train_batch_size": _AT_LEAST_1,
    "per_device_eval_batch_size": _AT_LEAST_1,
    "gradient_accumulation_steps": _AT_LEAST_1,
    "warmup_steps": _AT_LEAST_0,
    "weight_decay": _AT_LEAST_0,
    "max_grad_norm": _AT_LEAST_0,
    "adam_beta1": _BETA,
    "adam_beta2": _BETA,
    "adam_epsilon": _POSITIVE,
    "logging_steps": _POSITIVE,
    "save_steps": _POSITIVE,
    "eval_steps": _POSITIVE,
    "save_total_limit": _AT_LEAST_1,
    "seed": _AT_LEAST_0,
    "max_length": _AT_LEAST_1,
    "max_prompt_length": _AT_LEAST_1,
    "max_completion_length": _AT_LEAST_1,
    "num_generations": _AT_LEAST_1,
    "num_iterations": _AT_LEAST_1,
    "temperature": _POSITIVE,
    "top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
    "beta": _AT_LEAST_0,
}


@dataclass
class PosttrainModelArguments(ModelArguments):
    """Where a stage's model and tokenizer come from, and how to load them (`name_or_path` is required)."""

    revision: str | None = None
    tokenizer_name_or_path: str | None = None  # default: the model's folder or repo
    trust_remote_code: bool = False  # only needed where apex_hf is not installed
    chat_template: str | None = None  # a Jinja file; default: the tokenizer's own template, else Apex's ChatML one
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 Linear layers (needs CUDA + bitsandbytes)

    def __post_init__(self):
        if self.name_or_path is None:
            raise ValueError("model.name_or_path is missing: the folder or Hub repo id of the model to train")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class Recipe:
    """A parsed stage file: the TRL config plus the sections."""

    stage: str
    args: Any  # the stage's TRL config
    model: PosttrainModelArguments
    data: DataArguments
    peft: dict[str, Any] | None = None
    reward_funcs: list[str] = field(default_factory=list)
    source: str = "<dict>"

    def resume_latest(self) -> None:
        """Continue from the newest checkpoint in `output_dir` (a fresh start when it holds none)."""
        self.args.resume_from_checkpoint = "latest"


def stage_config_class(stage: str):
    """The TRL config class that holds a stage's training fields."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    classes = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}
    if stage not in classes:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(classes)}")
    return classes[stage]


def parse_recipe(raw: dict[str, Any], stage: str, source: str = "<dict>") -> Recipe:
    """Build and check a `Recipe` from a stage file's mapping."""
    raw = dict(raw)
    sections = {name: raw.pop(name, None) for name in SECTIONS}
    if sections["model"] is None or sections["data"] is None:
        missing = [name for name in ("model", "data") if sections[name] is None]
        raise ValueError(f"{source}: missing section(s) {missing}")
    config_class = stage_config_class(stage)
    args = build_dataclass(config_class, raw, source, ranges=TRAINING_RANGES)
    model = build_dataclass(PosttrainModelArguments, sections["model"], f"{source} [model]")
    data = build_dataclass(DataArguments, sections["data"], f"{source} [data]")
    check_data_files(data, f"{source} [data]")

    peft = sections["peft"]
    if peft is not None:
        from .lora import build_lora_config

        build_lora_config(peft, where=f"{source} [peft]")  # checked now; the targets come from the model later
    if model.load_in_4bit and peft is None:
        raise ValueError(f"{source}: model.load_in_4bit trains only adapters; add a peft section (QLoRA)")

    reward_funcs = sections["reward_funcs"] or []
    if reward_funcs and stage != "grpo":
        raise ValueError(f"{source}: reward_funcs is a GRPO field; stage {stage!r} has no rewards")
    if stage == "grpo":
        from .rewards import resolve_reward

        if not reward_funcs:
            raise ValueError(f"{source}: a GRPO recipe needs reward_funcs (e.g. [accuracy, format])")
        for spec in reward_funcs:
            resolve_reward(spec)
        weights = args.reward_weights
        if weights is not None and len(weights) != len(reward_funcs):
            raise ValueError(
                f"{source}: reward_weights has {len(weights)} values for {len(reward_funcs)} reward_funcs"
            )
    return Recipe(stage, args, model, data, peft, list(reward_funcs), source)


def load_recipe(path: str | Path, stage: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and check a stage file."""
    return parse_recipe(read_recipe(path, overrides), stage, source=str(path))


def continue_from(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A stage file's mapping, training the model (and tokenizer) of the previous stage's `folder`."""
    return {**raw, "model": model_from_folder(raw.get("model"), folder)}


def load_datasets(data: DataArguments):
    """The training and held-out datasets of a stage (`datasets.Dataset`, or `None` for no held-out set)."""
    from trl.scripts.utils import get_dataset

    splits = get_dataset(data)
    eval_dataset = splits.get("test")
    if data.eval_datasets:
        eval_mixture = DatasetMixtureConfig(datasets=data.eval_datasets, streaming=data.streaming)
        eval_dataset = get_dataset(eval_mixture)["train"]
    return splits["train"], eval_dataset
