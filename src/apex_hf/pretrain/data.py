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

Order and mixture. A map-style source is packed once and read as an endless sequence of epochs, each a seeded
permutation of its rows; a streaming source is split between processes (`split_dataset_by_node`), shuffled with a
document buffer seeded by `seed + epoch`, and packed on the fly. Each global batch draws the source of every row from
the mixture's weights at that step (a curriculum moves them), and deals the rows round-robin to the processes
(`PackedBatches`). The iterator's whole state is the number of batches read and the rows drawn from each source (plus,
streaming, each source's position in its epoch), saved with every checkpoint.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Iterable, Iterator

import torch


SHUFFLE_BUFFER_DOCUMENTS = 10_000  # streaming only: documents held for the approximate shuffle
TOKENIZE_BATCH = 1000  # documents per tokenizer call


def load_documents(data, seed: int):
    """`(sources, held_out)`: the training documents as `{source name: dataset}` (`datasets.Dataset`, or
    `IterableDataset` with `data.streaming`), one entry per dataset when the mixture is weighted, else one
    concatenation; and the held-out documents (None when the recipe names none). Like TRL's `get_dataset`, but
    `sample_by` reaches the text builder and `test_split_size` splits with `seed` (each source alike), so every
    process and every run holds out the same documents."""
    import datasets

    loaded = [_load_dataset(config, data.streaming) for config in data.datasets]
    if data.is_weighted:
        sources = dict(zip(data.sources, loaded))
    else:
        sources = {"+".join(data.sources): _concatenate(_take_fractions(loaded, data.datasets, data.streaming))}
    held_out = None
    if data.eval_datasets:
        held_out = _concatenate([_load_dataset(config, data.streaming) for config in data.eval_datasets])
    elif data.test_split_size is not None:
        splits = {
            name: dataset.train_test_split(test_size=data.test_split_size, seed=seed)
            for name, dataset in sources.items()
        }
        sources = {name: split["train"] for name, split in splits.items()}
        held_out = datasets.concatenate_datasets([split["test"] for split in splits.values()])
    for name, dataset in [*sources.items(), ("held-out", held_out)]:
        columns = dataset.column_names if dataset is not None else None
        if columns is not None and data.text_column not in columns:
            raise ValueError(f"data.text_column={data.text_column!r} is not a column of {name!r} (columns: {columns})")
    return sources, held_out


def _load_dataset(config, streaming: bool):
    import datasets

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
    return dataset.select_columns(config.columns) if config.columns is not None else dataset


def _take_fractions(loaded: list, configs, streaming: bool) -> list:
    """TRL's `fraction`: target shares of the concatenation, capped so that no dataset is repeated."""
    fractions = [config.fraction for config in configs]
    if all(fraction is None for fraction in fractions):
        return loaded
    if None in fractions or streaming:
        raise ValueError("data: fraction must be set on every dataset or none, and not with streaming")
    weights = [fraction / sum(fractions) for fraction in fractions]
    total = min(len(dataset) / weight for dataset, weight in zip(loaded, weights) if weight > 0)
    return [dataset.select(range(round(weight * total))) for dataset, weight in zip(loaded, weights)]


def _concatenate(loaded: list):
    import datasets

    return datasets.concatenate_datasets(loaded) if len(loaded) > 1 else loaded[0]


def tokenize_documents(dataset, tokenizer, text_column: str, eos_token_id: int, num_proc: int = 0):
    """`input_ids` per non-empty document, ending with `eos_token_id`. Special tokens follow the tokenizer's own
    convention (e.g. Llama 3 opens each document with bos), as they will at inference."""
    import datasets

    def encode(batch):
        # verbose=False: documents longer than the model's context are expected here, packing cuts them
        encoded = tokenizer(batch[text_column], verbose=False)["input_ids"]
        for ids in encoded:  # in place: copying every document's list cost a tenth of the tokenizing
            if not ids or ids[-1] != eos_token_id:
                ids.append(eos_token_id)
        return {"input_ids": encoded}

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
    """All packed rows (at most `limit`) as two `[rows, seq_len]` tensors: `pack_documents`' rows, cut from one flat
    array of the documents' tokens (a tensor per row took 1.3 s of bench-moe's 24 MB corpus)."""
    tokens, document_starts = array("i"), []
    for ids in documents:
        if limit is not None and len(tokens) >= limit * seq_len:
            break
        document_starts.append(len(tokens))
        tokens.extend(ids)
    rows = len(tokens) // seq_len if limit is None else min(len(tokens) // seq_len, limit)
    if rows == 0:
        return torch.empty(0, seq_len, dtype=torch.int32), torch.empty(0, seq_len, dtype=torch.bool)
    input_ids = torch.frombuffer(tokens, dtype=torch.int32)[: rows * seq_len].clone().view(rows, seq_len)
    starts = torch.zeros(rows * seq_len, dtype=torch.bool)
    starts[[start for start in document_starts if start < rows * seq_len]] = True
    starts = starts.view(rows, seq_len)
    starts[:, 0] = True  # a document cut at a row boundary goes on as a new segment
    return input_ids, starts


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


