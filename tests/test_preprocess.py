"""`apex-hf preprocess` (apex_hf.pretrain.preprocess, on datatrove).

A tiny corpus spread over .jsonl, .parquet and .txt: good documents (topics of data/tiny_corpus.txt), exact duplicates
(one with its spacing changed), a near duplicate (two words changed) and one low-quality document for each cleaning
step and filter. Exactly the good documents survive, once each; the summary counts every removal; `datasets` reads
the output as the trainer does. Bad input fails before anything runs, with a message naming it, and OUT is replaced
only by a complete result.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import pytest


pytest.importorskip("datatrove")
pytest.importorskip("spacy")

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from apex_hf.cli import main  # noqa: E402
from apex_hf.pretrain.preprocess import PreprocessConfig, PreprocessError, preprocess  # noqa: E402


CORPUS = Path(__file__).resolve().parent.parent / "data" / "tiny_corpus.txt"
TOPICS = [topic.strip() for topic in CORPUS.read_text(encoding="utf-8").split("\n\n") if topic.strip()]


def topic(start: str) -> str:
    return next(text for text in TOPICS if text.startswith(start))


# Prose that passes every filter unchanged (C4's filter rewrites some other topics: it drops their short lines).
GOOD = [
    topic(start)
    for start in (
        "An identifier occurring",
        "Python supports string",
        "A *context manager*",
        "Deletion is recursively",
        'The "nonlocal" statement',
    )
]
NEAR_DUPLICATE = GOOD[2].replace("runtime", "execution", 1).replace("object", "value", 1)  # two words changed
SPACED_DUPLICATE = GOOD[1].replace(" ", "  ", 3)  # exact dedup compares text with whitespace runs collapsed
SYMBOLS = "#####\n* * * * *\n-----\n$$$ %%% &&&"  # only symbol lines: empty once cleaned
HASHTAGS = "Follow us " + " ".join(f"#topic{i}" for i in range(60))
# Dropped by Gopher's repetition filter before Gopher's length rule: its most common 2-gram, though it occurs once,
# is over 20% of its characters.
SHORT = "Buy now and save."
REPEATED = "\n".join(["Subscribe to our newsletter for the latest deals and offers."] * 30)
LOREM = topic("A slicing selects") + " Lorem ipsum dolor sit amet."
# Clean words cut into lines without end punctuation: a list, not prose
WORDS = re.findall(r"[A-Za-z]+", topic('A "yield" statement'))
LISTING = "\n".join(" ".join(WORDS[i : i + 6]) for i in range(0, len(WORDS), 6))


def write_corpus(folder: Path) -> list[str]:
    folder.mkdir()
    rows = [GOOD[0], SYMBOLS, GOOD[1], HASHTAGS, GOOD[2], SHORT, REPEATED, GOOD[0], LISTING]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
    pq.write_table(pa.table({"text": [GOOD[3], SPACED_DUPLICATE, NEAR_DUPLICATE]}), folder / "more.parquet")
    (folder / "notes.txt").write_text(f"{GOOD[4]}\n\n{LOREM}\n")  # two documents: one per paragraph
    return [str(folder / name) for name in ("corpus.jsonl", "more.parquet", "notes.txt")]


def test_keeps_each_good_document_once(tmp_path):
    inputs = write_corpus(tmp_path / "raw")
    out = tmp_path / "out"
    summary = preprocess(PreprocessConfig(output_dir=str(out), inputs=inputs))

    rows = [json.loads(line) for line in gzip.open(out / "00000.jsonl.gz", "rt")]
    assert sorted(row["text"] for row in rows) == sorted(GOOD)  # of duplicates, the first read is kept
    assert summary["documents_read"] == 14
    assert summary["removed"] == {
        "empty_after_cleaning": 1,
        "gopher_repetition": 2,
        "gopher_quality": 1,
        "c4": 1,
        "fineweb": 1,
        "exact_duplicates": 2,
        "near_duplicates": 1,
    }
    assert summary["removal_reasons"] == {
        "gopher_repetition": {"dup_line_frac": 1, "top_2_gram": 1},  # REPEATED; SHORT, too short for its 2-grams
        "gopher_quality": {"gopher_too_many_hashes": 1},
        "c4": {"lorem_ipsum": 1},
        "fineweb": {"line_punct_ratio": 1},
    }
    assert summary["documents_kept"] == 5
    assert summary["words_kept"] == sum(len(text.split()) for text in GOOD)
    assert summary["characters_kept"] == sum(len(text) for text in GOOD)
    assert json.loads((out / "preprocess_summary.json").read_text()) == summary
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "raw"]  # no staging folder left

    # what a pre-training recipe's {path: json, data_files: OUT/*.jsonl.gz} loads
    loaded = datasets.load_dataset("json", data_files=summary["data_files"], split="train", cache_dir=tmp_path / "c")
    assert loaded.column_names == ["text", "id"]
    assert sorted(loaded["text"]) == sorted(GOOD)


def test_cli_hub_dataset_parquet_output(tmp_path, capsys):
    # A local dataset folder goes through the same reader as a Hub id (datasets.load_dataset), offline.
    hub = tmp_path / "hub"
    hub.mkdir()
    rows = [GOOD[0], SHORT, GOOD[1], GOOD[0]]
    (hub / "train.jsonl").write_text("".join(json.dumps({"body": text, "n": i}) + "\n" for i, text in enumerate(rows)))
    pq.write_table(pa.table({"body": [GOOD[3], GOOD[2], NEAR_DUPLICATE]}), tmp_path / "more.parquet")
    out = tmp_path / "out"
    argv = ["preprocess", str(tmp_path / "more.parquet"), "--hub-dataset", str(hub), "--output", str(out)]
    argv += ["--text-column", "body", "--filters", "gopher_quality", "--min-words", "20", "--no-near-dedup"]
    assert main([*argv, "--format", "parquet", "--workers", "2"]) == 0

    summary = json.loads((out / "preprocess_summary.json").read_text())
    assert summary["removed"] == {"empty_after_cleaning": 0, "gopher_quality": 1, "exact_duplicates": 1}
    assert summary["removal_reasons"] == {"gopher_quality": {"gopher_short_doc": 1}}
    loaded = datasets.load_dataset(
        "parquet", data_files=summary["data_files"], split="train", cache_dir=tmp_path / "c"
    )
    assert loaded.column_names == ["text", "id"]
    assert sorted(loaded["text"]) == sorted([GOOD[0], GOOD[1], GOOD[2], GOOD[3], NEAR_DUPLICATE])
    assert f"recipe entry: {{path: parquet, data_files: {out}/*.parquet}}" in capsys.readouterr().out


def test_out_is_replaced_only_by_a_complete_result(tmp_path):
    (tmp_path / "junk.jsonl").write_text(json.dumps({"text": SHORT}) + "\n")
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": GOOD[0]}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")

    with pytest.raises(ValueError, match="exists and is not empty"):
        PreprocessConfig(output_dir=str(out), inputs=[str(tmp_path / "good.jsonl")])
    with pytest.raises(PreprocessError, match="all 1 documents were removed"):
        preprocess(PreprocessConfig(output_dir=str(out), inputs=[str(tmp_path / "junk.jsonl")], overwrite=True))
    assert [path.name for path in out.iterdir()] == ["old.txt"]
    with pytest.raises(PreprocessError, match="is the text column 'body' right"):
        preprocess(PreprocessConfig(str(out), [str(tmp_path / "good.jsonl")], text_column="body", overwrite=True))
    assert [path.name for path in out.iterdir()] == ["old.txt"]

    # no filter, no dedup: the documents as read, into the old OUT's place
    only_cleaning = {"filters": (), "exact_dedup": False, "near_dedup": False, "overwrite": True}
    summary = preprocess(PreprocessConfig(str(out), [str(tmp_path / "good.jsonl")], **only_cleaning))
    assert sorted(path.name for path in out.iterdir()) == ["00000.jsonl.gz", "preprocess_summary.json"]
    assert summary["removed"] == {"empty_after_cleaning": 0} and summary["documents_kept"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["good.jsonl", "junk.jsonl", "out"]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"inputs": ["missing.jsonl"]}, FileNotFoundError, "input missing.jsonl does not exist"),
        ({"inputs": ["table.csv"]}, ValueError, "input table.csv: unknown format"),
        ({"inputs": ["empty"]}, ValueError, "input folder empty holds no"),
        ({"inputs": []}, ValueError, "nothing to read"),
        ({"filters": ("gopher",)}, ValueError, r"filters: unknown \['gopher'\]"),
        ({"filters": ("c4",), "min_words": 10}, ValueError, "min_words is applied by the gopher_quality filter"),
        ({"workers": 0}, ValueError, "workers=0 is invalid"),
        ({"output_format": "csv"}, ValueError, "output_format='csv' is invalid"),
        ({"sample_by": "sentence"}, ValueError, "sample_by='sentence' is invalid"),
        ({"output_dir": "table.csv"}, ValueError, "output_dir table.csv is a file"),
        ({"output_dir": "."}, ValueError, r"output_dir \. is inside the input folder \."),
        ({"inputs": ["full"], "output_dir": "full/out"}, ValueError, "is inside the input folder full"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, monkeypatch, change, error, message):
    monkeypatch.chdir(tmp_path)
    Path("table.csv").write_text("text\nhello\n")
    Path("good.jsonl").write_text(json.dumps({"text": GOOD[0]}) + "\n")
    Path("empty").mkdir()
    Path("full").mkdir()
    Path("full/a.jsonl").write_text(json.dumps({"text": GOOD[0]}) + "\n")
    values = {"output_dir": "out", "inputs": ["good.jsonl"], **change}
    if values["output_dir"] == ".":
        values["inputs"], values["overwrite"] = ["."], True
    with pytest.raises(error, match=message):
        PreprocessConfig(**values)


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"apex-hf preprocess: error: input {tmp_path}/missing.jsonl does not exist\n"

    (tmp_path / "junk.jsonl").write_text(json.dumps({"text": SHORT}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", str(tmp_path / "junk.jsonl"), "--output", str(tmp_path / "out"), "--filters", "c4"])
    assert exit_info.value.code == 2
    assert "apex-hf preprocess: error: all 1 documents were removed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_orjson_the_error_names_it_before_anything_runs(tmp_path, monkeypatch):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": GOOD[0]}) + "\n")
    config = PreprocessConfig(str(tmp_path / "out"), [str(tmp_path / "good.jsonl")])
    monkeypatch.setitem(sys.modules, "orjson", None)  # as if not installed: find_spec does not find it
    with pytest.raises(ImportError, match=r'need orjson .*pip install "apex-hf\[train\]" \(or pip install orjson\)'):
        preprocess(config)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["good.jsonl"]  # no staging folder, no OUT
