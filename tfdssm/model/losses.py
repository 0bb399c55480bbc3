"""Ranking losses over a score matrix, selected with ``DSSM(loss=...)``.

Notation: a batch of ``B`` (query, clicked candidate) pairs gives a score
matrix ``s`` float32 ``[B, M]`` (``M >= B``): ``s[i, j]`` is query ``i``'s score
for candidate ``j`` (dot product, the cosine for normalised towers; for
multi-head queries the best head's, :func:`score_matrix`). Column ``i`` is row
``i``'s positive; the other columns (other rows' positives, then any extra
sampled negatives) are its negatives, minus those a ``negatives`` mask
``[B, M]`` leaves out (accidental hits, non-hard negatives). Every function
returns the per-row loss float32 ``[B]``; :class:`tfdssm.model.DSSM` averages
(``in_batch`` sums, as TFRS does).

* ``in_batch`` (default; TFRS ``Retrieval``, :func:`softmax_loss`):
  ``-log softmax(s_i / T)[i]`` over all candidates. The full-product softmax
  ranks the positive above the whole batch; logQ-corrected it gives the best
  Recall@K. Use it for retrieval; it wants large batches (= many negatives).
* ``paper`` (:func:`gamma_softmax_loss`): ``-log softmax(gamma * cos)[0]`` over
  the positive and 4 random other documents: the 2013 DSSM, for comparison.
* ``pair_ce`` (:func:`pair_ce_loss`): mean over negatives ``j`` of
  ``log(1 + exp((s_ij - s_ii) / T))``. Pairwise (RankNet / BPR): only the order
  of positive and negative matters, not a probability; insensitive to the number
  of negatives. Use it when the scores only need to rank.
* ``triplet`` (:func:`triplet_loss`): mean over negatives of
  ``max(0, margin + s_ij - s_ii)``. Stops pushing once a negative is ``margin``
  below the positive: robust to noisy clicks and near-duplicates; tune
  ``margin`` on the cosine scale (0.1-0.5); pairs well with hard negatives.
* ``sigmoid`` (:func:`sigmoid_loss`): ``log(1 + exp(-s_ii / T))`` plus the mean
  over negatives of ``log(1 + exp(s_ij / T))``. Pointwise: ``sigmoid(s / T)``
  is a click probability per pair; use it when scores feed a threshold or
  another model. Usually the weakest for Recall@K.

``T`` is the model's temperature (0.05 for normalised towers by default).

>>> s = tf.constant([[0.9, 0.1], [0.2, 0.8]])
>>> [round(float(x), 4) for x in triplet_loss(s, margin=0.5)]
[0.0, 0.0]
>>> [round(float(x), 4) for x in triplet_loss(s, margin=1.0)]
[0.2, 0.4]
"""

from __future__ import annotations

import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.model import LOSSES, SCORE_LOSSES  # noqa: E402,F401 - defined once


