"""Filtered retrieval: ScaNN ``top_k_filter`` against the exact filtered answer.

A synthetic corpus of random unit vectors (dim 64; 1M candidates, 100k with
``--quick``) whose candidates carry tokens in three namespaces, each passing a
random fraction of the corpus: ``half`` (50 %), ``twentieth`` (5 %) and
``thousandth`` (0.1 %). Queries are random unit vectors. Both retrieval
modules are the ones ``tfdssm train`` exports (:mod:`tfdssm.export.index`, ScaNN
parameters from :func:`tfdssm.export.index.scann_options`), called one query
per call as a server sees them, through the same ``top_k`` code the
signatures run. For each filter: recall@10 of the ScaNN model's answer
against the exact filtered top 10 (numpy), queries/s of the ScaNN model and of
the brute-force model, and which path ScaNN took (oversample + filter, or the
exact fallback). The unfiltered ScaNN ``top_k`` in the same run is the
baseline. Also, in the same run: the 50 % filter searching only the index's
own leaves (``filter_leaves = num_leaves_to_search``, before the wider
filtered search); batches of 8 queries mixing seven 50 % rows and one 0.1 %
row, with the path chosen per row vs per batch (``split_rows``); and the cost
of building each filter's mask from dense vectors (default) vs from posting
lists only (``dense_share=1``).

    python -m benchmarks.run --suite filters [--quick]
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np
import tensorflow as tf

from benchmarks import common
from tfdssm.export import index, restricts

DIM, K = 64, 10
FILTERS = {"50 %": ("half", 0.5), "5 %": ("twentieth", 0.05),
           "0.1 %": ("thousandth", 0.001)}
SPEC = {"q": tf.TensorSpec([None], tf.string, name="q")}


def _encoder(features: dict[str, tf.Tensor]) -> tf.Tensor:
    """The query 'tower': raw float32 bytes -> ``[batch, DIM]``."""
    return tf.reshape(tf.io.decode_raw(features["q"], tf.float32), [-1, DIM])


REGIMES = {"uniform": None, "clustered": 0.6}


def _unit(block: np.ndarray) -> np.ndarray:
    return (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float32)


def data(n: int, queries: int, noise: float | None = None, seed: int = 0):
    """Unit vectors ``[n, DIM]``, queries ``[queries, DIM]`` and the posting
    lists of the three filter namespaces (token ``in``).

    ``noise=None``: uniform on the sphere, random queries (no structure: the
    hardest case for any ANN index). Otherwise candidates are one of 1,000
    random centres plus ``noise`` per dimension (the retrieval suite's
    "diffuse" data) and queries perturbed candidates.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal([1000, DIM], np.float32)
    points = np.empty([n, DIM], np.float32)
    for start in range(0, n, 100_000):  # in chunks: keeps the peak memory low
        size = min(100_000, n - start)
        block = rng.standard_normal([size, DIM], np.float32)
        if noise is not None:
            block = centres[rng.integers(0, 1000, size)] + noise * block
        points[start:start + size] = _unit(block)
    if noise is None:
        asked = _unit(rng.standard_normal([queries, DIM], np.float32))
    else:
        asked = _unit(points[rng.integers(0, n, queries)]
                      + noise * rng.standard_normal([queries, DIM], np.float32))
    postings = {f"{name}=in": np.sort(rng.choice(n, max(1, round(n * p)),
                                                 replace=False))
                for name, p in FILTERS.values()}
    return points, asked, postings


def exact_top(points: np.ndarray, queries: np.ndarray,
              passing: np.ndarray | None) -> np.ndarray:
    """Exact top-K indices ``[queries, K]`` among ``passing`` (bool ``[n]``)."""
    out = []
    for start in range(0, len(queries), 16):
        scores = queries[start:start + 16] @ points.T
        if passing is not None:
            scores[:, ~passing] = -np.inf
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


