"""TFLite query tower: per-query latency in ``ai_edge_litert`` vs the SavedModel.

A pairs export (the paper's tower, 30k buckets, 300-300-128) trained one epoch on
the stdlib docstring pairs; one query at a time, as an app would call it. The
TFLite side includes the reference encoder (the app's string step).
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from typing import Any

import numpy as np
import tensorflow as tf

from benchmarks import common
from benchmarks.training import stdlib_pairs
from tfdssm.export import tflite
from tfdssm.recipes import pairs
from tfdssm.training import run as train


def _latency(fn: Any, queries: list[str]) -> tuple[float, float]:
    for q in queries[:5]:
        fn(q)
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def run(quick: bool = False) -> dict[str, Any]:
    frame = stdlib_pairs()
    queries = list(frame["query"].sample(100 if quick else 1000, replace=True,
                                         random_state=0))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = pairs.prepare(frame, hidden=(300, 300), dim=128, num_buckets=30000,
                                 max_length=64, test_fraction=0.0)
        train.run(prepared, tmp, epochs=1, verbose=0)
        path = pathlib.Path(tmp)
        served = tf.saved_model.load(str(path / "towers" / "1")).signatures["query"]
        lite = tflite.TFLiteQueryTower(path / "query_tower.tflite")
        spec = lite.spec["inputs"]
        rows = []
        p50, p99 = _latency(lambda q: served(query=tf.constant([q])), queries)
        rows.append(["SavedModel `query` signature (TF)", p50, p99, "-"])
        sizes = {}
        for mode in ("none", "dynamic", "float16"):
            written = tflite.write_tflite(prepared.model.query_tower, path, mode)
            model = tflite.TFLiteQueryTower(written["path"], lite.spec)
            sizes[mode] = written["bytes"]
            p50, p99 = _latency(
                lambda q, m=model: m(tflite.encode_query({"query": q}, spec, {})),
                queries)
            check = tflite.parity(path, [{"query": q} for q in queries[:50]],
                                  written["path"])
            rows.append([f"TFLite {mode} ({written['bytes'] / 1e6:.1f} MB)", p50, p99,
                         f"{check['min_cosine']:.6f}"])
    markdown = ("### TFLite query tower (paper preset, one query at a time)\n\n"
                + common.table(["model", "p50 ms", "p99 ms", "min cosine vs TF"], rows))
    return {"markdown": markdown, "rows": rows, "sizes": sizes}
