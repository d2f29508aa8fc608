"""Train a tiny byte-level BPE tokenizer (used by the CPU demo and the tests).

In transformers 5 the ``tokenizers``-backed class is ``TokenizersBackend``;
``PreTrainedTokenizerFast`` is kept as an alias of it, and we use that public name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    *,
    min_frequency: int = 2,
    add_bos_token: bool = False,
    model_max_length: int = 2048,
    save_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Special tokens get fixed ids: ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|endoftext|>`` = 2 (eos).
    Byte-level means every input is encodable (no unk token). ``vocab_size`` includes the 256
    byte symbols and the 3 special tokens, so it must be > 259. If ``save_dir`` is given the
    tokenizer is saved there (``save_pretrained``) and can be reloaded with ``AutoTokenizer``.
    Deterministic for a given input.
    """
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be > {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=add_bos_token,
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="right",
    )
    if save_dir is not None:
        hf_tok.save_pretrained(str(save_dir))
    return hf_tok