def _caller(module: index.RetrievalModule, token: str | None) -> Any:
    """One-query calls of the module's ``top_k`` (filtered by ``token``)."""
    k = tf.constant([K])
    exclude = tf.zeros([1, 0], tf.string)
    if token is None:
        fn = tf.function(lambda q: module.top_k({"q": q}, k, exclude)["ids"])
    else:
        allow = tf.constant([[token]])
        deny = tf.constant([[""]])
        fn = tf.function(
            lambda q: module.top_k({"q": q}, k, exclude, allow, deny)["ids"])
    return fn


def _batched(module: index.RetrievalModule, queries: np.ndarray,
             tokens: list[str]) -> tuple[float, list[list[int]]]:
    """Queries/s and ids of ``top_k_filter`` in batches of ``len(tokens)``
    rows, row ``i`` allowing ``tokens[i]``."""
    size = len(tokens)
    k = tf.constant([K] * size)
    exclude = tf.zeros([size, 0], tf.string)
    allow = tf.constant([[t] for t in tokens])
    deny = tf.constant([[""]] * size)
    fn = tf.function(
        lambda q: module.top_k({"q": q}, k, exclude, allow, deny)["ids"])
    raw = [tf.constant([q.tobytes() for q in queries[i:i + size]])
           for i in range(0, len(queries) - size + 1, size)]
    fn(raw[0])
    found = []
    start = time.perf_counter()
    for q in raw:
        found.extend(fn(q).numpy())
    qps = len(raw) * size / (time.perf_counter() - start)
    return qps, [[int(i) for i in row if i] for row in found]


def _mask_ms(n: int) -> list[list[Any]]:
    """Milliseconds to build one query's mask per filter token: dense vectors
    (default ``dense_share``) vs posting lists only."""
    rng = np.random.default_rng(1)
    postings = {f"{name}=in": np.sort(rng.choice(n, max(1, round(n * p)),
                                                 replace=False))
                for name, p in FILTERS.values()}
    names = [name for name, _ in FILTERS.values()]
    times: dict[float, list[float]] = {}
    for share in (restricts.DENSE_SHARE, 1.0):
        module = restricts.Restricts(names, postings, n, dense_share=share)
        times[share] = []
        for name, _ in FILTERS.values():
            allow, deny = tf.constant([[f"{name}=in"]]), tf.constant([[""]])
            fn = tf.function(lambda a, d, m=module: m.passing(a, d)[0, 0])
            fn(allow, deny)
            start = time.perf_counter()
            for _ in range(100):
                fn(allow, deny)
            times[share].append((time.perf_counter() - start) * 10)
        del module
    return [[label, times[1.0][i], times[restricts.DENSE_SHARE][i],
             times[1.0][i] / times[restricts.DENSE_SHARE][i]]
            for i, label in enumerate(FILTERS)]


def _run_queries(fn: Any, queries: np.ndarray) -> tuple[float, list[list[int]]]:
    raw = [tf.constant([q.tobytes()]) for q in queries]
    fn(raw[0])  # trace
    found = []
    start = time.perf_counter()
    for q in raw:
        found.append(fn(q).numpy()[0])
    qps = len(raw) / (time.perf_counter() - start)
    return qps, [[int(i) for i in row if i] for row in found]


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / K
                          for f, t in zip(found, truth, strict=True)]))


