"""Offline retrieval metrics over the full candidate corpus.

Every test row is one query with one relevant candidate. Its rank is the number of
corpus candidates scoring strictly higher (optionally ignoring candidates the same
user already had in training). From the ranks:

* Recall@K (= HitRate@K, = TFRS's factorized top-K accuracy): ``rank < K``;
* NDCG@K: ``1 / log2(rank + 2)`` if ``rank < K`` (one relevant item);
* MRR@K: ``1 / (rank + 1)`` if ``rank < K``;
* AUC: the share of ``auc_negatives`` random other candidates scoring below the
  positive (ties count half), averaged over queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tfdssm.errors import DataError
from tfdssm.export.loading import ids_as_text

DEFAULT_KS = (10, 50, 100)


def rank_metrics(
    queries: np.ndarray,
    positives: np.ndarray,
    candidates: np.ndarray,
    exclude: Sequence[Iterable[int]] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    auc_negatives: int = 100,
    seed: int = 0,
    chunk: int = 512,
) -> dict[str, float]:
    """Recall/NDCG/MRR@K and sampled AUC from embeddings.

    Args:
        queries: float32 ``[num_queries, dim]``, or ``[num_queries, heads, dim]``
            (multi-head: a candidate's score is its best head's).
        positives: int ``[num_queries]``, index of each query's relevant candidate.
        candidates: float32 ``[num_candidates, dim]``.
        exclude: Per query, candidate indices to ignore when ranking (e.g. the
            user's training items); the positive itself is never ignored.
        ks: Cut-offs.
        auc_negatives: Random negatives per query for AUC (0 to skip).
        seed: Seed of the negative sampling.
        chunk: Queries scored at once.

    Returns:
        ``{"recall@10": ..., "ndcg@10": ..., "mrr@10": ..., "auc": ...,
        "num_queries": ..., "num_candidates": ...}``.

    >>> c = np.eye(3, dtype=np.float32)
    >>> m = rank_metrics(c[[0, 1]], np.array([0, 2]), c, ks=[1], auc_negatives=0)
    >>> m["recall@1"], m["mrr@1"]
    (0.5, 0.5)
    """
    positives = np.asarray(positives, dtype=np.int64)
    num_candidates = len(candidates)
    if len(queries) != len(positives) or not len(queries):
        raise DataError(
            f"need one positive per query and at least one query; got "
            f"{len(queries)} queries and {len(positives)} positives."
        )
    if positives.min() < 0 or positives.max() >= num_candidates:
        raise DataError("a positive index is outside the candidate corpus.")
    ranks = np.empty([len(queries)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    auc = []
    for start in range(0, len(queries), chunk):
        scores = _scores(queries[start : start + chunk], candidates)
        rows = np.arange(len(scores))
        pos = positives[start : start + chunk]
        positive_scores = scores[rows, pos]
        if exclude is not None:
            for row in rows:
                drop = [j for j in exclude[start + row] if j != pos[row]]
                if drop:
                    scores[row, drop] = -np.inf
        ranks[start : start + chunk] = (scores > positive_scores[:, None]).sum(axis=1)
        if auc_negatives > 0 and num_candidates > 1:
            negatives = rng.integers(0, num_candidates - 1, [len(rows), auc_negatives])
            negatives += negatives >= pos[:, None]
            if queries.ndim == 3:  # multi-head: the best head's score
                neg_scores = np.einsum("qhd,qnd->qhn", queries[start : start + chunk],
                                       candidates[negatives]).max(axis=1)
            else:
                neg_scores = (queries[start : start + chunk, None, :] *
                              candidates[negatives]).sum(-1)
            below = (neg_scores < positive_scores[:, None]).mean(axis=1)
            ties = (neg_scores == positive_scores[:, None]).mean(axis=1)
            auc.append(below + 0.5 * ties)
    result: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        result[f"recall@{k}"] = float(hit.mean())
        result[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2), 0).mean())
        result[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1), 0).mean())
    if auc:
        result["auc"] = float(np.concatenate(auc).mean())
    result["num_queries"] = len(queries)
    result["num_candidates"] = num_candidates
    return result


def retrieval_metrics(
    top_k: Callable[..., Mapping[str, Any]],
    features: Mapping[str, np.ndarray],
    positives: Sequence[str],
    ks: Sequence[int] = (1, 10, 100),
    batch_size: int = 256,
) -> dict[str, float]:
    """Recall@K and MRR@K of a retrieval model's answers (what it serves).

    Args:
        top_k: A retrieval SavedModel's ``top_k`` signature (or any callable
            taking the query features and ``k`` int32 ``[batch]`` as keywords
            and returning string ``ids`` ``[batch, k]``).
        features: Query features, column -> ``[num_queries]``.
        positives: Each query's relevant candidate id.
        ks: Cut-offs (the model must allow ``max(ks)``).
        batch_size: Queries per call.

    Returns:
        ``{"recall@K": ..., "mrr@K": ..., "num_queries": ...}``.
    """
    positives = np.asarray([str(p) for p in positives], dtype=object)
    if not len(positives):
        raise DataError("retrieval metrics need at least one query.")
    depth = max(ks)
    ranks = np.full([len(positives)], depth, np.int64)  # depth: not retrieved
    for start in range(0, len(positives), batch_size):
        batch = {n: np.asarray(v[start:start + batch_size])
                 for n, v in features.items()}
        rows = len(next(iter(batch.values())))
        ids = np.asarray(top_k(**batch, k=np.full([rows], depth, np.int32))["ids"])
        hits = ids_as_text(ids) == positives[start:start + rows, None].astype(str)
        found = hits.any(axis=1)
        ranks[start:start + rows] = np.where(found, hits.argmax(axis=1), depth)
    out: dict[str, float] = {}
    for k in ks:
        inside = ranks < k
        out[f"recall@{k}"] = float(inside.mean())
        out[f"mrr@{k}"] = float(np.where(inside, 1.0 / (ranks + 1), 0.0).mean())
    out["num_queries"] = len(positives)
    return out


def _scores(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``[n, N]`` dot products; for ``[n, heads, dim]`` queries the max over heads."""
    if queries.ndim == 3:
        return np.einsum("qhd,nd->qhn", queries, candidates).max(axis=1)
    return queries @ candidates.T


def format_metrics(metrics: Mapping[str, Any], indent: str = "  ") -> str:
    """One line per metric, aligned, for the CLI; a nested mapping (e.g. the
    hybrid model's served metrics) becomes an indented section.

    >>> print(format_metrics({"recall@10": 0.5, "hybrid": {"recall@10": 0.75}}))
      recall@10       0.5000
      hybrid:
        recall@10     0.7500
    """
    lines = []
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            lines.append(f"{indent}{name}:")
            lines.append(format_metrics(value, indent + "  "))
        elif isinstance(value, float):
            lines.append(f"{indent}{name:<{18 - len(indent)}}{value:.4f}")
        else:
            lines.append(f"{indent}{name:<{18 - len(indent)}}{value}")
    return "\n".join(lines)
