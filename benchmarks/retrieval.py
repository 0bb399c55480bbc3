"""Retrieval: ScaNN vs brute force, the exported retrieval layers, as N grows.

Synthetic candidates (dim 128, L2-normalised) around 1,000 cluster centres, in
two regimes: *clustered* (noise 0.3 per dimension, like trained embeddings) and
*diffuse* (noise 0.6: close to uniform on the sphere, hard for any ANN index);
queries are perturbed candidates; both modules are the ones ``tfdssm train`` exports
(:mod:`tfdssm.export.index`), with ScaNN parameters from :func:`scann_options`.
One query per call (as a server sees them), top 10.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tensorflow as tf

from benchmarks import common
from tfdssm.export import index

DIM, K = 128, 10


REGIMES = {"clustered": 0.3, "diffuse": 0.6}


def corpus(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=[1000, DIM]).astype(np.float32)
    points = centers[rng.integers(0, 1000, n)] + noise * rng.normal(size=[n, DIM])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    queries = points[rng.integers(0, n, 300)] + noise * rng.normal(size=[300, DIM])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return points.astype(np.float32), queries.astype(np.float32)


def _qps(search: Any, queries: np.ndarray) -> tuple[float, np.ndarray]:
    fn = tf.function(lambda q: search(q, tf.constant(K))[1])
    fn(queries[:1])
    found = []
    start = time.perf_counter()
    for row in queries:
        found.append(fn(row[None, :]).numpy()[0])
    return len(queries) / (time.perf_counter() - start), np.stack(found)


def run(quick: bool = False) -> dict[str, Any]:
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    spec = {"q": tf.TensorSpec([None], tf.string, name="q")}
    rows: list[list[Any]] = []
    curves: dict[str, tuple[list[float], list[float]]] = {
        "brute force": ([], []), **{f"ScaNN, {r}": ([], []) for r in REGIMES}}
    for n, regime in [(n, r) for n in sizes for r in REGIMES]:
        points, queries = corpus(n, REGIMES[regime])
        ids = [str(i) for i in range(n)]
        start = time.perf_counter()
        exact = index.BruteForceRetrieval(lambda f: f, spec, points, ids, max_k=K)
        exact_build = time.perf_counter() - start
        start = time.perf_counter()
        approx = index.ScannRetrieval(lambda f: f, spec, points, ids, max_k=K)
        scann_build = time.perf_counter() - start
        exact_qps, truth = _qps(exact.search, queries)
        scann_qps, found = _qps(approx.search, queries)
        recall = np.mean(
            [len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]
        )
        rows.append([f"{n:,}", regime, exact_qps, scann_qps, scann_qps / exact_qps,
                     recall, exact_build, scann_build])
        if regime == "clustered":
            curves["brute force"][0].append(n)
            curves["brute force"][1].append(exact_qps)
        curves[f"ScaNN, {regime}"][0].append(n)
        curves[f"ScaNN, {regime}"][1].append(scann_qps)
        del exact, approx, points
    plot = common.plot_lines(common.RESULTS / "retrieval_qps.png",
                             "Top-10 retrieval, one query per call (dim 128)",
                             "candidates", "queries/s", curves, log_x=True)
    markdown = (
        "### Retrieval: ScaNN vs brute force (exported layers, top-10, dim 128)"
        "\n\n"
        + common.table(
            [
                "candidates",
                "data",
                "brute force q/s",
                "ScaNN q/s",
                "ScaNN speed-up",
                "ScaNN recall@10",
                "brute force build s",
                "ScaNN build s",
            ],
            rows,
        )
        + "\n\nTarget at 1M: ≥ 10× queries/s at recall@10 ≥ 0.95.\n\n"
        f"![queries/s]({plot.relative_to(common.RESULTS.parent)})"
    )
    return {"markdown": markdown, "rows": rows}
