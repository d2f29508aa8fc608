"""Stage recipes: one YAML file per training stage, in the layout of alignment-handbook.

A stage file holds the fields of the stage's TRL config (`SFTConfig`, `DPOConfig`, `GRPOConfig`) at its top level,
plus these sections:

```yaml
model:            # ModelArguments: where the model and the tokenizer come from
  name_or_path: outputs/apex-small/pretrain
data:             # DataArguments: TRL's dataset mixture, plus optional held-out datasets
  datasets:
    - {path: json, data_files: data/demo/sft_train.jsonl, columns: [messages]}
  eval_datasets:
    - {path: json, data_files: data/demo/sft_test.jsonl}
peft:             # LoraConfig fields; absent means a full fine-tune (see apex_hf.lora for the default targets)
  r: 16
reward_funcs: [accuracy, format]   # GRPO only: registry names or dotted paths (apex_hf.rewards)
learning_rate: 1.0e-4              # ...and any other field of the stage's TRL config
```

Everything is checked when the file is read, before a model is loaded: an unknown field (with a suggestion), a
missing local data file, an unknown reward function, and the TRL config's own checks (e.g. `num_generations` must
divide the generation batch). Relative paths are relative to the working directory, as in TRL and
alignment-handbook. `--key value` and `--section.key value` on the command line override the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig


SECTIONS = ("model", "data", "peft", "reward_funcs")


@dataclass
class ModelArguments:
    """Where a stage's model and tokenizer come from, and how to load them."""

    name_or_path: str
    revision: str | None = None
    tokenizer_name_or_path: str | None = None  # default: the model's folder or repo
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16" | "auto" (the checkpoint's dtype)
    attn_implementation: str | None = None  # e.g. "sdpa", "eager", "flex_attention"
    trust_remote_code: bool = False  # only needed where apex_hf is not installed
    chat_template: str | None = None  # a Jinja file; default: the tokenizer's own template, else Apex's ChatML one
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 Linear layers (needs CUDA + bitsandbytes)

    def __post_init__(self):
        allowed = ("float32", "bfloat16", "float16", "auto")
        if self.dtype not in allowed:
            raise ValueError(f"model.dtype must be one of {allowed}, got {self.dtype!r}")


@dataclass
class DataArguments(DatasetMixtureConfig):
    """TRL's dataset mixture (`datasets` with path / name / data_files / split / columns / fraction, `streaming`,
    `test_split_size`) plus `eval_datasets`, a held-out mixture loaded the same way."""

    eval_datasets: list[DatasetConfig] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        self.eval_datasets = [DatasetConfig(**d) if isinstance(d, dict) else d for d in self.eval_datasets]
        if not self.datasets:
            raise ValueError("data.datasets is empty: a stage needs at least one training dataset")
        if self.eval_datasets and self.test_split_size is not None:
            raise ValueError("set either data.eval_datasets or data.test_split_size, not both")


@dataclass
class Recipe:
    """A parsed stage file: the TRL config plus the sections."""

    stage: str
    args: Any  # the stage's TRL config (or the pre-training config)
    model: ModelArguments
    data: DataArguments
    peft: dict[str, Any] | None = None
    reward_funcs: list[str] = field(default_factory=list)
    source: str = "<dict>"


def stage_config_class(stage: str):
    """The TRL config class that holds a stage's training fields."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    classes = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}
    if stage not in classes:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(classes)}")
    return classes[stage]


def build_dataclass(cls, values: dict[str, Any], where: str):
    """`cls(**values)`, but an unknown key is an error that names it, where it is, and the closest known field."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{where}: unknown field(s) for {cls.__name__}: {', '.join(hints)}")
    numeric = {f.name for f in dataclasses.fields(cls) if _is_numeric(f.type)}
    values = {k: _number(v) if k in numeric and isinstance(v, str) else v for k, v in values.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error


def _is_numeric(annotation) -> bool:
    """A field typed float or int (or optionally so), and not also str."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = str(text)
    return ("float" in text or "int" in text) and "str" not in text


def _number(text: str):
    """YAML 1.1 reads `1e-4` (no dot) as a string; a numeric field gets the number it means."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--key value` / `--section.key value` / bare `--flag` (true) pairs; values are parsed as YAML."""
    raw = dict(raw)
    index = 0
    while index < len(overrides):
        token = overrides[index]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"expected --field [value] on the command line, got {token!r}")
        key, _, value = token[2:].partition("=")
        if not value:
            has_value = index + 1 < len(overrides) and not overrides[index + 1].startswith("--")
            value = overrides[index + 1] if has_value else "true"
            index += has_value
        index += 1
        *section, name = key.replace("-", "_").split(".")
        target = raw
        for part in section:
            target = target.setdefault(part, {})
        parsed = yaml.safe_load(value)
        # YAML 1.1 reads yes/no/on/off as booleans; on a command line `--save_strategy no` means the string
        target[name] = value if isinstance(parsed, bool) and value.lower() not in ("true", "false") else parsed
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping")
    return raw


def parse_recipe(raw: dict[str, Any], stage: str, source: str = "<dict>") -> Recipe:
    """Build and check a `Recipe` from a stage file's mapping."""
    raw = dict(raw)
    sections = {name: raw.pop(name, None) for name in SECTIONS}
    if sections["model"] is None or sections["data"] is None:
        missing = [name for name in ("model", "data") if sections[name] is None]
        raise ValueError(f"{source}: missing section(s) {missing}")
    config_class = stage_config_class(stage)
    args = build_dataclass(config_class, raw, source)
    model = build_dataclass(ModelArguments, sections["model"], f"{source} [model]")
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
    raw = apply_overrides(read_yaml(path), overrides or [])
    return parse_recipe(raw, stage, source=str(path))


def check_data_files(data: DataArguments, where: str) -> None:
    """A missing local file must fail now, not after a model has been loaded (or as a Hub lookup offline)."""
    for dataset in [*data.datasets, *data.eval_datasets]:
        files = dataset.data_files
        if files is None:
            if _looks_local(dataset.path) and not Path(dataset.path).exists():
                raise FileNotFoundError(f"{where}: dataset path {dataset.path} does not exist")
            continue
        if isinstance(files, str):
            files = [files]
        elif isinstance(files, dict):
            files = [f for group in files.values() for f in ([group] if isinstance(group, str) else group)]
        for pattern in files:
            if "://" in pattern or pattern.startswith("hf://"):
                continue
            root = Path(dataset.data_dir) if dataset.data_dir else Path()
            if not glob.glob(str(root / pattern)):
                raise FileNotFoundError(f"{where}: data file {root / pattern} not found (cwd: {Path.cwd()})")


def is_hub_repo_id(path: str) -> bool:
    """`org/name` that is not a local path: a model or dataset repo on the Hub."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt")


def load_datasets(data: DataArguments):
    """The training and held-out datasets of a stage (`datasets.Dataset`, or `None` for no held-out set)."""
    from trl.scripts.utils import get_dataset

    splits = get_dataset(data)
    eval_dataset = splits.get("test")
    if data.eval_datasets:
        eval_mixture = DatasetMixtureConfig(datasets=data.eval_datasets, streaming=data.streaming)
        eval_dataset = get_dataset(eval_mixture)["train"]
    return splits["train"], eval_dataset
