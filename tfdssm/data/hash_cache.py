"""Hash once, train many epochs: the trigram ids of a run's texts, computed once.

The towers hash raw text in-graph (:class:`tfdssm.features.layers.TextEmbedding`),
which is what the exported SavedModels do with every request. Training reads
the same texts every epoch, so a run hashes each text column once, with the
very layer that reads it (:meth:`TextEmbedding.hash_ids`), and feeds the towers
the int32 ragged ids instead of the strings: the layer takes either and gives
the same output, so the weights, the exported models and their inputs (raw
strings) are the same with or without the cache.

* **Memory**: the ids of a column are one ragged tensor (4 bytes an id, about
  one id a code point); batches gather their rows. A run whose ids would take
  more than :data:`MEMORY_FRACTION` of the available memory hashes in-graph
  instead (logged).
* **Disk**: with a ``directory`` (a run's checkpoint dir), each column's ids are
  also written there under a key of the hashing parameters and the column's
  texts, so ``--resume`` after a kill does not hash again; another key (other
  parameters or data) never reads them.
* **Which columns**: a column read only by text layers with one hashing
  configuration (the two sides of a shared tower, say). The candidate id
  column may be a text column (the pairs pipeline's default id is the
  document); batches then also carry :data:`tfdssm.model.dssm.CANDIDATE_KEY`,
  the id's fingerprint that accidental-hit removal compares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.data.readers import read_table, to_feature_arrays
from tfdssm.errors import DataError
from tfdssm.features import Feature
from tfdssm.features.layers import TextEmbedding
from tfdssm.features.protocol import ColumnFeature
from tfdssm.model.dssm import CANDIDATE_KEY, candidate_key

logger = logging.getLogger("tfdssm")

MEMORY_FRACTION = 0.25  # most of the available memory the ids may take
HASH_BATCH = 4096  # texts hashed per call while building
_HASHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> traced


def cacheable_columns(model: Any) -> dict[str, TextEmbedding]:
    """The columns whose ids a run can cache, with the layer that hashes each.

    Args:
        model: A :class:`tfdssm.model.DSSM` (its ``query_tower`` and
            ``candidate_tower``).

    Returns:
        Column -> :class:`TextEmbedding`, for columns read only by text layers
        of one hashing configuration. The candidate id column is left out when
        the model also looks ids up as strings (logQ correction, sampled
        negatives).
    """
    layers: dict[str, TextEmbedding] = {}
    excluded: set[str] = set()
    for tower in (model.query_tower, model.candidate_tower):
        for feature, layer in zip(getattr(tower, "features", ()),
                                  getattr(tower, "feature_layers", ()), strict=False):
            columns = tuple(feature.served_columns)
            if (not isinstance(layer, TextEmbedding) or columns != (feature.name,)
                    or getattr(type(feature), "read", None) is not ColumnFeature.read):
                excluded.update(columns)
                continue
            known = layers.setdefault(feature.name, layer)
            if known.hashing_config() != layer.hashing_config():
                excluded.add(feature.name)
    uses_strings = (getattr(model, "_probabilities", None) is not None
                    or getattr(model, "negative_sampler", None) is not None)
    if uses_strings and model.candidate_id:
        excluded.add(model.candidate_id)
    return {n: layer for n, layer in layers.items() if n not in excluded}


def fingerprint(layer: TextEmbedding, texts: np.ndarray) -> str:
    """The cache key of a column: its hashing parameters and its texts.

    >>> layer = TextEmbedding(num_buckets=100, output_dim=2)
    >>> texts = np.asarray(["a", "b"], dtype=object)
    >>> fingerprint(layer, texts) == fingerprint(layer, texts[::-1])
    False
    """
    digest = hashlib.sha256(
        json.dumps(layer.hashing_config(), sort_keys=True).encode())
    digest.update(len(texts).to_bytes(8, "little"))
    for text in texts:
        data = str(text).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:32]


def estimated_bytes(layers: Mapping[str, TextEmbedding],
                    arrays: Mapping[str, np.ndarray]) -> int:
    """About how much memory the ids of ``arrays``' cached columns take."""
    total = 0
    for name, layer in layers.items():
        lengths = np.fromiter((min(len(str(t)), layer.max_length)
                               for t in arrays[name]), np.int64, len(arrays[name]))
        ids = int(lengths.sum()) * (1 + len(layer.word_ngrams))
        total += 4 * ids + 8 * len(lengths)
    return total