def score_matrix(queries: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
    """Query-candidate scores ``[B, M]``.

    Args:
        queries: float32 ``[B, dim]``, or ``[B, K, dim]`` (multi-head: the best
            head's score).
        candidates: float32 ``[M, dim]``.
    """
    if queries.shape.rank == 3:
        return tf.reduce_max(tf.einsum("bhd,md->bhm", queries, candidates), axis=1)
    return tf.matmul(queries, candidates, transpose_b=True)


def pair_scores(queries: tf.Tensor, docs: tf.Tensor) -> tf.Tensor:
    """Each query's scores for its own documents ``[B, N]``.

    Args:
        queries: float32 ``[B, dim]`` or ``[B, K, dim]`` (best head).
        docs: float32 ``[B, N, dim]``.
    """
    if queries.shape.rank == 3:
        return tf.reduce_max(tf.einsum("bhd,bnd->bhn", queries, docs), axis=1)
    return tf.einsum("bd,bnd->bn", queries, docs)


def negatives_mask(
    scores: tf.Tensor,
    candidate_ids: tf.Tensor | None = None,
    num_hard_negatives: int | None = None,
) -> tf.Tensor:
    """Which columns are negatives of each row: bool ``[B, M]``.

    Every column but the row's own, minus accidental hits (a column with the
    positive's ``candidate_ids`` entry, ``[M]``), and with ``num_hard_negatives``
    only the highest-scoring ones (ties may keep a few more).
    """
    shape = tf.shape(scores)
    mask = tf.logical_not(tf.cast(tf.eye(shape[0], shape[1]), tf.bool))
    if candidate_ids is not None:
        ids = tf.reshape(candidate_ids, [-1])
        mask &= tf.not_equal(ids[: shape[0], None], ids[None, :])
    if num_hard_negatives is not None:
        lowest = tf.fill(shape, tf.constant(scores.dtype.min, scores.dtype))
        masked = tf.where(mask, scores, lowest)
        count = tf.minimum(int(num_hard_negatives), shape[1])
        kth = tf.math.top_k(masked, count).values[:, -1:]
        mask &= masked >= kth
    return mask


def _positive(scores: tf.Tensor) -> tf.Tensor:
    return tf.linalg.diag_part(scores[:, : tf.shape(scores)[0]])


def _mean_over(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    weights = tf.cast(mask, values.dtype)
    total = tf.reduce_sum(values * weights, axis=1)
    return total / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)


def _default_mask(scores: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
    return negatives_mask(scores) if mask is None else mask


def softmax_loss(
    scores: tf.Tensor, temperature: float = 1.0, mask: tf.Tensor | None = None
) -> tf.Tensor:
    """In-batch (full-product) softmax: ``-log softmax(s_i / T)[i]``, over the
    positive and the row's negatives. ``[B]``."""
    mask = _default_mask(scores, mask)
    keep = mask | tf.cast(tf.eye(tf.shape(scores)[0], tf.shape(scores)[1]), tf.bool)
    logits = scores / temperature
    lowest = tf.fill(tf.shape(logits), tf.constant(logits.dtype.min, logits.dtype))
    logits = tf.where(keep, logits, lowest)
    return tf.reduce_logsumexp(logits, axis=1) - _positive(logits)


def gamma_softmax_loss(scores: tf.Tensor, gamma: float = 10.0) -> tf.Tensor:
    """The DSSM paper's loss: ``-log softmax(gamma * s)[0]``, with scores
    ``[B, 1 + N]`` of the positive (column 0) and N sampled negatives. ``[B]``."""
    logits = gamma * scores
    return tf.reduce_logsumexp(logits, axis=1) - logits[:, 0]


def pair_ce_loss(
    scores: tf.Tensor, temperature: float = 1.0, mask: tf.Tensor | None = None
) -> tf.Tensor:
    """Pairwise cross-entropy ``mean_j log(1 + exp((s_ij - s_ii) / T))``. ``[B]``."""
    mask = _default_mask(scores, mask)
    margins = (scores - _positive(scores)[:, None]) / temperature
    return _mean_over(tf.math.softplus(margins), mask)


def triplet_loss(
    scores: tf.Tensor, margin: float = 0.2, mask: tf.Tensor | None = None
) -> tf.Tensor:
    """Triplet hinge ``mean_j max(0, margin + s_ij - s_ii)``. ``[B]``."""
    mask = _default_mask(scores, mask)
    hinge = tf.nn.relu(margin + scores - _positive(scores)[:, None])
    return _mean_over(hinge, mask)


def sigmoid_loss(
    scores: tf.Tensor, temperature: float = 1.0, mask: tf.Tensor | None = None
) -> tf.Tensor:
    """Pointwise sigmoid cross-entropy: the positive with label 1, the mean over
    negatives with label 0, on logits ``s / T``. ``[B]``."""
    mask = _default_mask(scores, mask)
    logits = scores / temperature
    return (tf.math.softplus(-_positive(logits))
            + _mean_over(tf.math.softplus(logits), mask))


def ranking_loss(
    name: str,
    queries: tf.Tensor,
    candidates: tf.Tensor,
    candidate_ids: tf.Tensor | None = None,
    temperature: float = 1.0,
    margin: float = 0.2,
    num_hard_negatives: int | None = None,
) -> tf.Tensor:
    """Mean over the batch of one of :data:`SCORE_LOSSES` (a scalar).

    Args:
        name: ``pair_ce``, ``triplet`` or ``sigmoid``.
        queries: float32 ``[B, dim]`` or ``[B, K, dim]``.
        candidates: float32 ``[M, dim]``, the B positives first.
        candidate_ids: ``[M]`` ids to mask accidental hits (or ``None``).
        temperature: Logit scale of ``pair_ce`` and ``sigmoid``.
        margin: Margin of ``triplet``.
        num_hard_negatives: Keep only the hardest negatives per row.
    """
    scores = score_matrix(queries, candidates)
    mask = negatives_mask(scores, candidate_ids, num_hard_negatives)
    if name == "pair_ce":
        rows = pair_ce_loss(scores, temperature, mask)
    elif name == "triplet":
        rows = triplet_loss(scores, margin, mask)
    elif name == "sigmoid":
        rows = sigmoid_loss(scores, temperature, mask)
    else:
        raise ConfigError(f"ranking_loss takes one of {SCORE_LOSSES}, received "
                          f"{name!r}.")
    return tf.reduce_mean(rows)


__all__ = [
    "LOSSES",
    "SCORE_LOSSES",
    "gamma_softmax_loss",
    "negatives_mask",
    "pair_ce_loss",
    "pair_scores",
    "ranking_loss",
    "score_matrix",
    "sigmoid_loss",
    "softmax_loss",
    "triplet_loss",
]
