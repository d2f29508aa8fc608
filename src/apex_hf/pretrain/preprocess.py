"""`apex-hf preprocess INPUT... --output OUT`: raw text -> cleaned, filtered, deduplicated files the trainer reads.

Built on datatrove, Hugging Face's data-processing library. FineWeb and FineWeb-Edu were built with it, its Gopher,
C4 and FineWeb quality filters and its MinHash deduplication are the reference implementations of those rules, and
the same pipeline steps run here on local processes (`LocalPipelineExecutor`) or, unchanged, sharded across a Slurm
cluster (`SlurmPipelineExecutor`).

Stages, each a datatrove pipeline run by `LocalPipelineExecutor` with `workers` tasks:

1. read: `JsonlReader` (.jsonl, .jsonl.gz), `ParquetReader` (.parquet), `HuggingFaceDatasetReader` over datasets'
   `text` builder (.txt, one document per paragraph by default, as in the pre-training recipes) and over a Hub
   dataset (streamed);
2. clean: `FTFYFormatter` (broken encodings, control characters) and `SymbolLinesFormatter` (lines made only of
   symbols), then a `LambdaFilter` drops documents left empty;
3. quality filters, FineWeb's set in FineWeb's order and settings: `GopherRepetitionFilter`, `GopherQualityFilter`,
   `C4QualityFilter(filter_no_terminal_punct=False)` (it also removes short lines and citation marks),
   `FineWebQualityFilter`;
4. exact dedup: `ExactDedupSignature` -> `ExactFindDedups` -> `ExactDedupFilter`, on the text with whitespace runs
   collapsed;
5. near dedup: `MinhashDedupSignature` -> `MinhashDedupBuckets` -> `MinhashDedupCluster` -> `MinhashDedupFilter`
   (5-word shingles, 14 buckets x 8 hashes: documents above ~0.72 Jaccard similarity are caught with high
   probability, threshold ~ (1 / buckets) ** (1 / hashes_per_bucket));
6. write: `JsonlWriter` (`00000.jsonl.gz`, ...) or `ParquetWriter`, columns `text` and `id` (other input columns are
   dropped), and `preprocess_summary.json`, from the executors' per-block stats: documents read, removed by each
   block (and the filters' reasons), documents, words (whitespace-separated) and characters kept.

A dedup stage reads its input twice (signatures, then the filter that drops what they matched), so each stage's
output is written to an intermediate folder and read back. Of duplicates one is kept: with one worker, the first
read.

Offline: every word-level block (Gopher, FineWeb, C4's sentence count, MinHash shingles) uses datatrove's English
word tokenizer, spaCy's blank `en` pipeline, which ships with spaCy: no model is downloaded at run time. Left out
because they download models: `LanguageFilter` (fastText language id), `FastTextClassifierFilter` (e.g. the
FineWeb-Edu classifier) and `TokensCounter` (a Hub tokenizer); add them to the pipeline where the network is
available. English only: the Gopher stop words and the tokenizer are English.

The output is built in a hidden folder next to OUT and renamed into place at the end, so OUT is either complete or
untouched.
"""

from __future__ import annotations

# The standard library only at import (datatrove when it runs): `apex-hf` builds its parser with
# `add_preprocess_arguments`.
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
SAMPLE_BY = ("paragraph", "line", "document")
OUTPUT_FORMATS = ("jsonl", "parquet")
INPUT_SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
SUMMARY_FILE = "preprocess_summary.json"
ORJSON_MISSING = (
    "apex-hf preprocess reads and writes JSON lines with datatrove's JsonlReader and JsonlWriter, which need orjson "
    '(datatrove does not install it): pip install "apex-hf[train]" (or pip install orjson)'
)


class PreprocessError(ValueError):
    """The data itself is unusable: nothing was read, or nothing was kept."""


