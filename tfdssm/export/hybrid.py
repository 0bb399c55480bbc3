"""Hybrid retrieval: the dense towers' score fused with BM25, in the graph.

A retrieval model with a :class:`Hybrid` (:mod:`tfdssm.export.index`) answers a query
in four steps, all core TensorFlow ops (so the brute-force model still serves
on stock TF Serving):

1. the dense search's best ``depth`` candidates (``depth = max(n, 100)``);
2. the lexical index's best ``depth`` by BM25
   (:class:`tfdssm.export.lexical.LexicalIndex`);
3. every candidate of the union re-scored by the fused score::

       fused = dense + weight * bm25 / max_bm25

   ``dense`` is the towers' score (the cosine for normalised towers; the best
   head's for multi-head towers), ``max_bm25`` the query's best BM25 score over
   the whole corpus, so the lexical term lies in ``[0, weight]``
   whatever the query's length. A query that shares no word with any document
   has ``bm25 = 0`` everywhere: its fused scores are its dense scores;
4. the best ``n`` of the union by the fused score.

``weight`` is chosen at export on the validation queries (:func:`choose_weight`,
the best mean of Recall@10 and MRR@10 over a grid) and recorded in
``export.json``. This is the "convex combination with theoretical
normalisation" of Bruch et al. (2023), which they found more accurate and more
sample-efficient than reciprocal-rank fusion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.export.lexical import LexicalIndex
from tfdssm.model import multihead

DEFAULT_DEPTH = 100
WEIGHT_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
_TINY = 1e-12

Search = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


class Hybrid(tf.Module):
    """The lexical half of a retrieval model and how it is fused.

    Args:
        lexical: BM25 index over the corpus, in the retrieval model's candidate
            order.
        text_column: The query feature the lexical index reads.
        weight: Weight of the max-normalised BM25 score (>= 0).
        depth: Candidates taken from each side before fusion (at least the
            ``n`` asked for).
    """

    def __init__(
        self,
        lexical: LexicalIndex,
        text_column: str,
        weight: float = 0.3,
        depth: int = DEFAULT_DEPTH,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or "hybrid")
        if not weight >= 0:
            raise ConfigError(f"the hybrid weight must be >= 0, received {weight}.")
        if depth < 1:
            raise ConfigError(f"the hybrid depth must be >= 1, received {depth}.")
        self.lexical = lexical
        self.text_column = str(text_column)
        self.depth = int(depth)
        self.weight = tf.Variable(float(weight), trainable=False, name="weight")

    def components(
        self,
        search: Search,
        embeddings: tf.Tensor,
        features: Mapping[str, tf.Tensor],
        queries: tf.Tensor,
        n: tf.Tensor,
        passing: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """The union of the dense and lexical candidates, with both scores.

        Args:
            search: The dense search, ``(queries [b, dim], n) -> (scores, indices)``
                with NaN scores for missing results. With ``passing`` it takes the
                queries as given (``[batch, heads, dim]`` too) and returns only
                passing candidates.
            embeddings: float32 ``[N, dim]`` candidate embeddings.
            features: The query features (``{column: [batch]}``).
            queries: float32 ``[batch, dim]`` or ``[batch, heads, dim]``.
            n: Results wanted.
            passing: bool ``[batch, N]``: only these candidates may be returned
                (``top_k_filter``); the BM25 normaliser stays the corpus-wide
                best score.

        Returns:
            ``(indices int32 [batch, m], dense float32 [batch, m], lexical float32
            [batch, m] in [0, 1], valid bool [batch, m])``.
        """
        num = self.lexical.num_documents
        depth = tf.minimum(tf.maximum(tf.cast(n, tf.int32), self.depth), num)
        if passing is None:
            dense_scores, dense_indices = multihead.search_heads(search, queries,
                                                                 depth)
        else:
            dense_scores, dense_indices = search(queries, depth)
        dense_indices = tf.cast(dense_indices, tf.int32)
        dense_valid = tf.logical_not(tf.math.is_nan(dense_scores)) & (
            dense_indices >= 0)
        bm25 = self.lexical(features[self.text_column])  # [batch, N]
        top = tf.reduce_max(bm25, axis=1, keepdims=True)
        if passing is None:
            best = tf.math.top_k(bm25, depth)
            lexical_valid = tf.ones_like(best.indices, tf.bool)
        else:
            best = tf.math.top_k(tf.where(passing, bm25, -1.0), depth)
            lexical_valid = best.values >= 0
        seen = tf.reduce_any(
            tf.equal(best.indices[:, :, None], dense_indices[:, None, :])
            & dense_valid[:, None, :], axis=2)
        indices = tf.concat([dense_indices, best.indices], axis=1)
        valid = tf.concat([dense_valid, tf.logical_not(seen) & lexical_valid], axis=1)
        indices = tf.where(valid, indices, tf.zeros_like(indices))
        vectors = tf.gather(embeddings, indices)  # [batch, m, dim]
        if queries.shape.rank == 3:
            dense = tf.reduce_max(tf.einsum("bhd,bmd->bhm", queries, vectors), axis=1)
        else:
            dense = tf.einsum("bd,bmd->bm", queries, vectors)
        lexical = tf.gather(bm25, indices, batch_dims=1) / tf.maximum(top, _TINY)
        return indices, dense, lexical, valid

    def search(
        self,
        search: Search,
        embeddings: tf.Tensor,
        features: Mapping[str, tf.Tensor],
        queries: tf.Tensor,
        n: tf.Tensor,
        passing: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Best ``n`` candidates by the fused score (arguments as
        :meth:`components`).

        Returns:
            ``(scores float32 [batch, <= n], indices int32 [batch, <= n])``;
            missing results have a NaN score.
        """
        indices, dense, lexical, valid = self.components(
            search, embeddings, features, queries, n, passing)
        fused = dense + self.weight * lexical
        fused = tf.where(valid, fused, tf.constant(-np.inf, fused.dtype))
        best = tf.math.top_k(fused, tf.minimum(n, tf.shape(fused)[1]))
        chosen = tf.gather(indices, best.indices, batch_dims=1)
        scores = tf.where(tf.math.is_inf(best.values),
                          tf.constant(np.nan, best.values.dtype), best.values)
        return scores, chosen

    def describe(self) -> dict[str, Any]:
        """What ``export.json`` records (weight, depth, the lexical index)."""
        return {"fusion": "dense + weight * bm25 / max_bm25",
                "weight": round(float(self.weight.numpy()), 6), "depth": self.depth,
                "text_column": self.text_column, **self.lexical.describe()}


def choose_weight(
    components: Callable[[Mapping[str, Any]], Sequence[np.ndarray]],
    features: Mapping[str, np.ndarray],
    positives: np.ndarray,
    grid: Sequence[float] = WEIGHT_GRID,
    batch_size: int = 256,
) -> tuple[float, dict[float, dict[str, float]]]:
    """The fusion weight with the best mean of Recall@10 and MRR@10.

    Args:
        components: ``features -> (indices, dense, lexical, valid)`` for a batch
            (a retrieval model's hybrid components, as numpy arrays).
        features: Validation query features, ``{column: [num_queries]}``.
        positives: int ``[num_queries]``: each query's relevant candidate index.
        grid: Weights to try.
        batch_size: Queries per call.

    Returns:
        ``(weight, {weight: {"recall_at_10", "mrr_at_10"}})``; ties go to the
        smaller weight.

    >>> def parts(batch):  # candidate 1 is dense-best, 2 is lexical-best
    ...     n = len(batch["q"])
    ...     return (np.tile([[1, 2]], (n, 1)), np.tile([[0.9, 0.8]], (n, 1)),
    ...             np.tile([[0.0, 1.0]], (n, 1)), np.ones((n, 2), bool))
    >>> choose_weight(parts, {"q": np.array(["a", "b"])}, np.array([2, 2]),
    ...               grid=(0.0, 0.5))[0]
    0.5
    """
    positives = np.asarray(positives)
    total = len(positives)
    if not total:
        raise ConfigError("choosing the hybrid weight needs validation queries.")
    hits = {w: np.zeros(2) for w in grid}
    for start in range(0, total, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in features.items()}
        indices, dense, lexical, valid = (np.asarray(x) for x in components(batch))
        relevant = indices == positives[start:start + batch_size, None]
        relevant &= valid
        for weight in grid:
            fused = np.where(valid, dense + weight * lexical, -np.inf)
            mine = np.where(relevant.any(axis=1),
                            np.max(np.where(relevant, fused, -np.inf), axis=1), np.inf)
            rank = (fused > mine[:, None]).sum(axis=1)  # 0-based; inf: not found
            found = relevant.any(axis=1) & (rank < 10)
            hits[weight] += [found.sum(), (found / (rank + 1.0)).sum()]
    table = {w: {"recall_at_10": h[0] / total, "mrr_at_10": h[1] / total}
             for w, h in hits.items()}
    best = max(grid, key=lambda w: (sum(table[w].values()), -w))
    return float(best), table


__all__ = ["DEFAULT_DEPTH", "Hybrid", "WEIGHT_GRID", "choose_weight"]
