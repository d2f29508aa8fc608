#!/usr/bin/env python3
"""Build data/tiny_corpus.txt from CPython's bundled pydoc topic help texts.

Source: ``pydoc_data.topics.topics`` (the English help pages behind ``help("if")`` etc.,
generated from the Python Language Reference; shipped with CPython under the PSF License).

Cleaning (deterministic; output depends only on the CPython version's pydoc_data):
- topics in sorted order; each topic becomes one document, documents separated by a blank line;
- section headings and their underlines (``****``, ``====``, ``----``) are dropped;
- indented blocks (grammar rules, code examples, doctest sessions) are dropped;
- bullet / numbered list markers are kept, wrapped lines are joined so that every
  paragraph is a single line; whitespace is normalised; only ASCII is kept;
- output is truncated at a paragraph boundary to at most --max-bytes (default 400 000).

Usage: python3 scripts/make_corpus.py [--out data/tiny_corpus.txt] [--max-bytes 400000]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


UNDERLINE = re.compile(r"^\s*([*=\-~^+#])\1{2,}\s*$")


def topic_paragraphs(text: str) -> list[str]:
    lines = text.replace("\r\n", "\n").split("\n")
    # drop headings: a line followed by an underline line, and the underline itself
    keep: list[str] = []
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and UNDERLINE.match(lines[i + 1]) and lines[i].strip():
            i += 2
            continue
        if UNDERLINE.match(lines[i]):
            i += 1
            continue
        keep.append(lines[i])
        i += 1

    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            para = " ".join(current)
            para = re.sub(r"\s+", " ", para).strip()
            current.clear()
            if len(para) >= 40 and not para.endswith(":") or len(para) >= 200:
                paragraphs.append(para)
            elif para.endswith(":") and len(para) >= 40:
                # intro sentence whose example block was dropped: end it as a sentence
                paragraphs.append(para[:-1].rstrip() + ".")

    for line in keep:
        if not line.strip():
            flush()
            continue
        indent = len(line) - len(line.lstrip(" "))
        stripped = line.strip()
        is_item = re.match(r"^(\*|-|\d+\.)\s+\S", stripped) is not None
        if indent >= 3 and not (current and indent <= 4) and not is_item:
            # indented block (code/grammar/doctest) -> drop
            flush()
            continue
        if stripped.startswith((">>>", "...")):
            flush()
            continue
        if is_item and indent < 3:
            flush()
        current.append(stripped)
    flush()
    return paragraphs


def build(max_bytes: int) -> str:
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        paras = topic_paragraphs(topics[name])
        if paras:
            docs.append("\n".join(paras))
    text = "\n\n".join(docs) + "\n"
    text = text.encode("ascii", "ignore").decode("ascii")
    if len(text) > max_bytes:
        cut = text.rfind("\n", 0, max_bytes)
        text = text[:cut].rstrip() + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "tiny_corpus.txt"))
    p.add_argument("--max-bytes", type=int, default=400_000)
    args = p.parse_args(argv)
    text = build(args.max_bytes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="ascii", newline="\n")
    print(f"wrote {out} ({len(text.encode())} bytes, {len(text.split())} words, Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
