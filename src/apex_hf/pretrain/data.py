"""Pre-training data: documents -> tokens -> packed rows -> deterministic, resumable batches.

Packing. Each document is tokenized and closed with eos, and the documents are laid end to end and cut into rows of
exactly `seq_len` tokens (the last partial row is dropped), so no token is padding. A row carries `position_ids` that
restart at 0 where a document starts; with `attention_mask=None`, transformers' `masking_utils` reads those restarts
as packed sequences and lets each token attend only within its own document. The label of a document's first token is
-100: the model shifts labels by one, so that is the target of the previous document's eos, a prediction that could
only come from the wrong document.

A document longer than what is left of a row continues at the start of the next row as a new segment with positions
from 0 again, rather than keeping its in-document offsets: RoPE only sees position differences, so the offsets would
change nothing in attention, while a long document's offsets would run past `max_position_embeddings`, where
`dynamic` RoPE starts rescaling.

Order. A map-style dataset is packed once; each epoch visits its rows in the order of
`torch.randperm(generator=seed + epoch)`, dealt round-robin to the processes. A streaming dataset is split between
processes (`split_dataset_by_node`), shuffled with a document buffer seeded by `seed + epoch`, and packed on the fly.
Either way the iterator's whole state is `(epoch, rows this process has consumed in the epoch)`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch


SHUFFLE_BUFFER_DOCUMENTS = 10_000  # streaming only: documents held for the approximate shuffle
TOKENIZE_BATCH = 1000  # documents per tokenizer call


def load_documents(data, seed: int):
    """The training and held-out documents (`datasets.Dataset` or, with `data.streaming`, `IterableDataset`; the
    held-out set is `None` when the recipe names none). Like TRL's `get_dataset`, but `sample_by` reaches the text
    builder and `test_split_size` splits with `seed`, so every process and every run holds out the same documents."""
    train = _load_mixture(data.datasets, data.streaming)
    held_out = None
    if data.eval_datasets:
        held_out = _load_mixture(data.eval_datasets, data.streaming)
    elif data.test_split_size is not None:
        splits = train.train_test_split(test_size=data.test_split_size, seed=seed)
        train, held_out = splits["train"], splits["test"]
    for dataset in (train, held_out):
        columns = dataset.column_names if dataset is not None else None
        if columns is not None and data.text_column not in columns:
            raise ValueError(f"data.text_column={data.text_column!r} is not a column of the data (columns: {columns})")
    return train, held_out


def _load_mixture(configs, streaming: bool):
    import datasets

    loaded = []
    for config in configs:
        extra = {"sample_by": config.sample_by} if getattr(config, "sample_by", None) else {}
        dataset = datasets.load_dataset(
            config.path,
            config.name,
            data_dir=config.data_dir,
            data_files=config.data_files,
            split=config.split,
            streaming=streaming,
            **extra,
        )
        if config.columns is not None:
            dataset = dataset.select_columns(config.columns)
        loaded.append(dataset)
    fractions = [config.fraction for config in configs]
    if any(fraction is not None for fraction in fractions):
        # TRL's meaning: target shares of the mixture, capped so that no dataset is repeated.
        if None in fractions or streaming:
            raise ValueError("data: fraction must be set on every dataset or none, and not with streaming")
        weights = [fraction / sum(fractions) for fraction in fractions]
        total = min(len(dataset) / weight for dataset, weight in zip(loaded, weights) if weight > 0)
        loaded = [dataset.select(range(round(weight * total))) for dataset, weight in zip(loaded, weights)]
    return datasets.concatenate_datasets(loaded) if len(loaded) > 1 else loaded[0]


def tokenize_documents(dataset, tokenizer, text_column: str, eos_token_id: int, num_proc: int = 0):
    """`input_ids` per non-empty document, ending with `eos_token_id`. Special tokens follow the tokenizer's own
    convention (e.g. Llama 3 opens each document with bos), as they will at inference."""
    import datasets

    def encode(batch):
        # verbose=False: documents longer than the model's context are expected here, packing cuts them
        encoded = tokenizer(batch[text_column], verbose=False)["input_ids"]
        return {"input_ids": [ids if ids[-1:] == [eos_token_id] else [*ids, eos_token_id] for ids in encoded]}

    kwargs = {"num_proc": num_proc or None} if isinstance(dataset, datasets.Dataset) else {}
    dataset = dataset.filter(lambda text: bool(text and text.strip()), input_columns=text_column, **kwargs)
    return dataset.map(encode, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=dataset.column_names, **kwargs)


def token_lists(dataset) -> Iterator[list[int]]:
    for batch in dataset.iter(batch_size=TOKENIZE_BATCH):
        yield from batch["input_ids"]


def pack_documents(documents: Iterable[list[int]], seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy packing: `(input_ids, document_starts)` rows of exactly `seq_len`, int32 / bool. `document_starts`
    marks each document's first token, and each row's first token (a cut document goes on as a new segment)."""
    tokens: list[int] = []
    starts: list[bool] = []
    for ids in documents:
        tokens.extend(ids)
        starts.append(True)
        starts.extend(itertools.repeat(False, len(ids) - 1))
        offset = 0
        while len(tokens) - offset >= seq_len:
            row_starts = starts[offset : offset + seq_len]
            row_starts[0] = True
            yield (
                torch.tensor(tokens[offset : offset + seq_len], dtype=torch.int32),
                torch.tensor(row_starts, dtype=torch.bool),
            )
            offset += seq_len
        del tokens[:offset], starts[:offset]


