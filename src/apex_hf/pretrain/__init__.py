"""Pre-training on HF Accelerate: `apex-hf pretrain --config FILE [--key value ...]`, or `pretrain(path, overrides)`.

- `config`: the recipe (`PretrainConfig`), checked before any model is built;
- `data`: documents -> packed rows (no cross-document attention) -> deterministic, resumable batches;
- `train`: the loop, held-out evaluation, logs and the saved folder;
- `preprocess`: raw text -> cleaned, quality-filtered, deduplicated files for `data.datasets` (`apex-hf preprocess`,
  on datatrove).
"""

from .config import PretrainConfig, load_pretrain_config
from .preprocess import PreprocessConfig, preprocess
from .train import pretrain, run_pretrain


__all__ = ["PreprocessConfig", "PretrainConfig", "load_pretrain_config", "preprocess", "pretrain", "run_pretrain"]
