"""Runs a tower (or an exported signature) over columns of numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from tfdssm.errors import DataError


def embed(
    tower: tf.keras.layers.Layer | tf.types.experimental.ConcreteFunction,
    arrays: Mapping[str, np.ndarray],
    batch_size: int = 1024,
) -> np.ndarray:
    """Runs a tower (or a signature returning ``embedding``) over columns.

    Args:
        tower: A :class:`tfdssm.model.towers.Tower` or a SavedModel signature.
        arrays: Column -> ``[n]`` array; the tower picks its columns.
        batch_size: Rows per call.

    Returns:
        float32 ``[n, dim]``.
    """
    names = getattr(tower, "feature_names", None) or list(
        tower.structured_input_signature[1]
    )
    size = len(next(iter(arrays.values())))
    chunks = []
    for start in range(0, size, batch_size):
        batch = {n: tf.constant(arrays[n][start : start + batch_size]) for n in names}
        out = tower(batch) if hasattr(tower, "feature_names") else tower(**batch)
        if isinstance(out, Mapping):
            out = out["embedding"]
        chunks.append(np.asarray(out, dtype=np.float32))
    if not chunks:
        raise DataError("nothing to embed: the table has no rows.")
    return np.concatenate(chunks, axis=0)

