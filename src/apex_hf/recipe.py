"""Recipe files: the machinery every training config shares, the pre-training one (`apex_hf.pretrain.config`) and the
post-training one (`apex_hf.posttrain.config`).

A recipe is one YAML mapping (`read_yaml`), changed by `--key value` / `--section.key value` on the command line
(`apply_overrides`; both: `read_recipe`) and built into dataclasses that check their values, an unknown field named
with the closest known one (`build_dataclass`). Two sections mean the same in every recipe: `model`
(`ModelArguments`: where the model comes from and how its weights load) and `data` (`DataArguments`: TRL's dataset
mixture plus held-out datasets, every local file checked to exist by `check_data_files` before anything is loaded).
Relative paths are relative to the working directory, as in TRL and alignment-handbook.
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


# The keys of a `model` section that name where the model and its tokenizer come from: a stage that continues from the
# previous stage's folder takes both from there, whatever its file named.
MODEL_SOURCE_KEYS = ("preset", "name_or_path", "tokenizer_name_or_path")


@dataclass
class ModelArguments:
    """A recipe's `model` section: where the model comes from and how its weights are loaded. Each trainer's config
    adds its own fields (`PretrainModelArguments`, `PosttrainModelArguments`) and checks `dtype` against what it can
    train in."""

    name_or_path: str | None = None  # a folder or a Hub repo id
    dtype: str = "float32"  # the weights' dtype; "auto": the checkpoint's
    attn_implementation: str | None = None  # e.g. "sdpa", "eager", "flex_attention"; default: transformers'

    def loading_kwargs(self) -> dict[str, Any]:
        """`dtype` (as a torch dtype) and `attn_implementation`, as `from_pretrained` / `from_config` take them."""
        import torch

        kwargs: dict[str, Any] = {"dtype": self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


def model_from_folder(model: dict[str, Any] | None, folder: Path) -> dict[str, Any]:
    """A recipe's `model` mapping that loads the model and tokenizer saved in `folder` (a finished stage's)."""
    kept = {key: value for key, value in (model or {}).items() if key not in MODEL_SOURCE_KEYS}
    return {**kept, "name_or_path": str(folder)}


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


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A recipe file's mapping with the command line's `--key value` overrides applied."""
    return apply_overrides(read_yaml(path), overrides or [])


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping")
    return raw


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
