"""``tfdssm.DSSM``: two towers trained by a TFRS retrieval task.

The default loss is TFRS's in-batch softmax (every other candidate in the batch is
a negative) with a temperature, optional removal of accidental hits, logQ
correction, extra sampled negatives and hard-negative mining. ``loss="paper"`` is
the 2013 DSSM objective for comparison: a softmax over ``gamma`` times the cosine
of the clicked document and 4 random other documents. ``pair_ce``, ``triplet``
and ``sigmoid`` are the pairwise / pointwise losses of :mod:`tfdssm.model.losses` over
the in-batch (plus sampled) negatives; that module says when to use which.
Multi-head query towers (:mod:`tfdssm.model.multihead`) score by their best head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfdssm.errors import ConfigError
from tfdssm.model import losses
from tfdssm.model.sampling import NegativeSampler
from tfdssm.model.shared import link_shared_embeddings
from tfdssm.model.towers import Tower

LOSSES = losses.LOSSES
# Batch key of the mined hard negatives' candidate columns (tfdssm.training.negatives).
HARD_NEGATIVES = "__hard_negatives__"
# Batch key of the candidate ids' fingerprints (candidate_key), which a batch
# carries when its candidate id column holds hashed text ids instead
# (tfdssm.data.hash_cache); accidental-hit removal compares these.
CANDIDATE_KEY = "__candidate_key__"


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class DSSM(tfrs.Model):
    """A two-tower retrieval model trained with ``model.fit``.

    Args:
        query_tower: Tower over query features.
        candidate_tower: Tower over candidate features (may be a
            :class:`tfdssm.model.towers.SharedTower` of the query tower).
        candidate_id: Column identifying a candidate; enables accidental-hit
            removal, logQ correction and evaluation by id.
        loss: ``in_batch`` (TFRS in-batch softmax), ``paper``, ``pair_ce``,
            ``triplet`` or ``sigmoid`` (:mod:`tfdssm.model.losses`).
        temperature: Softmax temperature (scores are divided by it). Default 0.05
            for L2-normalised towers, 1.0 otherwise.
        remove_accidental_hits: Mask in-batch negatives that share the positive's
            candidate id (needs ``candidate_id``).
        candidate_probabilities: Candidate id -> frequency in the training data,
            for logQ correction of the popularity bias of in-batch negatives.
        negative_sampler: Extra negatives drawn from the corpus each step.
        num_hard_negatives: Keep only the top-scoring negatives per query.
        gamma: Smoothing factor of the paper loss (cosine times gamma).
        num_paper_negatives: Random negatives per query for the paper loss.
        margin: Margin of the ``triplet`` loss (in score units).

    Call args:
        features: mapping of column name -> ``[batch]`` tensor.

    Returns:
        ``{"query": [batch, dim], "candidate": [batch, dim]}`` for the towers whose
        features are present.
    """

    def __init__(
        self,
        query_tower: Tower,
        candidate_tower: tf.keras.layers.Layer,
        candidate_id: str | None = None,
        loss: str = "in_batch",
        temperature: float | None = None,
        remove_accidental_hits: bool = False,
        candidate_probabilities: Mapping[str, float] | None = None,
        negative_sampler: NegativeSampler | None = None,
        num_hard_negatives: int | None = None,
        gamma: float = 10.0,
        num_paper_negatives: int = 4,
        margin: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, received {loss!r}.")
        needs_id = remove_accidental_hits or candidate_probabilities is not None
        if needs_id and not candidate_id:
            raise ConfigError(
                "remove_accidental_hits and candidate_probabilities need "
                "candidate_id, the column that identifies a candidate."
            )
        if loss == "paper" and (negative_sampler or num_hard_negatives):
            raise ConfigError(
                "loss='paper' draws its own 4 random negatives; do not combine it "
                "with negative_sampler or num_hard_negatives."
            )
        if loss in losses.SCORE_LOSSES and candidate_probabilities is not None:
            raise ConfigError(
                "candidate_probabilities (logQ correction) applies to the softmax "
                f"losses only, received loss={loss!r}; use loss='in_batch' or pass "
                "candidate_probabilities=None."
            )
        if temperature is not None and not temperature > 0:
            raise ConfigError(f"temperature must be > 0, received {temperature}.")
        if num_paper_negatives < 1:
            raise ConfigError(
                f"num_paper_negatives must be >= 1, received {num_paper_negatives}."
            )
        self.query_tower = query_tower
        self.candidate_tower = candidate_tower
        link_shared_embeddings(query_tower, candidate_tower)  # history features
        self.candidate_id = candidate_id
        self.loss_name = loss
        self.margin = float(margin)
        normalized = getattr(query_tower, "normalize", False)
        self.temperature = float(
            temperature if temperature is not None else (0.05 if normalized else 1.0)
        )
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.gamma = float(gamma)
        self.num_paper_negatives = int(num_paper_negatives)
        self.negative_sampler = negative_sampler
        self.num_hard_negatives = num_hard_negatives
        self.task = tfrs.tasks.Retrieval(
            temperature=self.temperature,
            num_hard_negatives=num_hard_negatives,
            remove_accidental_hits=self.remove_accidental_hits,
        )
        # Epoch means of the loss (TFRS's train_step logs the last batch's). Set
        # past Keras attribute tracking: listed by `metrics` (so Keras resets
        # them), but not part of `weights` or checkpoints.
        object.__setattr__(self, "_trackers", tuple(
            tf.keras.metrics.Mean(name=name)
            for name in ("loss", "regularization_loss", "total_loss")
        ))
        self._probabilities = None
        self.candidate_probabilities = (
            None if candidate_probabilities is None
            else {str(k): float(v) for k, v in candidate_probabilities.items()})
        if candidate_probabilities is not None:
            keys = np.asarray([str(k) for k in candidate_probabilities], dtype=object)
            values = np.asarray(list(candidate_probabilities.values()), np.float32)
            if not len(values):
                raise ConfigError("candidate_probabilities is empty.")
            if (values <= 0).any():
                raise ConfigError("candidate_probabilities must all be > 0.")
            self._probabilities = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(keys, tf.string), tf.constant(values)
                ),
                default_value=float(values.min()),
            )

    def call(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {}
        if all(n in features for n in self.query_tower.feature_names):
            out["query"] = self.query_tower(features)
        if all(n in features for n in self.candidate_tower.feature_names):
            out["candidate"] = self.candidate_tower(features)
        return out

    def compute_loss(
        self, features: Mapping[str, tf.Tensor], training: bool = False
    ) -> tf.Tensor:
        queries = self.query_tower(features)
        candidates = self.candidate_tower(features)
        if self.loss_name == "paper":
            return self._paper_loss(queries, candidates)
        ids = features[self.candidate_id] if self.candidate_id else None
        if CANDIDATE_KEY in features:  # the id column holds hashed ids
            ids = features[CANDIDATE_KEY]
        batch = tf.cast(tf.shape(candidates)[0], tf.float32)
        expected = None
        if self._probabilities is not None:
            expected = batch * self._probabilities.lookup(tf.reshape(ids, [-1]))
        if self.negative_sampler is not None and training:
            extra, probability = self.negative_sampler.sample()
            candidates = tf.concat([candidates, self.candidate_tower(extra)], axis=0)
            draws = float(self.negative_sampler.num_negatives)
            if ids is not None:
                ids = tf.concat([tf.reshape(ids, [-1]), extra[self.candidate_id]], 0)
            if expected is not None:
                expected = tf.concat([expected, draws * probability], axis=0)
        hard = features.get(HARD_NEGATIVES) if training else None
        if hard is not None:  # mined negatives (tfdssm.training.negatives), [batch * m]
            if expected is not None:
                raise ConfigError("hard negatives cannot be combined with "
                                  "candidate_probabilities (logQ correction).")
            candidates = tf.concat([candidates, self.candidate_tower(hard)], axis=0)
            if ids is not None:
                hard_ids = hard.get(CANDIDATE_KEY)
                if hard_ids is None:
                    hard_ids = hard[self.candidate_id]
                ids = tf.concat([tf.reshape(ids, [-1]),
                                 tf.reshape(hard_ids, [-1])], 0)
        if ids is not None and self.remove_accidental_hits:
            ids = _comparable_ids(ids)
        if self.loss_name in losses.SCORE_LOSSES:
            return losses.ranking_loss(
                self.loss_name, queries, candidates,
                ids if self.remove_accidental_hits else None,
                temperature=self.temperature, margin=self.margin,
                num_hard_negatives=self.num_hard_negatives,
            ) / _replicas()
        if expected is not None:
            # TFRS clips sampling probabilities to [1e-6, 1], but these are
            # expected counts (often > 1). One common scale cancels in every
            # row's softmax, so bring the largest down to 1 instead.
            expected = expected / tf.reduce_max(expected)
        return self.task(
            queries,
            candidates,
            candidate_sampling_probability=expected,
            candidate_ids=ids if self.remove_accidental_hits else None,
            compute_metrics=False,
            compute_batch_metrics=False,
        )

    def _paper_loss(self, queries: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
        """Softmax over gamma * cosine of 1 positive and N shifted negatives."""
        batch = tf.shape(candidates)[0]
        shifts = tf.random.uniform(
            [self.num_paper_negatives], 1, tf.maximum(batch, 2), dtype=tf.int32
        )
        index = tf.math.floormod(
            tf.range(batch)[:, None] + tf.concat([[0], shifts], 0)[None, :], batch
        )
        queries = tf.math.l2_normalize(queries, axis=-1)  # also per head
        docs = tf.gather(tf.math.l2_normalize(candidates, axis=1), index)
        logits = self.gamma * losses.pair_scores(queries, docs)
        labels = tf.zeros([batch], tf.int32)
        # A per-replica mean: scaled so that the replicas' gradients, which the
        # optimizer sums, add up to the gradient of the global-batch mean.
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        ) / _replicas()

    @property
    def metrics(self) -> list[tf.keras.metrics.Metric]:
        return [*super().metrics, *self._trackers]

    def train_step(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One optimizer step on a batch of raw features.

        As ``tfrs.Model.train_step``, with two differences that matter under a
        ``tf.distribute`` strategy and for Keras callbacks: regularization losses
        are divided by the number of replicas (the optimizer sums the replicas'
        gradients), and the logs are running means over the epoch of the loss of
        the global batch (what one device would report), not the last batch's.

        Args:
            inputs: Column name -> ``[batch]`` tensor (this replica's share).

        Returns:
            ``{"loss", "regularization_loss", "total_loss"}`` epoch means.
        """
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization = self._regularization_loss()
            total = loss + regularization
        gradients = tape.gradient(total, self.trainable_variables)
        self.optimizer.apply_gradients(
            zip(gradients, self.trainable_variables, strict=True)
        )
        return self._track(loss, regularization)

    def test_step(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Loss of one batch; ``evaluate`` returns the means over all batches."""
        loss = self.compute_loss(inputs, training=False)
        return self._track(loss, self._regularization_loss())

    def _regularization_loss(self) -> tf.Tensor:
        if not self.losses:
            return tf.constant(0.0)
        return tf.add_n([tf.reduce_sum(x) for x in self.losses]) / _replicas()

    def _track(
        self, loss: tf.Tensor, regularization: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        # Each replica holds its share of the global loss; the trackers average
        # over replicas and steps, so scale by the replica count to get the
        # global-batch loss per step.
        replicas = float(_replicas())
        for tracker, value in zip(
            self._trackers, (loss, regularization, loss + regularization), strict=True
        ):
            tracker.update_state(value * replicas)
        return {m.name: m.result() for m in self.metrics}

    def get_config(self) -> dict[str, Any]:
        shares = getattr(self.candidate_tower, "tower", None) is self.query_tower
        return {
            "query_tower": tf.keras.layers.serialize(self.query_tower),
            "candidate_tower": tf.keras.layers.serialize(self.candidate_tower),
            "candidate_shares_query_tower": shares,
            "candidate_id": self.candidate_id,
            "loss": self.loss_name,
            "temperature": self.temperature,
            "remove_accidental_hits": self.remove_accidental_hits,
            "num_hard_negatives": self.num_hard_negatives,
            "gamma": self.gamma,
            "num_paper_negatives": self.num_paper_negatives,
            "margin": self.margin,
            "candidate_probabilities": self.candidate_probabilities,
            "negative_sampler": (None if self.negative_sampler is None
                                 else self.negative_sampler.get_config()),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DSSM:
        config = dict(config)
        query = tf.keras.layers.deserialize(config["query_tower"])
        candidate = tf.keras.layers.deserialize(config["candidate_tower"])
        if config.pop("candidate_shares_query_tower", False):
            candidate = candidate.sharing(query)  # one tower, not two copies
        sampler = config.get("negative_sampler")
        if isinstance(sampler, Mapping):
            config["negative_sampler"] = NegativeSampler(**sampler)
        config["query_tower"], config["candidate_tower"] = query, candidate
        return cls(**config)


def _comparable_ids(ids: tf.Tensor) -> tf.Tensor:
    """Candidate ids for the accidental-hit mask, as cheap-to-compare integers.

    The mask compares every candidate id with every other (``[batch, batch]``);
    on strings (the pairs pipeline's ids are whole documents) that is a million
    string comparisons per step of 1,024. A 64-bit fingerprint compares in one
    instruction; two different ids collide with probability ~2^-64 per pair, and
    a collision only drops one negative from one row's softmax.

    Args:
        ids: ``[n]`` or ``[n, 1]`` ids of any dtype.

    Returns:
        int64 ``[n]`` for string ids, else ``ids`` as ``[n]``.
    """
    ids = tf.reshape(ids, [-1])
    if ids.dtype == tf.string:
        return candidate_key(ids)
    return ids


def candidate_key(ids: tf.Tensor) -> tf.Tensor:
    """The int64 fingerprint of string candidate ids that accidental-hit
    removal compares (see :func:`_comparable_ids`).

    Args:
        ids: string ``[n]``.

    Returns:
        int64 ``[n]``.
    """
    return tf.strings.to_hash_bucket_fast(ids, 2**63 - 1)


def _replicas() -> int:
    """Replicas of the current ``tf.distribute`` strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync
