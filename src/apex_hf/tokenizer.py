"""Tokenizers for Apex: reuse any Hugging Face tokenizer, or train a byte-level BPE from a corpus; give it a chat
template.

In transformers 5 the ``tokenizers``-backed class is ``TokenizersBackend``; ``PreTrainedTokenizerFast`` is kept as
an alias of it, and we use that public name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TURN_START_TOKEN = "<|im_start|>"
TURN_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, TURN_START_TOKEN, TURN_END_TOKEN)  # ids 0 .. 4
CHAT_TEMPLATE_PATH = Path(__file__).parent / "templates" / "chat_template.jinja"


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

    Special tokens get fixed ids: ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|endoftext|>`` = 2 (eos), and the ChatML
    turn markers ``<|im_start|>`` = 3, ``<|im_end|>`` = 4, so that adding the chat template later does not grow the
    vocabulary.
    Byte-level means every input is encodable (no unk token). ``vocab_size`` includes the 256
    byte symbols and the 5 special tokens, so it must be > 261. If ``save_dir`` is given the
    tokenizer is saved there (``save_pretrained``) and can be reloaded with ``AutoTokenizer``.
    Deterministic for a given input.
    """
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be > {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")

    tok = Tokenizer(models.BPE())
    # Every digit its own token (as Llama 3 and Qwen split numbers): a number is then its digits, the same pieces in
    # every context, instead of whatever merges the corpus happened to favour (" 19" one token, " 37" two).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
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


def prepare_chat_tokenizer(tokenizer, model=None, chat_template: str | Path | None = None) -> bool:
    """Give ``tokenizer`` a chat template, and ``model`` the embeddings and special-token ids that go with it.

    The template is ``chat_template`` (a Jinja file) if given, else the tokenizer's own, else Apex's ChatML template
    (assistant turns inside ``{% generation %}`` markers, for TRL's ``assistant_only_loss``). With the ChatML
    template, ``<|im_start|>`` / ``<|im_end|>`` are added when missing and ``<|im_end|>`` becomes the eos token,
    because a chat model ends its turn there (generation stops on it; TRL closes completions with it). A tokenizer
    without a pad token pads with eos. When the vocabulary grew past the model's embeddings, they are resized
    (new rows start at the mean of the old ones). Returns whether the model was resized.
    """
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"chat template {path} not found")
        tokenizer.chat_template = path.read_text()
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE_PATH.read_text()
        missing = [t for t in (TURN_START_TOKEN, TURN_END_TOKEN) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        tokenizer.eos_token = TURN_END_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        return False
    resized = len(tokenizer) > model.get_input_embeddings().num_embeddings
    if resized:
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, model.generation_config):
        if config is not None:
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
    return resized