class HashCache:
    """The ids of hashed text columns, by key (in memory, optionally on disk).

    Args:
        directory: Also keep each column's ids there (``<key>.npz``) and read
            them back in a later process (``--resume``); ``None``: memory only.

    Attributes:
        hashed: Columns hashed by this cache (not found in memory or on disk).
        loaded: Columns read back from ``directory``.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = None if directory is None else pathlib.Path(directory)
        self._ids: dict[str, tf.RaggedTensor] = {}
        self.hashed = 0
        self.loaded = 0

    def ids(self, layer: TextEmbedding, texts: np.ndarray) -> tf.RaggedTensor:
        """The ids ``layer`` makes of ``texts``, hashed at most once per key.

        Args:
            layer: The text layer reading the column.
            texts: ``[n]`` str.

        Returns:
            int32 ragged ``[n, None]``, equal to ``layer.hash_ids(texts)``.
        """
        key = fingerprint(layer, texts)
        if key in self._ids:
            return self._ids[key]
        path = None if self.directory is None else self.directory / f"{key}.npz"
        ids = _load(path) if path is not None else None
        if ids is None:
            ids = hash_texts(layer, texts)
            self.hashed += 1
            if path is not None:
                _save(path, ids)
        else:
            self.loaded += 1
        self._ids[key] = ids
        return ids

    def columns(self, arrays: Mapping[str, Any], layers: Mapping[str, TextEmbedding],
                candidate_id: str | None = None) -> dict[str, Any]:
        """``arrays`` with the cached columns replaced by their ids.

        Args:
            arrays: Column -> ``[n]`` array (or tensor) of raw values.
            layers: :func:`cacheable_columns`.
            candidate_id: The model's candidate id column: if it is replaced,
                :data:`CANDIDATE_KEY` holds its fingerprints (int64 ``[n]``).

        Returns:
            Column -> tensor (int32 ragged ``[n, None]`` for cached columns).
        """
        out: dict[str, Any] = {}
        for name, values in arrays.items():
            if name in layers:
                texts = np.asarray(values.numpy() if hasattr(values, "numpy")
                                   else values, dtype=object)
                texts = np.asarray([t.decode("utf-8") if isinstance(t, bytes) else t
                                    for t in texts], dtype=object)
                out[name] = self.ids(layers[name], texts)
                if name == candidate_id:
                    out[CANDIDATE_KEY] = candidate_key(tf.constant(texts.astype(str)))
            else:
                out[name] = tf.convert_to_tensor(values)
        return out


def hash_texts(layer: TextEmbedding, texts: np.ndarray,
               batch: int = HASH_BATCH) -> tf.RaggedTensor:
    """``layer.hash_ids`` over ``texts``, ``batch`` at a time.

    Returns:
        int32 ragged ``[len(texts), None]``.
    """
    hash_ids = _HASHERS.get(layer)
    if hash_ids is None:
        owner = weakref.ref(layer)  # the cache must not keep the layer alive
        hash_ids = _HASHERS[layer] = tf.function(
            lambda texts: owner().hash_ids(texts),
            input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    parts = [hash_ids(tf.constant(np.asarray(texts[i:i + batch]).astype(str)))
             for i in range(0, len(texts), batch)]
    if not parts:
        return tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int32),
                                                tf.zeros([0], tf.int64))
    return tf.concat(parts, axis=0)


def _save(path: pathlib.Path, ids: tf.RaggedTensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, values=ids.flat_values.numpy(),
                     splits=ids.row_splits.numpy())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: pathlib.Path) -> tf.RaggedTensor | None:
    try:
        with np.load(path) as saved:
            return tf.RaggedTensor.from_row_splits(saved["values"], saved["splits"])
    except (OSError, ValueError, KeyError):
        return None  # absent or unreadable: hash again


def make_cached_dataset(
    source: str | os.PathLike | pd.DataFrame,
    features: Sequence[Feature],
    layers: Mapping[str, TextEmbedding],
    cache: HashCache,
    batch_size: int = 256,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = False,
    row_index: str | None = None,
    candidate_id: str | None = None,
) -> tf.data.Dataset:
    """:func:`tfdssm.data.readers.make_dataset` with cached ids for ``layers``.

    The rows come in the same order as ``make_dataset``'s with the same
    ``seed`` (the shuffle draws row positions), so a run trains on the same
    batches with or without the cache.

    Args:
        source: CSV/TSV/Parquet path or DataFrame.
        features: Specs of every column the model reads.
        layers: :func:`cacheable_columns`: the columns to feed as ids.
        cache: Where the ids come from.
        batch_size: Rows per batch.
        shuffle: Reshuffle rows each epoch.
        seed: Shuffle seed.
        drop_remainder: Drop a last partial batch.
        row_index: Also yield each row's position (int64) under this name.
        candidate_id: The model's candidate id column (see
            :meth:`HashCache.columns`).

    Returns:
        Dataset of ``{name: [batch]}`` dicts; cached columns are int32 ragged
        ``[batch, None]``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, received {batch_size}.")
    frame = read_table(source)
    if len(frame) == 0:
        raise DataError("the data has a header but no rows.")
    arrays: dict[str, Any] = to_feature_arrays(frame, features)
    if row_index is not None:
        arrays[row_index] = np.arange(len(frame), dtype=np.int64)
    columns = cache.columns(arrays, layers, candidate_id)
    dataset = tf.data.Dataset.range(len(frame))
    if shuffle:
        dataset = dataset.shuffle(min(len(frame), 100_000), seed=seed,
                                  reshuffle_each_iteration=True)

    def gather(rows: tf.Tensor) -> dict[str, Any]:
        return {name: tf.gather(values, rows) for name, values in columns.items()}

    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE)


__all__ = ["HashCache", "MEMORY_FRACTION", "cacheable_columns", "estimated_bytes",
           "fingerprint", "hash_texts", "make_cached_dataset"]
