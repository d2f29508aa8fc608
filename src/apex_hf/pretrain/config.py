"""The pre-training recipe: one YAML file, fully checked before any model is built.

```yaml
model:                 # exactly one of preset / name_or_path
  preset: apex-small   # a fresh model (apex_hf.presets); or name_or_path: a folder or Hub id to continue from
  overrides: {num_refinement_steps: 2}   # ApexConfig fields on top of the preset or checkpoint
tokenizer:             # one of: name_or_path (any HF tokenizer) / train_vocab_size (a byte-level BPE on the data)
  train_vocab_size: 1024
data:                  # TRL's dataset mixture + eval_datasets (apex_hf.recipe.DataArguments), plus text_column
  datasets:
    - {path: text, data_files: data/tiny_corpus.txt, sample_by: paragraph}
  test_split_size: 0.05
output_dir: outputs/apex-small/pretrain
seq_len: 128
max_steps: 300         # ...and the other top-level fields of PretrainConfig
```

`--key value` / `--section.key value` on the command line override the file (`apex_hf.recipe.apply_overrides`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl.scripts.utils import DatasetConfig

from ..recipe import (
    DataArguments,
    ModelArguments,
    build_dataclass,
    check_data_files,
    check_names,
    model_from_folder,
    numbers_in,
    read_recipe,
)


SCHEDULERS = ("cosine", "wsd")
MIXED_PRECISION = ("no", "bf16")
MODEL_DTYPES = ("float32", "bfloat16", "auto")
SAMPLE_BY = ("line", "paragraph", "document")
# The tokenizer decides these; a recipe that set them could silently disagree with it.
TOKENIZER_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


@dataclass
class PretrainModelArguments(ModelArguments):
    """Where the model comes from: a preset (a new model) or a checkpoint (`name_or_path`, continued pre-training).
    Keep `dtype` float32 for mixed_precision bf16 (fp32 master weights)."""

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # ApexConfig fields

    def __post_init__(self):
        if (self.preset is None) == (self.name_or_path is None):
            raise ValueError(
                f"model: set exactly one of preset (a new model) and name_or_path (continued pre-training), "
                f"got preset={self.preset!r}, name_or_path={self.name_or_path!r}"
            )
        _require(self.dtype in MODEL_DTYPES, "model.dtype", self.dtype, f"one of {MODEL_DTYPES}")
        _require(
            self.dtype != "auto" or self.name_or_path is not None,
            "model.dtype",
            self.dtype,
            "float32 or bfloat16 for a preset ('auto' means the checkpoint's dtype)",
        )
        if not isinstance(self.overrides, dict):
            raise ValueError(f"model.overrides must be a mapping of ApexConfig fields, got {self.overrides!r}")
        self.overrides = numbers_in(self.overrides)
        clashing = sorted(set(self.overrides) & set(TOKENIZER_FIELDS))
        if clashing:
            raise ValueError(f"model.overrides: {clashing} come from the tokenizer and cannot be overridden")
        # A misspelt key would otherwise land on the config as an unused attribute, and a default model would train.
        check_names(self.overrides, config_field_names(), "model.overrides: unknown ApexConfig field(s)")


@dataclass
class TokenizerArguments:
    """A tokenizer to load, or the size of a byte-level BPE to train on the training documents. Empty: the
    tokenizer saved with `model.name_or_path`."""

    name_or_path: str | None = None
    train_vocab_size: int | None = None

    def __post_init__(self):
        if self.name_or_path is not None and self.train_vocab_size is not None:
            raise ValueError("tokenizer: set name_or_path or train_vocab_size, not both")


@dataclass
class PretrainDatasetConfig(DatasetConfig):
    """TRL's `DatasetConfig` (the arguments of `datasets.load_dataset`) plus:

    - `sample_by`, for the text builder: `paragraph` reads a `.txt` file as one document per blank-line-separated
      paragraph (the default, `line`, would make every line a document);
    - `source`, the name the mixture weights, the curriculum and the logs use (default: the file's or dataset's name);
    - `weight`, this source's share of the training rows (see `PretrainDataArguments`)."""

    sample_by: str | None = None
    source: str | None = None
    weight: float | None = None

    def __post_init__(self):
        if self.sample_by is not None:
            _require(self.path == "text", "sample_by", self.sample_by, "set only for path: text")
            _require(self.sample_by in SAMPLE_BY, "sample_by", self.sample_by, f"one of {SAMPLE_BY}")
        if self.weight is not None:
            _require(math.isfinite(self.weight) and self.weight >= 0, "weight", self.weight, "a number >= 0")
        if self.source is None:
            files = self.data_files
            first = files[0] if isinstance(files, list) and files else files
            named = first if isinstance(first, str) else "/".join(filter(None, [self.path, self.name]))
            self.source = Path(named).name.split(".")[0] or self.path