def pack_rows(documents: Iterable[list[int]], seq_len: int, limit: int | None = None):
    """All packed rows (at most `limit`) as two `[rows, seq_len]` tensors."""
    rows = list(itertools.islice(pack_documents(documents, seq_len), limit))
    if not rows:
        return torch.empty(0, seq_len, dtype=torch.int32), torch.empty(0, seq_len, dtype=torch.bool)
    input_ids, starts = zip(*rows)
    return torch.stack(input_ids), torch.stack(starts)


def make_batch(input_ids: torch.Tensor, document_starts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs for packed rows: `input_ids`, `position_ids` counting from each segment start, and `labels`
    (= input_ids, -100 on document starts; the model shifts them)."""
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    segment_start = torch.where(document_starts, positions, 0).cummax(dim=1).values
    input_ids = input_ids.long()
    return {
        "input_ids": input_ids,
        "position_ids": positions - segment_start,
        "labels": input_ids.masked_fill(document_starts, -100),
    }


class PackedBatches:
    """Endless batches of `batch_size` packed rows for one process (see the module docstring for the order).
    `state_dict()` / `load_state_dict()` make it resumable: after a restore it yields the same batches again.
    An epoch's last rows that do not fill a batch are skipped."""

    def __init__(self, documents, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        import datasets

        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.streaming = isinstance(documents, datasets.IterableDataset)
        if self.streaming:
            from datasets.distributed import split_dataset_by_node

            documents = split_dataset_by_node(documents, rank=rank, world_size=world_size)
            self.documents = documents.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER_DOCUMENTS)
        else:
            self.input_ids, self.document_starts = pack_rows(token_lists(documents), seq_len)
            if len(self.input_ids) < batch_size * world_size:
                raise ValueError(
                    f"the training data packs into {len(self.input_ids)} rows of {seq_len} tokens, fewer than one "
                    f"step's {batch_size * world_size} rows; add data or lower seq_len / the batch size"
                )
        self.epoch, self.index = 0, 0
        self._rows: Iterator | None = None

    def _epoch_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.streaming:
            self.documents.set_epoch(self.epoch)  # the shuffle buffer's seed becomes seed + epoch
            rows = pack_documents(token_lists(self.documents), self.seq_len)
            return itertools.islice(rows, self.index, None)
        order = torch.randperm(len(self.input_ids), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        usable = len(order) - len(order) % self.world_size  # the same number of rows for every process
        mine = order[self.rank : usable : self.world_size][self.index :]
        return ((self.input_ids[i], self.document_starts[i]) for i in mine.tolist())

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            if self._rows is None:
                self._rows = self._epoch_rows()
            row = next(self._rows, None)
            if row is None:
                if self.index == 0:  # a whole epoch did not fill one batch: next epochs would not either
                    raise ValueError(f"process {self.rank} got fewer than {self.batch_size} training rows per epoch")
                self.epoch, self.index, self._rows, rows = self.epoch + 1, 0, None, []
                continue
            rows.append(row)
        self.index += self.batch_size
        input_ids, starts = zip(*rows)
        return make_batch(torch.stack(input_ids), torch.stack(starts))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._rows = state["epoch"], state["index"], None