class PackedRows:
    """A map-style source's packed rows, read as one endless sequence: row `k` is row `k % n` of epoch `k // n`'s
    permutation (`torch.randperm` seeded by the run's seed, the source's index and the epoch)."""

    def __init__(self, documents, seq_len: int, seed: int, name: str):
        self.input_ids, self.document_starts = pack_rows(token_lists(documents), seq_len)
        if len(self.input_ids) == 0:
            raise ValueError(f"source {name!r} packs into no row of {seq_len} tokens; add data or lower seq_len")
        self.seed = seed
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.input_ids)

    def row(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(k, len(self))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self), generator=generator)
        i = int(self._order[index])
        return self.input_ids[i], self.document_starts[i]


class StreamedRows:
    """A streaming source's rows for one process: its shard of the documents (`split_dataset_by_node`), shuffled
    through a buffer seeded by `seed + epoch`, packed on the fly; started again when it runs out. The state is
    `(epoch, rows read in the epoch)`; restoring it re-reads the epoch up to that row."""

    def __init__(self, documents, seq_len: int, seed: int, name: str, rank: int, world_size: int):
        from datasets.distributed import split_dataset_by_node

        documents = split_dataset_by_node(documents, rank=rank, world_size=world_size)
        self.documents = documents.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER_DOCUMENTS)
        self.seq_len, self.name = seq_len, name
        self.epoch, self.index = 0, 0
        self._rows: Iterator | None = None

    def next_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            self.documents.set_epoch(self.epoch)  # the shuffle buffer's seed becomes seed + epoch
            self._rows = itertools.islice(pack_documents(token_lists(self.documents), self.seq_len), self.index, None)
        row = next(self._rows, None)
        if row is None:
            if self.index == 0:
                raise ValueError(f"source {self.name!r} packs into no row of {self.seq_len} tokens on this process")
            self.epoch, self.index, self._rows = self.epoch + 1, 0, None
            return self.next_row()
        self.index += 1
        return row

    def state_dict(self) -> list[int]:
        return [self.epoch, self.index]

    def load_state_dict(self, state: list[int]) -> None:
        (self.epoch, self.index), self._rows = state, None


class PackedBatches:
    """Endless batches of `batch_size` packed rows for process `rank` of `world_size`, from one or more sources.

    The processes together read global batches of `batch_size * world_size` rows; global row `p` of a batch goes to
    process `p % world_size`. Each global row's source is drawn from `mixture(step)` (the sources' probabilities
    at the optimizer step the batch belongs to, `accumulation` batches per step) by a generator seeded by the run's
    seed and the batch index; with one source and no mixture, every row comes from it. A map-style source's rows are
    numbered globally (see `PackedRows`), so a run reads the same global batches on any number of processes.

    `state_dict()` / `load_state_dict()` make it resumable: after a restore it yields the same batches again."""

    def __init__(
        self,
        sources: dict,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        mixture: Callable[[int], list[float]] | None = None,
        accumulation: int = 1,
    ):
        """`sources`: name -> tokenized documents (a `datasets.Dataset`, or an `IterableDataset` when streaming)."""
        import datasets

        if mixture is None and len(sources) != 1:
            raise ValueError(f"{len(sources)} sources need a mixture to draw from")
        self.names = list(sources)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.mixture, self.accumulation = mixture, accumulation
        self.streaming = isinstance(next(iter(sources.values())), datasets.IterableDataset)
        self.sources = [
            StreamedRows(documents, seq_len, seed + 1000 * i, name, rank, world_size)
            if self.streaming
            else PackedRows(documents, seq_len, seed + 1000 * i, name)
            for i, (name, documents) in enumerate(sources.items())
        ]
        if not self.streaming and mixture is None and len(self.sources[0]) < batch_size * world_size:
            raise ValueError(
                f"the training data packs into {len(self.sources[0])} rows of {seq_len} tokens, fewer than one "
                f"step's {batch_size * world_size} rows; add data or lower seq_len / the batch size"
            )
        self.batches = 0  # global batches read so far
        self.rows_drawn = [0] * len(self.sources)  # global rows drawn from each source

    def batch_sources(self, batch: int) -> list[int]:
        """The source of each global row of global batch `batch`."""
        rows = self.batch_size * self.world_size
        if self.mixture is None:
            return [0] * rows
        weights = torch.tensor(self.mixture(batch // self.accumulation), dtype=torch.float64)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch)
        return torch.multinomial(weights, rows, replacement=True, generator=generator).tolist()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for position, source_index in enumerate(self.batch_sources(self.batches)):
            source = self.sources[source_index]
            if position % self.world_size == self.rank:
                rows.append(source.next_row() if self.streaming else source.row(self.rows_drawn[source_index]))
            self.rows_drawn[source_index] += 1
        self.batches += 1
        input_ids, starts = zip(*rows)
        return make_batch(torch.stack(input_ids), torch.stack(starts))

    def state_dict(self) -> dict:
        state = {"batches": self.batches, "rows_drawn": dict(zip(self.names, self.rows_drawn))}
        if self.streaming:
            state["streams"] = {name: source.state_dict() for name, source in zip(self.names, self.sources)}
        return state

    def load_state_dict(self, state: dict) -> None:
        if list(state["rows_drawn"]) != self.names:
            raise ValueError(f"the data state is for sources {list(state['rows_drawn'])}, this run has {self.names}")
        self.batches = state["batches"]
        self.rows_drawn = list(state["rows_drawn"].values())
        for name, source in zip(self.names, self.sources):
            if self.streaming:
                source.load_state_dict(state["streams"][name])
