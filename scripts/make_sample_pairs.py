"""Regenerates ``examples/stdlib_pairs.csv`` and ``examples/stdlib_held_out.csv``.

Real, freely licensed (query, document) pairs for trying ``tfdssm train
--pipeline pairs``: the docstrings of a fixed set of Python standard library
modules (Python Software Foundation License), one row per documented function,
class or method. Query ``"module.name: first line of the docstring"``,
document = the rest of the docstring (whitespace collapsed, cut to
``MAX_DOC_CHARS``), ``doc_id`` = ``module.name``.

Every tenth row (by a fixed seed) goes to ``stdlib_held_out.csv``: pairs whose
documents the model never sees in training.

Usage (from the repository root; the text depends on the Python version)::

    .venv/bin/python scripts/make_sample_pairs.py
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.text_corpora import build_stdlib  # noqa: E402

MODULES = ["argparse", "asyncio", "collections", "concurrent", "contextlib", "csv",
           "dataclasses", "datetime", "decimal", "email", "fractions", "functools",
           "gzip", "hashlib", "heapq", "http", "inspect", "io", "ipaddress",
           "itertools", "json", "logging", "math", "os", "pathlib", "pickle",
           "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
           "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
           "typing", "unittest", "urllib", "uuid", "zipfile"]
MAX_ROWS = 2000
MAX_DOC_CHARS = 400
HELD_OUT_EVERY = 10


def main() -> int:
    frame = build_stdlib(MODULES)
    frame["doc"] = [d if len(d) <= MAX_DOC_CHARS else
                    d[:MAX_DOC_CHARS].rsplit(" ", 1)[0] + " ..." for d in frame["doc"]]
    frame = frame.sample(frac=1.0, random_state=0).head(MAX_ROWS)
    frame = frame.sort_values("doc_id", kind="stable").reset_index(drop=True)
    held = frame.index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    out = ROOT / "examples"
    out.mkdir(exist_ok=True)
    for name, part in (("stdlib_pairs.csv", frame[~held]),
                       ("stdlib_held_out.csv", frame[held])):
        part[["query", "doc", "doc_id"]].to_csv(out / name, index=False)
        size = (out / name).stat().st_size
        print(f"wrote examples/{name}: {len(part)} rows, {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
