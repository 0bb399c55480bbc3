"""Embedding a candidate corpus in shards, for corpora too big for one process.

Each process (worker ``index`` of ``num_shards``) reads the corpus as a
``tf.data`` stream, keeps every ``num_shards``-th row starting at ``index``
(``Dataset.shard``), embeds it batch by batch and streams the vectors to its own
``.npy`` file, so neither the corpus nor its embeddings have to fit in one
process's memory. The shard files together hold every row exactly once;
:func:`read_embedding_shards` puts them back in corpus order.

Files written by shard ``i`` of ``n`` in ``directory``::

    embeddings-0000i-of-0000n.npy   float32 [rows of the shard, dim]
    ids-0000i-of-0000n.txt          one candidate id per line (if an id column)

Example, on worker ``i`` of ``n`` (see
:func:`tfdssm.training.distribute.worker_shard`)::

    rows = data.tfrecord_dataset("corpus-*.tfrecord", features, shuffle=False)
    write_embedding_shard(towers.signatures["candidate"], rows, "embeddings/",
                          num_shards=n, index=i, id_column="doc_id")
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError, DataError
from tfdssm.model.runner import embed

_PATTERN = re.compile(r"embeddings-(\d{5})-of-(\d{5})\.npy$")


def shard_rows(
    dataset: tf.data.Dataset, num_shards: int, index: int
) -> tf.data.Dataset:
    """Rows ``index, index + num_shards, ...`` of a dataset of feature dicts.

    Args:
        dataset: Rows (``{name: scalar}``) or batches (``{name: [batch]}``, as
            :func:`tfdssm.data.make_dataset` yields; unbatched first). Its order
            must be the same in every process (no shuffling).
        num_shards: Number of shards (processes).
        index: This shard, ``0 <= index < num_shards``.

    Returns:
        A dataset of rows.

    Raises:
        ConfigError: ``index`` outside ``[0, num_shards)``.
    """
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ConfigError(
            f"shard index must be in [0, num_shards) with num_shards >= 1; received "
            f"index={index}, num_shards={num_shards}."
        )
    specs = tf.nest.flatten(dataset.element_spec)
    if specs and all(s.shape.rank == 1 for s in specs):
        dataset = dataset.unbatch()
    return dataset.shard(num_shards, index)


def _batches(
    tower: Any, dataset: tf.data.Dataset, num_shards: int, index: int,
    batch_size: int, id_column: str | None,
):
    """Yields ``(ids or None, float32 [batch, dim])`` for one shard."""
    rows = shard_rows(dataset, num_shards, index).batch(batch_size)
    for batch in rows.as_numpy_iterator():
        if id_column is not None and id_column not in batch:
            raise DataError(
                f"id column {id_column!r} is not in the corpus rows; they have "
                f"{sorted(batch)}. Pass the column that identifies a candidate."
            )
        vectors = embed(tower, batch, batch_size=batch_size)
        ids = None
        if id_column is not None:
            ids = [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                   for v in batch[id_column]]
        yield ids, vectors


def embed_sharded(
    tower: Any,
    dataset: tf.data.Dataset,
    num_shards: int = 1,
    index: int = 0,
    batch_size: int = 1024,
) -> np.ndarray:
    """Embeds one shard of a corpus in memory.

    Args:
        tower: A :class:`tfdssm.model.towers.Tower` or a SavedModel signature returning
            ``embedding`` (e.g. ``towers.signatures["candidate"]``).
        dataset: The corpus rows or batches, in a fixed order.
        num_shards: Number of shards.
        index: Which shard.
        batch_size: Rows per tower call.

    Returns:
        float32 ``[rows of the shard, dim]``: rows ``index::num_shards``.
    """
    chunks = [v for _, v in _batches(tower, dataset, num_shards, index, batch_size,
                                     None)]
    if not chunks:
        raise DataError(f"shard {index} of {num_shards} has no rows.")
    return np.concatenate(chunks, axis=0)


def shard_name(kind: str, num_shards: int, index: int, suffix: str) -> str:
    """``{kind}-{index:05d}-of-{num_shards:05d}{suffix}``."""
    return f"{kind}-{index:05d}-of-{num_shards:05d}{suffix}"


def write_embedding_shard(
    tower: Any,
    dataset: tf.data.Dataset,
    directory: str | os.PathLike,
    num_shards: int = 1,
    index: int = 0,
    id_column: str | None = None,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Streams one shard's embeddings (and ids) to files in ``directory``.

    Only one batch is in memory at a time: vectors are appended to a raw file,
    which then becomes an ``.npy`` (header + the same bytes). Files appear
    under their final names only when complete.

    Args:
        tower: A tower or a SavedModel signature (see :func:`embed_sharded`).
        dataset: The corpus rows or batches, in the same order in every process.
        directory: Output directory (shared by all shards; created if needed).
        num_shards: Number of shards.
        index: Which shard this process writes.
        id_column: Column with candidate ids to write alongside, or ``None``.
        batch_size: Rows per tower call.

    Returns:
        ``{"embeddings": path, "ids": path or None, "rows": n, "dim": d}``.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / shard_name("embeddings", num_shards, index, ".npy")
    raw = final.with_name(f".{final.name}.raw-{os.getpid()}")
    ids_path = directory / shard_name("ids", num_shards, index, ".txt")
    ids_tmp = ids_path.with_name(f".{ids_path.name}.tmp-{os.getpid()}")
    rows, dim = 0, None
    try:
        with raw.open("wb") as vectors, ids_tmp.open("w", encoding="utf-8") as ids:
            for batch_ids, batch in _batches(tower, dataset, num_shards, index,
                                             batch_size, id_column):
                dim = batch.shape[1]
                vectors.write(np.ascontiguousarray(batch, dtype="<f4").tobytes())
                rows += len(batch)
                for value in batch_ids or ():
                    if "\n" in value or "\r" in value:
                        raise DataError(f"candidate id {value!r} has a line break.")
                    ids.write(value + "\n")
        if dim is None:
            raise DataError(f"shard {index} of {num_shards} has no rows.")
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as out, raw.open("rb") as source:
            header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(source, out, 1 << 20)
        os.replace(tmp, final)
        if id_column is not None:
            os.replace(ids_tmp, ids_path)
    finally:
        raw.unlink(missing_ok=True)
        ids_tmp.unlink(missing_ok=True)
    return {"embeddings": str(final), "ids": str(ids_path) if id_column else None,
            "rows": rows, "dim": int(dim)}


def read_embedding_shards(
    directory: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reassembles all shards in corpus order (the inverse of the sharding).

    For a corpus larger than memory, read the shard files one at a time instead
    (``np.load(path, mmap_mode="r")``); row ``j`` of shard ``i`` of ``n`` is
    corpus row ``i + j * n``.

    Returns:
        ``(embeddings float32 [rows, dim], ids [rows] str or None)``: the order
        of :func:`tfdssm.export.candidates.read_candidates`.

    Raises:
        DataError: no shard files, a missing shard, or shard sizes that do not
            come from one sharding of one corpus.
    """
    directory = pathlib.Path(directory)
    found = {}
    for path in directory.glob("embeddings-*-of-*.npy"):
        match = _PATTERN.search(path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if len(found) != 1:
        raise DataError(
            f"expected the shards of one sharding in {str(directory)!r}, found "
            f"shard counts {sorted(found) or 'none'}. Write every shard with the same "
            "num_shards into an empty directory."
        )
    ((num_shards, paths),) = found.items()
    missing = sorted(set(range(num_shards)) - set(paths))
    if missing:
        raise DataError(
            f"shard(s) {missing} of {num_shards} are missing in {str(directory)!r}; "
            "run write_embedding_shard with those indices."
        )
    shards = [np.load(paths[i], mmap_mode="r") for i in range(num_shards)]
    total = sum(len(s) for s in shards)
    expected = [len(range(i, total, num_shards)) for i in range(num_shards)]
    if [len(s) for s in shards] != expected:
        raise DataError(
            f"shard sizes {[len(s) for s in shards]} do not come from one sharding of "
            f"{total} rows (expected {expected}); were they written from the same "
            "corpus?"
        )
    embeddings = np.empty([total, shards[0].shape[1]], np.float32)
    for i, shard in enumerate(shards):
        embeddings[i::num_shards] = shard
    id_files = [directory / shard_name("ids", num_shards, i, ".txt")
                for i in range(num_shards)]
    if not all(p.is_file() for p in id_files):
        return embeddings, None
    ids = np.empty([total], dtype=object)
    for i, path in enumerate(id_files):
        ids[i::num_shards] = path.read_text(encoding="utf-8").splitlines()
    return embeddings, ids.astype(str)


__all__ = [
    "embed_sharded",
    "read_embedding_shards",
    "shard_rows",
    "write_embedding_shard",
]
