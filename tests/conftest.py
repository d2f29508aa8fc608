"""Shared pytest configuration for apex_hf.

* Forces offline mode for the Hugging Face Hub (set before transformers is imported).
* Markers: ``gpu`` (auto-skipped when CUDA is unavailable) and ``slow``.
* transformers' own common-test mixins: ``make test`` runs scripts/fetch_transformers_tests.sh,
  which extracts them from the transformers sdist into ``.cache/transformers_tests/transformers_tests``.
  This conftest puts ``.cache/transformers_tests`` on ``sys.path`` so a test module can write::

      from transformers_tests.test_modeling_common import ModelTesterMixin, GenerationTesterMixin
      from transformers_tests.test_configuration_common import ConfigTester

  (the package is renamed from ``tests`` to ``transformers_tests`` so it cannot clash with ours).
  Guard such modules with ``pytest.importorskip("transformers_tests.test_modeling_common")``
  if they should also run where the cache is absent. NB: in that cache
  ``GenerationTesterMixin`` is an empty shim (generation/test_utils.py is not in the sdist).
* ``tiny_tokenizer``: session-scoped byte-level BPE tokenizer (vocab 512) trained on
  data/tiny_corpus.txt, saved to a tmp dir (``tiny_tokenizer.name_or_path``) and reloaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_PATH = REPO_ROOT / "data" / "tiny_corpus.txt"
TRANSFORMERS_TESTS_DIR = REPO_ROOT / ".cache" / "transformers_tests"

if (TRANSFORMERS_TESTS_DIR / "transformers_tests" / "__init__.py").is_file():
    if str(TRANSFORMERS_TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TRANSFORMERS_TESTS_DIR))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")
    config.addinivalue_line("markers", "slow: slow test")
    # markers used inside transformers' common-test mixins (registered by transformers' own conftest)
    for name in (
        "accelerate_tests",
        "flash_attn_test",
        "flash_attn_3_test",
        "flash_attn_4_test",
        "torch_compile_test",
    ):
        config.addinivalue_line("markers", f"{name}: used by transformers' common-test mixins")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """Non-empty lines (paragraphs) of data/tiny_corpus.txt."""
    return [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory):
    """Byte-level BPE tokenizer (vocab 512; pad=0 ``<|pad|>``, bos=1 ``<|bos|>``, eos=2 ``<|endoftext|>``).

    Round-tripped through save_pretrained/AutoTokenizer.from_pretrained, so it is known to be loadable;
    its directory is ``tiny_tokenizer.name_or_path``.
    """
    from transformers import AutoTokenizer

    from apex_hf.tokenizer import train_bpe_tokenizer

    save_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe_tokenizer(tiny_corpus, vocab_size=512, save_dir=save_dir)
    return AutoTokenizer.from_pretrained(str(save_dir))


@pytest.fixture(scope="module")
def base_model(tiny_tokenizer, tmp_path_factory):
    """A saved tiny Apex (every feature on, vocab of the tiny tokenizer) and its tokenizer: a stage's input."""
    import torch
    from tiny_configs import tiny_config

    from apex_hf import ApexForCausalLM

    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = tiny_config("gqa", vocab_size=len(tiny_tokenizer), max_position_embeddings=256)
    ApexForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