def _regime(n: int, num_queries: int, noise: float | None) -> tuple[list, float]:
    """Rows of the table for one data regime, and the ScaNN build seconds."""
    points, queries, postings = data(n, num_queries, noise)
    ids = [str(i) for i in range(n)]
    restrict = restricts.Restricts([name for name, _ in FILTERS.values()],
                                   postings, n)
    start = time.perf_counter()
    scann = index.ScannRetrieval(_encoder, SPEC, points, ids, max_k=K,
                                 restricts=restrict)
    build = time.perf_counter() - start
    brute = index.BruteForceRetrieval(_encoder, SPEC, points, ids, max_k=K,
                                      restricts=restrict)
    rows: list[list[Any]] = []
    base_qps, found = _run_queries(_caller(scann, None), queries)
    brute_base, _ = _run_queries(_caller(brute, None), queries[:50])
    base_recall = _recall(found, exact_top(points, queries, None))
    rows.append(["none (`top_k`)", f"{n:,}", base_recall, base_qps, 1.0, "ScaNN",
                 brute_base])
    for label, (name, _) in FILTERS.items():
        token = f"{name}=in"
        passing = np.zeros(n, bool)
        passing[postings[token]] = True
        truth = exact_top(points, queries, passing)
        qps, found = _run_queries(_caller(scann, token), queries)
        brute_qps, exact_found = _run_queries(_caller(brute, token), queries[:50])
        assert _recall(exact_found, truth[:50]) == 1.0, "brute force must be exact"
        asked = index.OVERSAMPLE * K * n / passing.sum() + K
        path = ("oversample" if asked <= scann.max_oversample
                and passing.sum() > scann.exact_below else "exact")
        rows.append([label, f"{int(passing.sum()):,}", _recall(found, truth), qps,
                     qps / base_qps, path, brute_qps])
        if label == "50 %":  # the same, searching only the index's own leaves
            wide = scann.filter_leaves
            scann.filter_leaves = scann.options.get("num_leaves_to_search", -1)
            own_qps, own = _run_queries(_caller(scann, token), queries)
            scann.filter_leaves = wide
            rows.append(["50 %, index's own leaves (before)",
                         f"{int(passing.sum()):,}", _recall(own, truth), own_qps,
                         own_qps / base_qps, path, ""])
    # Batches of 8: seven 50 % rows and one 0.1 % row.
    mixed = ["half=in"] * 7 + ["thousandth=in"]
    truth = {}
    for name in ("half=in", "thousandth=in"):
        passing = np.zeros(n, bool)
        passing[postings[name]] = True
        truth[name] = exact_top(points, queries, passing)
    usable = len(queries) // 8 * 8
    want = np.stack([truth[mixed[i % 8]][i] for i in range(usable)])
    batch_rows = []
    for split in (True, False):
        scann.split_rows = split
        qps, found = _batched(scann, queries[:usable], mixed)
        batch_rows.append(
            [f"ScaNN, path per {'row' if split else 'batch'}",
             _recall(found, want), qps])
    scann.split_rows = True
    brute_qps, _ = _batched(brute, queries[:32], mixed)
    batch_rows.append(["brute force (exact)", 1.0, brute_qps])
    for row in batch_rows:
        row.append(row[2] / batch_rows[1][2])
    rows.append(batch_rows)
    del scann, brute, points
    gc.collect()
    return rows, build


def run(quick: bool = False) -> dict[str, Any]:
    n = 100_000 if quick else 1_000_000
    num_queries = 100 if quick else 200
    parts = []
    for regime, noise in REGIMES.items():
        rows, build = _regime(n, num_queries, noise)
        batch_rows = rows.pop()
        what = ("uniform on the sphere, random queries" if noise is None else
                f"1,000 centres + noise {noise}, perturbed candidates as queries")
        parts.append(
            f"#### {regime} ({what}; ScaNN build {build:.0f} s)\n\n"
            + common.table(["filter passes", "candidates passing",
                            "ScaNN recall@10 vs exact filtered", "ScaNN q/s",
                            "q/s vs unfiltered ScaNN", "ScaNN path",
                            "brute force q/s (exact)"], rows)
            + "\n\nBatches of 8 rows (seven 50 %, one 0.1 %):\n\n"
            + common.table(["model", "recall@10 vs exact filtered", "q/s",
                            "q/s vs path per batch"], batch_rows))
    masks = common.table(["filter passes", "posting lists only (ms)",
                          "dense vectors for broad tokens (ms)", "speed-up"],
                         _mask_ms(n))
    markdown = (
        f"### Filtered retrieval: `top_k_filter` ({n:,} unit vectors, dim {DIM}, "
        f"top-{K}, one query per call)\n\n" + "\n\n".join(parts)
        + "\n\n#### Building one query's mask (`Restricts.passing`, wall "
        "time)\n\n" + masks
        + f"\n\nBaseline: the unfiltered ScaNN `top_k` of the same index in the "
        f"same run (first row of each table). Peak RSS "
        f"{common.peak_rss_mb():.0f} MiB. Target: recall@10 ≥ 0.95 for each filter.")
    return {"markdown": markdown, "rows": parts}
