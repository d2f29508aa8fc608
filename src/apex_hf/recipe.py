"""Recipe files: the machinery every training config shares, the pre-training one (`apex_hf.pretrain.config`) and the
post-training one (`apex_hf.posttrain.config`).

A recipe is one YAML mapping (`read_yaml`), changed by `--key value` / `--section.key value` on the command line
(`apply_overrides`; both: `read_recipe`) and built into dataclasses that check their values, an unknown field named
with the closest known one, a value of the wrong kind (a string where a number belongs) or out of its range named with
its field (`build_dataclass`). A YAML syntax error names the file and line. Two sections mean the same in every recipe:
`model` (`ModelArguments`: where the model comes from and how its weights load) and `data` (`DataArguments`: TRL's
dataset mixture plus held-out datasets, every local file checked to exist and to hold something by `check_data_files`
before anything is loaded). Relative paths are relative to the working directory, as in TRL and alignment-handbook.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import re
from collections.abc import Callable
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


# A range a recipe field must be in: (text for the message, test). A table of them per config class
# (`build_dataclass(..., ranges=...)`) checks the values a recipe sets before the class sees them.
Range = tuple[str, Callable[[Any], bool]]


def build_dataclass(cls, values: dict[str, Any], where: str, ranges: dict[str, Range] | None = None):
    """`cls(**values)`, but an unknown key is an error that names it, where it is, and the closest known field; so is
    a value of the wrong type (a string where a number belongs) or, with `ranges`, out of its range."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    check_names(
        values, [f.name for f in dataclasses.fields(cls) if f.init], f"{where}: unknown field(s) for {cls.__name__}"
    )
    numeric = {f.name for f in dataclasses.fields(cls) if _is_numeric(f.type)}
    values = {k: _number(v) if k in numeric and isinstance(v, str) else v for k, v in values.items()}
    kinds = {f.name: _kind(f.type) for f in dataclasses.fields(cls)}
    for name, value in values.items():
        check_value(f"{where}: {name}", value, kinds[name], (ranges or {}).get(name))
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error


def check_names(values: dict[str, Any], known: list[str], what: str) -> None:
    """Every key of `values` is in `known`; an unknown one is named with the closest known one (a misspelling)."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{what}: {', '.join(hints)}")


# What a value of each kind of field must be, and how the message says it. `int` excludes bool (YAML's `true` is one).
KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
}


def check_value(name: str, value: Any, kind: str | None, allowed: Range | None = None) -> None:
    """`value` of field `name` has its field's kind (`KINDS`) and, for a number, is finite and in `allowed`."""
    if value is None or kind is None:
        return
    text, is_kind = KINDS[kind]
    if not is_kind(value):
        raise ValueError(f"{name}={value!r} is invalid: must be {text}")
    if kind != "bool" and not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid: must be a finite number")
    if allowed is not None and not allowed[1](value):
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed[0]}")


def _kind(annotation) -> str | None:
    """The kind of a field that holds only ints, floats (ints welcome) or bools, or None as well; None for anything
    else (a string, a list, a mapping, a union with one of them), which is left to the class."""
    text = annotation if isinstance(annotation, str) else str(annotation)
    names = set(re.findall(r"[A-Za-z_]+", text)) - {"class", "typing", "Optional", "Union", "None", "NoneType"}
    if names in ({"int"}, {"float"}, {"bool"}):
        return names.pop()
    return "float" if names == {"int", "float"} else None


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


def numbers_in(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (and the mappings in it) with YAML 1.1's number-like strings as numbers: free-form mappings such as
    `model.overrides` have no field types to convert by, and `rope_theta: 1e6` should mean the number."""
    return {
        key: numbers_in(value) if isinstance(value, dict) else _number(value) if isinstance(value, str) else value
        for key, value in values.items()
    }


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
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"command line: --{key} {value!r} is not a YAML value ({_yaml_problem(error)})") from None
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
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}{_yaml_where(error)}: not valid YAML ({_yaml_problem(error)})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (a recipe is YAML)") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping")
    return raw


def _yaml_where(error: Exception) -> str:
    """`:line:column` of a YAML error (1-based, as editors count), or nothing when PyYAML knows no position."""
    mark = getattr(error, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(error: Exception) -> str:
    return " ".join(filter(None, [getattr(error, "context", None), getattr(error, "problem", None)])) or str(error)


def check_data_files(data: DataArguments, where: str) -> None:
    """A missing or empty local file must fail now, not after a model has been loaded (or as a Hub lookup offline, or
    as the dataset builder's or the trainer's error about no rows)."""
    for dataset in [*data.datasets, *data.eval_datasets]:
        files = dataset.data_files
        if files is None:
            if _looks_local(dataset.path) and not Path(dataset.path).exists():
                raise FileNotFoundError(f"{where}: dataset path {dataset.path} does not exist")
            if Path(dataset.path).is_file() and is_blank(Path(dataset.path)):
                raise ValueError(f"{where}: data file {dataset.path} is empty")
            continue
        if isinstance(files, str):
            files = [files]
        elif isinstance(files, dict):
            files = [f for group in files.values() for f in ([group] if isinstance(group, str) else group)]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError(
                f"{where}: data_files={dataset.data_files!r} is invalid: must be a path, a list of paths or a "
                f"mapping of split names to paths"
            )
        for pattern in files:
            if "://" in pattern or pattern.startswith("hf://"):
                continue
            root = Path(dataset.data_dir) if dataset.data_dir else Path()
            matches = glob.glob(str(root / pattern))
            if not matches:
                raise FileNotFoundError(f"{where}: data file {root / pattern} not found (cwd: {Path.cwd()})")
            blank = [name for name in matches if Path(name).is_file() and is_blank(Path(name))]
            if blank:
                raise ValueError(f"{where}: data file {blank[0]} is empty (nothing but white space)")


def is_blank(path: Path, probe: int = 1 << 16) -> bool:
    """Whether a file holds nothing but white space. A file longer than `probe` bytes is taken to hold something;
    a file with data has it near its start, so reading the first bytes decides."""
    with path.open("rb") as file:
        head = file.read(probe)
    return not head.strip() and len(head) < probe


def is_hub_repo_id(path: str) -> bool:
    """`org/name` that is not a local path: a model or dataset repo on the Hub."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt")