@dataclass
class CurriculumPoint:
    """The mixture weights at one optimizer step: `{source name: weight}`, every source named."""

    step: int
    weights: dict[str, float]


@dataclass
class PretrainDataArguments(DataArguments):
    """`apex_hf.recipe.DataArguments` whose datasets may set `sample_by`, `source` and `weight`, plus the column
    holding the text and a curriculum.

    Without weights the sources are concatenated and read in proportion to their sizes. With a `weight` on every
    dataset, or a `curriculum`, each source is packed on its own and every training row is drawn from a source with
    probability proportional to its weight (a source that runs out starts another epoch). A curriculum lists the
    weights at some optimizer steps, `[{step: 0, weights: {web: 0.9, math: 0.1}}, {step: 1000, weights: ...}]`;
    between two points they move linearly, before the first and after the last they stay put.
    """

    text_column: str = "text"
    curriculum: list[CurriculumPoint] = field(default_factory=list)

    def __post_init__(self):
        # Converted here, before the parent turns the remaining dicts into plain DatasetConfig (no sample_by).
        for name in ("datasets", "eval_datasets"):
            entries = getattr(self, name)
            setattr(
                self,
                name,
                [
                    build_dataclass(PretrainDatasetConfig, entry, f"data.{name}[{index}]")
                    if isinstance(entry, dict)
                    else entry
                    for index, entry in enumerate(entries)
                ],
            )
        super().__post_init__()
        if self.streaming and self.test_split_size is not None:
            raise ValueError("data.test_split_size needs a map-style dataset; with streaming, set data.eval_datasets")
        self._check_mixture()

    @property
    def sources(self) -> list[str]:
        return [dataset.source for dataset in self.datasets]

    @property
    def is_weighted(self) -> bool:
        return bool(self.curriculum) or any(dataset.weight is not None for dataset in self.datasets)

    def _check_mixture(self) -> None:
        sources = self.sources
        repeated = sorted({name for name in sources if sources.count(name) > 1})
        if repeated:
            raise ValueError(f"data.datasets: source names {repeated} repeat; give each dataset its own `source`")
        if not self.is_weighted:
            return
        if any(dataset.fraction is not None for dataset in self.datasets):
            raise ValueError(
                "data.datasets: `fraction` subsamples a concatenation; with weights or a curriculum, "
                "the weights set the shares"
            )
        weights = [dataset.weight for dataset in self.datasets]
        if self.curriculum:
            if any(weight is not None for weight in weights):
                raise ValueError("data: set a `weight` on the datasets or a `curriculum`, not both")
            self.curriculum = [
                build_dataclass(CurriculumPoint, point, f"data.curriculum[{index}]")
                if isinstance(point, dict)
                else point
                for index, point in enumerate(self.curriculum)
            ]
            steps = [point.step for point in self.curriculum]
            if steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:])):
                raise ValueError(f"data.curriculum: steps must be >= 0 and increasing, got {steps}")
            for index, point in enumerate(self.curriculum):
                where = f"data.curriculum[{index}] (step {point.step})"
                unknown = sorted(set(point.weights) - set(sources))
                if unknown:
                    hints = [difflib.get_close_matches(name, sources, n=1) for name in unknown]
                    hint = "".join(f"; did you mean {h[0]!r} for {u!r}" for u, h in zip(unknown, hints) if h)
                    raise ValueError(f"{where}: unknown source(s) {unknown} (sources: {sources}){hint}")
                missing = [name for name in sources if name not in point.weights]
                if missing:
                    raise ValueError(f"{where}: no weight for source(s) {missing}; give every source a weight")
                _check_weights(where, [point.weights[name] for name in sources])
        else:
            if None in weights:
                unweighted = [name for name, weight in zip(sources, weights) if weight is None]
                raise ValueError(f"data.datasets: sources {unweighted} have no `weight`; weight all or none")
            _check_weights("data.datasets", weights)

    def mixture_weights(self, step: int) -> list[float] | None:
        """The sources' probabilities at optimizer step `step` (0-based), or None for a plain concatenation."""
        if not self.is_weighted:
            return None
        if not self.curriculum:
            weights = [dataset.weight for dataset in self.datasets]
        else:
            first, last = self.curriculum[0], self.curriculum[-1]
            if step <= first.step or step >= last.step:
                point = first if step <= first.step else last
                weights = [point.weights[name] for name in self.sources]
            else:
                right = next(i for i, point in enumerate(self.curriculum) if point.step > step)
                left, right = self.curriculum[right - 1], self.curriculum[right]
                t = (step - left.step) / (right.step - left.step)
                weights = [(1 - t) * left.weights[n] + t * right.weights[n] for n in self.sources]
        total = sum(weights)
        return [weight / total for weight in weights]


