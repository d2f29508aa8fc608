"""Pre-training on HF Accelerate: `apex-hf pretrain --config FILE [--key value ...]`, or `pretrain(path, overrides)`.

- `config`: the recipe (`PretrainConfig`), checked before any model is built;
- `data`: documents -> packed rows (no cross-document attention) -> deterministic, resumable batches;
- `build`: the parts a run is set up from (processes, tokenizer, model, batches, optimizer);
- `train`: the run (`PretrainRun`: set-up, the step loop with held-out evaluation and checkpoints, the saved folder);
- `log`: what the run logs, in one `TrainingLog`;
- `checkpoint`: atomic, resumable checkpoints and the clean stop on SIGTERM;
- `preprocess`: raw text -> cleaned, quality-filtered, deduplicated files for `data.datasets` (`apex-hf preprocess`,
  on datatrove).
"""

import importlib


# Public name -> submodule, imported on first access: `apex-hf preprocess --help` must not load torch or trl.
_LAZY_NAMES = {
    "PretrainConfig": ".config",
    "load_pretrain_config": ".config",
    "PreprocessConfig": ".preprocess",
    "preprocess": ".preprocess",
    "pretrain": ".train",
    "run_pretrain": ".train",
}

__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