@dataclass
class PreprocessConfig:
    """What to read, which blocks to run, where to write. Checked on construction (inputs exist and have a known
    format, OUT is free), before anything is read."""

    output_dir: str
    inputs: list[str] = field(default_factory=list)  # files (.txt, .jsonl, .jsonl.gz, .parquet) or folders of them
    hub_dataset: str | None = None  # a Hub dataset id (or a local dataset folder), read with datasets, streamed
    hub_name: str | None = None  # its configuration name
    hub_split: str = "train"
    text_column: str = "text"  # of .jsonl / .parquet / Hub inputs; the output column is always `text`
    sample_by: str = "paragraph"  # .txt inputs: a document per paragraph (blank-line separated), line or file
    filters: tuple[str, ...] = FILTERS
    min_words: int | None = None  # GopherQualityFilter's min_doc_words; None: its default, 50
    exact_dedup: bool = True
    near_dedup: bool = True
    minhash_ngrams: int = 5
    minhash_buckets: int = 14
    minhash_hashes_per_bucket: int = 8
    output_format: str = "jsonl"
    workers: int = 1  # parallel tasks of each stage
    overwrite: bool = False

    def __post_init__(self):
        self.inputs = [str(path) for path in self.inputs]
        self.filters = tuple(self.filters)
        if not self.inputs and self.hub_dataset is None:
            raise ValueError("inputs is empty and hub_dataset is not set: nothing to read")
        if not self.output_dir:
            raise ValueError("output_dir is not set")
        for name, value, allowed in (
            ("sample_by", self.sample_by, SAMPLE_BY),
            ("output_format", self.output_format, OUTPUT_FORMATS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is invalid: must be one of {allowed}")
        unknown = [name for name in self.filters if name not in FILTERS]
        if unknown:
            raise ValueError(f"filters: unknown {unknown}, the filters are {FILTERS}")
        for name in ("workers", "minhash_ngrams", "minhash_buckets", "minhash_hashes_per_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if self.min_words is not None:
            if self.min_words < 0:
                raise ValueError(f"min_words={self.min_words!r} is invalid: must be >= 0")
            if "gopher_quality" not in self.filters:
                raise ValueError("min_words is applied by the gopher_quality filter, which is not in filters")
        files = self.input_files()  # raises on a missing input or an unknown format
        self._check_output(files)

    def input_files(self) -> dict[str, list[str]]:
        """The input files by format (`text`, `jsonl`, `parquet`), absolute; folders are searched recursively."""
        files: dict[str, list[str]] = {}
        for given in self.inputs:
            path = Path(given)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and _input_format(p) is not None)
                if not found:
                    raise ValueError(f"input folder {given} holds no {'/'.join(INPUT_SUFFIXES)} file")
            elif path.is_file():
                if _input_format(path) is None:
                    raise ValueError(f"input {given}: unknown format, the readable ones are {list(INPUT_SUFFIXES)}")
                found = [path]
            else:
                raise FileNotFoundError(f"input {given} does not exist")
            for file in found:
                paths = files.setdefault(_input_format(file), [])
                if str(file.resolve()) not in paths:
                    paths.append(str(file.resolve()))
        return files

    def _check_output(self, files: dict[str, list[str]]) -> None:
        output = Path(self.output_dir).resolve()
        if output.is_file():
            raise ValueError(f"output_dir {self.output_dir} is a file")
        if output.is_dir() and any(output.iterdir()) and not self.overwrite:
            raise ValueError(
                f"output_dir {self.output_dir} exists and is not empty: set overwrite (--overwrite) to replace it"
            )
        # OUT inside an input folder would be read as input by the next run; an input inside OUT would be deleted
        # by overwrite.
        for given in self.inputs:
            path = Path(given).resolve()
            if path.is_dir() and output.is_relative_to(path):
                raise ValueError(f"output_dir {self.output_dir} is inside the input folder {given}")
        inside = [path for paths in files.values() for path in paths if Path(path).is_relative_to(output)]
        if inside:
            raise ValueError(f"input {inside[0]} is inside output_dir {self.output_dir}")


def _input_format(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in INPUT_SUFFIXES.items() if name.endswith(suffix)), None)


def preprocess(config: PreprocessConfig) -> dict:
    """Run the stages of the module docstring and publish OUT; returns (and prints) the summary. Raises
    `PreprocessError` when no document is read or none is kept, leaving OUT untouched."""
    _require_orjson(config)
    output = Path(config.output_dir).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    # Next to OUT, so the final rename stays on one file system; intermediates go there too, as big as the data.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        built = staging / "out"
        summary = {
            "output_dir": str(output),
            "data_files": str(output / f"*.{'jsonl.gz' if config.output_format == 'jsonl' else 'parquet'}"),
            **_run_stages(config, staging / "work", built),
        }
        (built / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if output.exists():
            output.rename(staging / "previous")  # the old OUT goes with the staging folder
        built.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(summary, config.output_format)
    return summary


def _require_orjson(config: PreprocessConfig) -> None:
    """Fail before any stage when orjson is missing and JSON lines are read or written (.jsonl inputs, jsonl output,
    or a dedup stage, whose intermediates are JSON lines): an error naming the install command, not datatrove's."""
    uses_jsonl = config.exact_dedup or config.near_dedup or config.output_format == "jsonl"
    if (uses_jsonl or "jsonl" in config.input_files()) and importlib.util.find_spec("orjson") is None:
        raise ImportError(ORJSON_MISSING)


# --------------------------------------------------------------------------------------------------------------------
# the stages


def _run_stages(config: PreprocessConfig, work: Path, output: Path) -> dict:
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.formatters import FTFYFormatter, SymbolLinesFormatter
    from datatrove.pipeline.readers import JsonlReader

    work.mkdir(parents=True)
    dedups = [name for name, on in (("exact", config.exact_dedup), ("near", config.near_dedup)) if on]

    # 1-3: read, clean, filter; straight into OUT when no dedup follows
    source = work / "filtered" if dedups else output
    blocks = [("read", reader) for reader in _readers(config, work)]
    blocks += [("clean", FTFYFormatter()), ("clean", SymbolLinesFormatter())]
    blocks += [("empty_after_cleaning", LambdaFilter(_has_text))]
    blocks += [(name, _quality_filter(name, config)) for name in config.filters]
    blocks += [("write", _writer(config, source, final=not dedups))]
    stats = _run(work, "filter", blocks, config.workers)
    read = sum(_total(stat, "documents") for key, stat in stats if key == "read")
    removed = {key: _total(stat, "dropped") for key, stat in stats if key not in ("read", "clean", "write")}
    # datatrove counts each filter's drops by reason as `dropped_<reason>`
    reasons = {
        key: {
            label.removeprefix("dropped_"): int(metric.total)
            for label, metric in stat.stats.items()
            if label.startswith("dropped_")
        }
        for key, stat in stats
        if key in FILTERS
    }
    written = dict(stats)["write"]
    if read == 0:
        raise PreprocessError(
            f"read no document with text from the inputs: is the text column {config.text_column!r} right?"
        )
    if _total(written, "total") == 0:
        raise PreprocessError(f"all {read} documents were removed by cleaning and quality filters: {removed}")

    # 4-5: a dedup reads the previous stage's output twice, to find the duplicates and then to drop them
    for index, name in enumerate(dedups):
        final = index == len(dedups) - 1
        target = output if final else work / f"{name}_unique"
        find = _find_exact_duplicates if name == "exact" else _find_near_duplicates
        blocks = [("read", JsonlReader(str(source))), ("dedup", find(config, work, source))]
        blocks += [("write", _writer(config, target, final))]
        stats = dict(_run(work, f"{name}_dedup_filter", blocks, config.workers))
        removed[f"{name}_duplicates"] = _total(stats["dedup"], "dropped")
        written, source = stats["write"], target

    return {
        "documents_read": read,
        "removed": removed,
        "removal_reasons": reasons,
        "documents_kept": _total(written, "total"),
        "words_kept": _total(written, "words"),
        "characters_kept": _total(written, "doc_len"),
        "output_files": sorted(path.name for path in output.iterdir()),
        "config": {**asdict(config), "filters": list(config.filters)},  # as JSON reads it back
    }


def _find_exact_duplicates(config: PreprocessConfig, work: Path, source: Path):
    """Hash every document of `source`, find the repeated hashes; returns the block that drops all but the first."""
    from datatrove.pipeline.dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.readers import JsonlReader

    dedup = ExactDedupConfig(content_getter=_collapsed_text, hash_config=_hash_config())
    signatures, duplicates = str(work / "exact_signatures"), str(work / "exact_duplicates")
    _run(
        work,
        "exact_signatures",
        [("", JsonlReader(str(source))), ("", ExactDedupSignature(signatures, dedup))],
        config.workers,
    )
    _run(work, "exact_find", [("", ExactFindDedups(signatures, duplicates, dedup))], workers=1)
    return ExactDedupFilter(duplicates, dedup)


def _find_near_duplicates(config: PreprocessConfig, work: Path, source: Path):
    """MinHash signatures of `source`, candidate pairs per LSH bucket, clusters; returns the block that keeps one
    document per cluster."""
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader

    minhash = MinhashConfig(
        n_grams=config.minhash_ngrams,
        num_buckets=config.minhash_buckets,
        hashes_per_bucket=config.minhash_hashes_per_bucket,
        hash_config=_hash_config(),
    )
    signatures, buckets, clusters = (str(work / f"minhash_{name}") for name in ("signatures", "buckets", "clusters"))
    _run(
        work,
        "minhash_signatures",
        [("", JsonlReader(str(source))), ("", MinhashDedupSignature(signatures, minhash))],
        config.workers,
    )
    # datatrove wants a multiple of num_buckets tasks here: one per bucket
    _run(
        work,
        "minhash_buckets",
        [("", MinhashDedupBuckets(signatures, buckets, config=minhash))],
        workers=min(config.workers, config.minhash_buckets),
        tasks=config.minhash_buckets,
    )
    _run(work, "minhash_cluster", [("", MinhashDedupCluster(buckets, clusters, config=minhash))], workers=1)
    return MinhashDedupFilter(clusters)


def _hash_config():
    """64-bit SHA-1. datatrove's default, xxhash, is given `str` here, which xxhash >= 4 refuses ("Strings must be
    encoded before hashing"); datatrove's own `processing` extra pins xxhash < 4, but `datasets` is happy with 4 and
    environments have it. SHA-1 takes `str` and needs nothing."""
    from datatrove.utils.hashing import HashConfig

    return HashConfig(precision=64, hash_fc="sha1")


def _run(work: Path, name: str, blocks: list[tuple[str, object]], workers: int, tasks: int | None = None) -> list:
    """Run one datatrove pipeline; returns `(key, Stats)` per block, summed over the tasks."""
    from datatrove.executor import LocalPipelineExecutor

    # fork: the workers inherit the loaded modules. With datatrove's default, forkserver, every worker of every stage
    # would unpickle the pipeline and so import apex_hf (this module's functions are in it), and torch with it: ~5 s.
    executor = LocalPipelineExecutor(
        [block for _, block in blocks],
        tasks=tasks or workers,
        workers=workers,
        logging_dir=str(work / "logs" / name),
        start_method="fork",
    )
    return list(zip([key for key, _ in blocks], executor.run().stats))


def _total(stat, label: str) -> int:
    return int(stat[label].total)


# --------------------------------------------------------------------------------------------------------------------
# blocks


def _readers(config: PreprocessConfig, work: Path) -> list:
    """One reader per input format (datatrove deals its files out to the tasks), then the Hub dataset."""
    from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader

    readers = []
    for kind, paths in config.input_files().items():
        if kind == "text":
            # datasets' text builder, which is how the pre-training recipes read .txt (`sample_by`); streamed, so no
            # Arrow cache is written
            options = {"data_files": paths, "split": "train", "sample_by": config.sample_by}
            readers.append(HuggingFaceDatasetReader("text", options, streaming=True))
            continue
        # the disk readers take one folder: the files' common folder, and the list of files relative to it
        root = os.path.commonpath([os.path.dirname(path) for path in paths])
        listing = work / f"{kind}_files.txt"
        listing.write_text("".join(os.path.relpath(path, root) + "\n" for path in paths), encoding="utf-8")
        reader = JsonlReader if kind == "jsonl" else ParquetReader
        readers.append(reader(root, paths_file=str(listing), text_key=config.text_column))
    if config.hub_dataset is not None:
        options = {"name": config.hub_name, "split": config.hub_split}
        readers.append(
            HuggingFaceDatasetReader(config.hub_dataset, options, streaming=True, text_key=config.text_column)
        )
    return readers


def _quality_filter(name: str, config: PreprocessConfig):
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    if name == "gopher_repetition":
        return GopherRepetitionFilter()
    if name == "gopher_quality":
        return GopherQualityFilter(**({} if config.min_words is None else {"min_doc_words": config.min_words}))
    if name == "c4":
        # FineWeb's setting: C4's rule dropping every line without final punctuation removes too much of the web
        return C4QualityFilter(filter_no_terminal_punct=False)
    return FineWebQualityFilter()


def _writer(config: PreprocessConfig, folder: Path, final: bool):
    """The output writer, or, for intermediate folders, uncompressed JSON lines (read back once or twice)."""
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

    if not final:
        return JsonlWriter(str(folder), compression=None, adapter=_record)
    if config.output_format == "parquet":
        return ParquetWriter(str(folder), adapter=_record)
    return JsonlWriter(str(folder), adapter=_record)  # gzip: 00000.jsonl.gz


def _record(writer, document) -> dict:
    """The row written: `text` and `id` (a string, so that ids from different inputs share one type). datatrove binds
    this to the writer, so it also counts the words written into the writer's stats, for the summary."""
    writer.stat_update("words", value=len(document.text.split()))
    return {"text": document.text, "id": str(document.id)}


def _has_text(document) -> bool:
    return bool(document.text.strip())


def _collapsed_text(document) -> str:
    """What exact dedup hashes: the text with whitespace runs collapsed. (datatrove reads this function's return
    annotation to pick the hash's input type.)"""
    return " ".join(document.text.split())


def _print_summary(summary: dict, output_format: str) -> None:
    print(f"[preprocess] read {summary['documents_read']:,} documents")
    for name, count in summary["removed"].items():
        reasons = summary["removal_reasons"].get(name)
        detail = f" ({', '.join(f'{reason} {n:,}' for reason, n in reasons.items())})" if reasons else ""
        print(f"[preprocess]   removed by {name}: {count:,}{detail}")
    print(
        f"[preprocess] kept {summary['documents_kept']:,} documents, {summary['words_kept']:,} words in "
        f"{summary['output_dir']} ({', '.join(summary['output_files'])})"
    )
    path = "json" if output_format == "jsonl" else "parquet"
    print(f"[preprocess] recipe entry: {{path: {path}, data_files: {summary['data_files']}}}")


# --------------------------------------------------------------------------------------------------------------------
# command line (`apex-hf preprocess`; apex_hf.cli adds these arguments and reports the errors)


def add_preprocess_arguments(parser) -> None:
    """The flags of `apex-hf preprocess`; each sets the `PreprocessConfig` field of its `dest`."""
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="files (.txt, .jsonl, .jsonl.gz, .parquet) or folders"
    )
    parser.add_argument("--output", dest="output_dir", required=True, metavar="OUT", help="new folder for the result")
    parser.add_argument("--hub-dataset", metavar="ID", help="also read this Hub dataset (streamed)")
    parser.add_argument("--hub-name", metavar="NAME", help="the Hub dataset's configuration")
    parser.add_argument("--hub-split", default=PreprocessConfig.hub_split, help="default: %(default)s")
    parser.add_argument(
        "--text-column", default=PreprocessConfig.text_column, help="text column of .jsonl/.parquet/Hub inputs"
    )
    parser.add_argument(
        "--sample-by",
        choices=SAMPLE_BY,
        default=PreprocessConfig.sample_by,
        help=".txt inputs: one document per paragraph (blank-line separated), line or file",
    )
    parser.add_argument(
        "--filters",
        default=",".join(FILTERS),
        help="comma-separated quality filters, in order, or 'none' (default: %(default)s)",
    )
    parser.add_argument(
        "--min-words", type=int, help="fewest words (non-punctuation tokens) a document may have; default 50 (Gopher)"
    )
    parser.add_argument("--no-exact-dedup", dest="exact_dedup", action="store_false", help="keep exact duplicates")
    parser.add_argument("--no-near-dedup", dest="near_dedup", action="store_false", help="keep near duplicates")
    parser.add_argument(
        "--minhash-ngrams", type=int, default=PreprocessConfig.minhash_ngrams, help="words per shingle (%(default)s)"
    )
    parser.add_argument(
        "--minhash-buckets",
        type=int,
        default=PreprocessConfig.minhash_buckets,
        help="LSH buckets of --minhash-hashes-per-bucket r hashes: documents more similar than about "
        "(1 / buckets) ** (1 / r) (Jaccard of their shingles; 14 and 8: 0.72) are near duplicates",
    )
    parser.add_argument(
        "--minhash-hashes-per-bucket", type=int, default=PreprocessConfig.minhash_hashes_per_bucket, help="%(default)s"
    )
    parser.add_argument(
        "--format", dest="output_format", choices=OUTPUT_FORMATS, default=PreprocessConfig.output_format
    )
    parser.add_argument("--workers", type=int, default=PreprocessConfig.workers, help="parallel tasks per stage (1)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def config_from_args(args) -> PreprocessConfig:
    """The `PreprocessConfig` of parsed `add_preprocess_arguments` flags (raises on invalid values)."""
    names = {item.name for item in fields(PreprocessConfig)}
    values = {name: value for name, value in vars(args).items() if name in names}
    values["filters"] = tuple(name.strip() for name in args.filters.split(",") if name.strip() not in ("", "none"))
    return PreprocessConfig(**values)