def _check_weights(where: str, weights: list[float]) -> None:
    if any(not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"{where}: weights must be finite numbers >= 0, got {weights}")
    if sum(weights) <= 0:
        raise ValueError(f"{where}: weights must sum to a positive number, got {weights}")


@dataclass
class PretrainConfig:
    """Top-level fields of a pre-training recipe. Steps are optimizer steps; a step sees
    `per_device_train_batch_size * gradient_accumulation_steps * processes` rows of `seq_len` tokens."""

    model: PretrainModelArguments
    data: PretrainDataArguments
    output_dir: str
    tokenizer: TokenizerArguments = field(default_factory=TokenizerArguments)
    seq_len: int = 2048
    max_steps: int = 1000
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 100
    lr_scheduler_type: str = "cosine"  # "cosine" (warmup, cosine decay) | "wsd" (warmup, stable, decay)
    decay_ratio: float = 0.1  # wsd: the last decay_ratio of max_steps decays
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" (autocast; weights and optimizer state stay float32)
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (transformers 5 name)
    # compile each decoder layer (regional compilation, as torchtitan does); "auto": on a GPU for runs of at least
    # `build.COMPILE_AUTO_MIN_STEPS` steps, where the faster steps repay the compilation
    torch_compile: bool | str = "auto"
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int = 0  # held-out loss every eval_steps; 0: only before and after training
    max_eval_batches: int | None = None  # per process; None: the whole held-out set
    save_steps: int = 0  # a resumable checkpoint-<step> every save_steps (and on SIGTERM); 0: only on SIGTERM
    save_total_limit: int | None = None  # keep only the newest checkpoints; None: keep all
    resume_from_checkpoint: str | None = None  # "latest" (the newest complete checkpoint-<step>) or a folder
    # a folder in host memory (e.g. /dev/shm) where checkpoints are written first, so that training waits for memory
    # rather than the disk; they are moved to output_dir in the background (`checkpoint.py`). One machine only.
    checkpoint_staging_dir: str | None = None
    num_workers: int = 0  # processes that tokenize a map-style dataset (datasets.map num_proc); 0: this one
    report_to: list[str] | str = field(default_factory=list)  # Accelerate trackers, e.g. [tensorboard, wandb]
    peak_tflops: float | None = None  # per device, for MFU; default: the bf16 dense peak of a known GPU

    def __post_init__(self):
        if self.mixed_precision is False:  # YAML 1.1 (PyYAML) reads a bare `no` as false
            self.mixed_precision = "no"
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        _require(bool(self.output_dir), "output_dir", self.output_dir, "a folder")
        _require(
            self.torch_compile in (True, False, "auto"), "torch_compile", self.torch_compile, "true, false or auto"
        )
        for name in (
            "seq_len",
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            _require(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        _require(self.seq_len >= 2, "seq_len", self.seq_len, ">= 2 (a row predicts its tokens from earlier ones)")
        for name in ("eval_steps", "save_steps", "num_workers", "weight_decay", "warmup_steps"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(
            self.save_total_limit is None or self.save_total_limit > 0,
            "save_total_limit",
            self.save_total_limit,
            "> 0 or null",
        )
        _require(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", self.peak_tflops, "> 0 or null")
        _require(
            self.checkpoint_staging_dir is None or Path(self.checkpoint_staging_dir).is_dir(),
            "checkpoint_staging_dir",
            self.checkpoint_staging_dir,
            "an existing folder (in host memory, such as /dev/shm) or null",
        )
        self._check_trackers()
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, name) < 1, name, getattr(self, name), "in [0, 1)")
        _require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0")
        _require(self.warmup_steps <= self.max_steps, "warmup_steps", self.warmup_steps, "<= max_steps")
        _require(
            self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type", self.lr_scheduler_type, f"one of {SCHEDULERS}"
        )
        if self.lr_scheduler_type == "wsd":
            _require(0 < self.decay_ratio <= 1, "decay_ratio", self.decay_ratio, "in (0, 1]")
            _require(
                self.warmup_steps + self.num_decay_steps <= self.max_steps,
                "warmup_steps",
                self.warmup_steps,
                f"<= max_steps - decay steps ({self.max_steps - self.num_decay_steps}) for wsd",
            )
        _require(
            self.mixed_precision in MIXED_PRECISION,
            "mixed_precision",
            self.mixed_precision,
            f"one of {MIXED_PRECISION}",
        )
        _require(
            self.max_eval_batches is None or self.max_eval_batches > 0,
            "max_eval_batches",
            self.max_eval_batches,
            "> 0 or null",
        )
        _require(
            not (self.data.streaming and self.data.eval_datasets) or self.max_eval_batches is not None,
            "max_eval_batches",
            self.max_eval_batches,
            "set with data.streaming (a streamed held-out set is read up to it)",
        )
        self._check_tokenizer()
        try:
            limit = self.model_config().max_trained_length
        except ValueError as error:  # ApexConfigError: the preset or checkpoint with model.overrides applied
            where = f"model.overrides {self.model.overrides}" if self.model.overrides else "model"
            raise ValueError(f"{where}: {error}") from error
        if limit is not None and self.seq_len > limit:
            raise ValueError(f"seq_len={self.seq_len} exceeds the model's max_position_embeddings={limit}")

    def _check_trackers(self) -> None:
        """Accelerate drops a tracker whose package is missing without a word; a recipe that asks for one gets an
        error instead, before training, rather than a run with no logs."""
        if not self.report_to:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        available = {str(tracker) for tracker in get_available_trackers()}
        for name in self.report_to:
            _require(name in LOGGER_TYPE_TO_CLASS, "report_to", name, f"one of {sorted(LOGGER_TYPE_TO_CLASS)}")
            if name not in available:
                raise ValueError(f"report_to: {name!r} is not installed (pip install {name}, or remove it)")

    def _check_tokenizer(self) -> None:
        tokenizer = self.tokenizer
        if self.model.preset is not None and tokenizer.name_or_path is None and tokenizer.train_vocab_size is None:
            raise ValueError("tokenizer: a new model (model.preset) needs tokenizer.name_or_path or train_vocab_size")
        if tokenizer.train_vocab_size is not None:
            _require(
                self.model.preset is not None,
                "tokenizer.train_vocab_size",
                tokenizer.train_vocab_size,
                "unset when continuing from model.name_or_path (its embeddings belong to its own tokenizer)",
            )
            _require(
                not self.data.streaming,
                "tokenizer.train_vocab_size",
                tokenizer.train_vocab_size,
                "used without data.streaming (train a tokenizer once, then set tokenizer.name_or_path)",
            )

    @property
    def num_decay_steps(self) -> int:
        return round(self.decay_ratio * self.max_steps)

    @property
    def tokenizer_name_or_path(self) -> str | None:
        return self.tokenizer.name_or_path or (None if self.tokenizer.train_vocab_size else self.model.name_or_path)

    def model_config(self, **tokenizer_fields):
        """The model's config: the preset, or the checkpoint's config, with `model.overrides` (and, when building
        the model, the tokenizer's vocabulary size and special-token ids) applied."""
        from transformers import AutoConfig

        from ..presets import get_preset

        if self.model.preset is not None:
            return get_preset(self.model.preset, **self.model.overrides, **tokenizer_fields)
        return AutoConfig.from_pretrained(self.model.name_or_path, **self.model.overrides, **tokenizer_fields)


def config_field_names() -> list[str]:
    """What `model.overrides` may set: ApexConfig's fields and the legacy RoPE keys transformers converts."""
    import dataclasses

    from ..modeling.configuration_apex import ApexConfig

    return [*(f.name for f in dataclasses.fields(ApexConfig)), "rope_theta", "rope_scaling"]


def parse_pretrain_config(raw: dict[str, Any], source: str = "<dict>") -> PretrainConfig:
    """Check a pre-training recipe's mapping (unknown fields, missing data files, ranges, seq_len against the model)
    and build it, before anything is loaded."""
    raw = dict(raw)
    for name in ("model", "data"):
        if name not in raw:
            raise ValueError(f"{source}: missing section {name!r}")
    raw["model"] = build_dataclass(PretrainModelArguments, raw["model"], f"{source} [model]")
    raw["data"] = build_dataclass(PretrainDataArguments, raw["data"], f"{source} [data]")
    raw["tokenizer"] = build_dataclass(TokenizerArguments, raw.get("tokenizer") or {}, f"{source} [tokenizer]")
    check_data_files(raw["data"], f"{source} [data]")
    return build_dataclass(PretrainConfig, raw, source)


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a pre-training recipe, apply `--key value` overrides, and check it."""
    return parse_pretrain_config(read_recipe(path, overrides), source=str(path))


def continue_from(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A pre-training recipe's mapping, continuing pre-training from the model and tokenizer of the previous stage's
    `folder`."""
    return {**raw, "model": model_from_folder(raw.get("model"), folder), "tokenizer": {}}
