"""Extra negatives for training: uniform or popularity-sampled candidates.

In-batch softmax only ever sees candidates that were clicked in the same batch, so
popular items dominate its negatives. Mixing in candidates drawn from the whole
corpus (Yang et al., 2020, "mixed negative sampling") fixes that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError


class NegativeSampler(tf.Module):
    """Draws candidates (with all their features) from a fixed corpus.

    Args:
        candidates: Column name -> array ``[num_candidates]``, one row per
            distinct candidate, including the candidate id column.
        num_negatives: Candidates drawn per training step.
        distribution: ``uniform``, or ``popularity``: proportional to
            ``counts ** alpha`` (word2vec's smoothed unigram distribution).
        counts: ``[num_candidates]`` occurrence counts; needed for popularity.
        alpha: Smoothing exponent for popularity sampling.
        seed: Seed of the sampler's random generator.

    >>> sampler = NegativeSampler({"doc": np.array(["a", "b", "c"])}, 4)
    >>> features, probability = sampler.sample()
    >>> features["doc"].shape, probability.shape
    (TensorShape([4]), TensorShape([4]))
    """

    def __init__(
        self,
        candidates: Mapping[str, np.ndarray],
        num_negatives: int,
        distribution: str = "uniform",
        counts: np.ndarray | None = None,
        alpha: float = 0.75,
        seed: int = 0,
    ) -> None:
        super().__init__(name="negative_sampler")
        sizes = {name: len(values) for name, values in candidates.items()}
        if not sizes or len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
            raise ConfigError(
                f"candidates must be non-empty columns of equal length, got {sizes}."
            )
        if num_negatives < 1:
            raise ConfigError(f"num_negatives must be >= 1, received {num_negatives}.")
        size = next(iter(sizes.values()))
        if distribution == "uniform":
            weights = np.ones([size])
        elif distribution == "popularity":
            if counts is None or len(counts) != size:
                raise ConfigError(
                    "popularity sampling needs counts with one value per candidate."
                )
            counts = np.asarray(counts, dtype=np.float64)
            if not np.isfinite(counts).all() or (counts < 0).any():
                raise ConfigError("counts must be finite and non-negative.")
            weights = counts**alpha
            if not np.isfinite(weights).all() or weights.sum() <= 0:
                raise ConfigError(
                    f"counts ** alpha (alpha={alpha}) must be finite with a positive "
                    "sum; give at least one candidate a positive count."
                )
        else:
            raise ConfigError(
                "distribution must be 'uniform' or 'popularity', received "
                f"{distribution!r}."
            )
        self._config = {
            "candidates": {k: np.asarray(v).tolist() for k, v in candidates.items()},
            "num_negatives": int(num_negatives), "distribution": distribution,
            "counts": None if counts is None else np.asarray(counts).tolist(),
            "alpha": float(alpha), "seed": int(seed)}
        probability = weights / weights.sum()
        self.num_negatives = int(num_negatives)
        self.distribution = distribution
        self._columns = {
            name: tf.constant(np.asarray(values)) for name, values in candidates.items()
        }
        self._probability = tf.constant(probability, tf.float32)
        self._logits = tf.constant(np.log(np.maximum(probability, 1e-30))[None, :],
                                   tf.float32)
        self._generator = tf.random.Generator.from_seed(seed)

    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments: ``NegativeSampler(**config)``
        rebuilds the sampler (a fresh random generator from ``seed``)."""
        columns = self._config["candidates"]
        return {**self._config, "candidates": {k: list(v) for k, v in columns.items()}}

    def sample(self) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """Draws ``num_negatives`` candidates with replacement.

        Returns:
            ``(features, probability)``: column -> ``[num_negatives]`` and float32
            ``[num_negatives]``, each draw's probability under the sampler.
        """
        seed = self._generator.make_seeds(1)[:, 0]
        index = tf.random.stateless_categorical(
            self._logits, self.num_negatives, seed=seed
        )[0]
        features = {name: tf.gather(col, index) for name, col in self._columns.items()}
        return features, tf.gather(self._probability, index)
