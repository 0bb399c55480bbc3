"""Multi-interest query towers: K query vectors per user, scored by the best head.

A :class:`MultiHeadTower` is a :class:`tfdssm.model.towers.Tower` whose output layer
emits ``num_heads`` vectors, float32 ``[batch, num_heads, dim]`` (each
L2-normalised when ``normalize``). A query's score for a candidate is the
maximum over its heads of the head-candidate dot product:

* **training**: ``tfrs.tasks.Retrieval`` scores 3-D queries that way ("maxsim");
  every loss in :mod:`tfdssm.model.losses` does too;
* **retrieval**: the union of each head's top-k, re-ranked by that max score,
  which is exactly the top-k by max score (a candidate in the overall top-k is
  in the top-k of the head that scores it best). :func:`union_top_k` does it in
  numpy (:class:`tfdssm.retrieve.LocalRetriever`), :func:`search_heads` in the
  retrieval SavedModels (:mod:`tfdssm.export.index`);
* **export**: the towers' ``query`` signature returns ``embedding`` float32
  ``[batch, num_heads, dim]`` and ``export.json`` records ``num_heads``; the
  ``candidate`` signature and the retrieval signatures are unchanged.

>>> from tfdssm.features import CategoricalFeature
>>> tower = MultiHeadTower([CategoricalFeature("user", ("a", "b"), 4)],
...                        num_heads=3, hidden=(8,), output_dim=5)
>>> tower({"user": tf.constant(["a", "b"])}).shape
TensorShape([2, 3, 5])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.features import Feature
from tfdssm.model.towers import Tower


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class HeadProjection(tf.keras.layers.Layer):
    """Dense ``[batch, width] -> [batch, num_heads, dim]`` (one block per head).

    >>> HeadProjection(2, 3)(tf.ones([4, 5])).shape
    TensorShape([4, 2, 3])
    """

    def __init__(self, num_heads: int, dim: int, activation: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.dim = int(dim)
        self.activation = activation
        self.dense = tf.keras.layers.Dense(self.num_heads * self.dim, activation)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.reshape(self.dense(inputs), [-1, self.num_heads, self.dim])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads, "dim": self.dim,
                "activation": self.activation}


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class MultiHeadTower(Tower):
    """A :class:`tfdssm.model.towers.Tower` with ``num_heads`` output vectors.

    The features, SENet and MLP are the tower's; the last layer projects to
    ``num_heads * output_dim`` and is split into heads. A subclass rather than
    a wrapper so that exports, warm-up requests and the TFLite converter see an
    ordinary tower (``features``, ``combine``).

    Args:
        features: Feature specs, as :class:`tfdssm.model.towers.Tower`.
        num_heads: Query vectors per row (K).
        **kwargs: :class:`tfdssm.model.towers.Tower` arguments (``output_dim`` is the
            size of each head).

    Returns (call):
        float32 ``[batch, num_heads, output_dim]``.
    """

    def __init__(self, features: Sequence[Feature | Mapping[str, Any]],
                 num_heads: int = 4, **kwargs: Any) -> None:
        super().__init__(features, **kwargs)
        if int(num_heads) < 1:
            raise ConfigError(f"num_heads must be >= 1, received {num_heads}.")
        self.num_heads = int(num_heads)
        self.output_layer = HeadProjection(self.num_heads, self.output_dim,
                                           self.output_activation)

    @classmethod
    def from_tower(cls, tower: Tower, num_heads: int) -> MultiHeadTower:
        """A multi-head tower with ``tower``'s configuration (new weights)."""
        return cls(**{**tower.get_config(), "num_heads": num_heads})

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads}


def max_over_heads(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Scores ``[batch, N]``: for ``[batch, K, dim]`` queries the best head's,
    for ``[batch, dim]`` the plain dot product.

    >>> max_over_heads(np.array([[[1., 0.], [0., 1.]]]), np.array([[2., 3.]]))
    array([[3.]])
    """
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 2:
        return queries @ candidates.T
    return np.einsum("bhd,nd->bhn", queries, candidates).max(axis=1)


def union_top_k(
    queries: np.ndarray,
    candidates: np.ndarray,
    k: int,
    exclude: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Union of the per-head top-k, re-ranked by the max score over heads.

    Args:
        queries: float32 ``[batch, K, dim]`` (``[batch, dim]``: one head).
        candidates: float32 ``[N, dim]``.
        k: Results per row (<= N).
        exclude: Per row, candidate indices to leave out.

    Returns:
        ``(indices int64 [batch, k], scores float32 [batch, k])``, best first;
        rows with fewer than ``k`` candidates left are padded with index -1 and
        score ``-inf``.
    """
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 2:
        queries = queries[:, None, :]
    num = len(candidates)
    if not 1 <= k <= num:
        raise ConfigError(f"k must be between 1 and the corpus size {num}, "
                          f"received {k}.")
    per_head = np.einsum("bhd,nd->bhn", queries, np.asarray(candidates, np.float32))
    if exclude is not None:
        for row, drop in enumerate(exclude):
            drop = [int(i) for i in drop]
            if drop:
                per_head[row, :, drop] = -np.inf
    top = np.argpartition(-per_head, k - 1, axis=2)[:, :, :k]  # [batch, K, k]
    indices = np.full([len(queries), k], -1, np.int64)
    scores = np.full([len(queries), k], -np.inf, np.float32)
    best = per_head.max(axis=1)  # [batch, N]
    for row in range(len(queries)):
        union = np.unique(top[row].ravel())
        union = union[np.isfinite(best[row, union])]
        order = np.lexsort((union, -best[row, union]))[:k]
        indices[row, : len(order)] = union[order]
        scores[row, : len(order)] = best[row, union[order]]
    return indices, scores


def search_heads(
    search: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    queries: tf.Tensor,
    n: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Runs a retrieval ``search`` per head and merges the heads' results.

    Args:
        search: ``(queries [b, dim], n) -> (scores [b, m], indices [b, m])``
            (a :class:`tfdssm.export.index.RetrievalModule`'s ``search``; missing
            results have a NaN score).
        queries: float32 ``[batch, dim]`` (passed through) or
            ``[batch, K, dim]``.
        n: Results wanted per head.

    Returns:
        ``(scores, indices)`` ``[batch, K * m]``: every head's results, a
        candidate found by several heads kept once with its best score (the
        other copies get a NaN score, i.e. "missing").
    """
    if queries.shape.rank != 3:
        return search(queries, n)
    dim = queries.shape[-1]
    batch = tf.shape(queries)[0]
    scores, indices = search(tf.reshape(queries, [-1, dim]), n)
    scores = tf.reshape(scores, [batch, -1])
    indices = tf.reshape(indices, [batch, -1])
    width = tf.shape(scores)[1]
    rank = tf.range(width)
    # Copy j of a candidate is dropped when another copy i scores higher, or
    # as high at an earlier position.
    same = tf.equal(indices[:, :, None], indices[:, None, :])
    clean = tf.where(tf.math.is_nan(scores), tf.constant(-np.inf, scores.dtype),
                     scores)
    higher = clean[:, None, :] > clean[:, :, None]
    tie = tf.equal(clean[:, None, :], clean[:, :, None]) & (
        rank[None, :] < rank[:, None])[None, :, :]
    duplicate = tf.reduce_any(same & (higher | tie), axis=2)
    return tf.where(duplicate, tf.constant(np.nan, scores.dtype), scores), indices


__all__ = [
    "HeadProjection",
    "MultiHeadTower",
    "max_over_heads",
    "search_heads",
    "union_top_k",
]
