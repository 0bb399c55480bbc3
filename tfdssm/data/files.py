"""Training input streamed from many files, each worker reading only its own.

``tfdssm train --data 'dir/part-*.csv'`` (or ``*.parquet``): the training rows are
never gathered into one table. One pass over the files (:func:`scan`, a file
at a time) collects what needs the whole data set: the held-out test rows, the
distinct candidates (the corpus to index) and each file's training-row count.
Training then streams the files through ``tf.data`` (:func:`train_dataset`):
with ``N`` workers each reads every ``N``-th file (sharding by FILE, the
``tf.data`` auto-shard policy of the same name); with fewer files than
workers, every worker reads all files and keeps every ``N``-th row (by DATA).

Test rows are chosen per row by a hash of the file's name and the row's
position in it (:func:`held_out`), the same in the pass and in ``tf.data``,
so that every worker agrees without reading the others' files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.data.readers import check_text_columns, read_table
from tfdssm.data.tables import expand, is_glob
from tfdssm.data.tables import table_format as _format
from tfdssm.errors import DataError
from tfdssm.features import Feature

logger = logging.getLogger("tfdssm")

_BUCKETS = 10_000  # test-split resolution: fractions are rounded to 1/10,000
def held_out(name: str, rows: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Which of ``rows`` rows of file ``name`` (its base name) are test rows.

    The same hash as the ``tf.data`` filter (:func:`_is_test`), evaluated
    eagerly: ``Fingerprint64("seed:name:row") mod 10,000 < fraction x 10,000``.

    Returns:
        bool ``[rows]``.
    """
    if rows == 0:
        return np.zeros([0], bool)
    return _is_test(tf.constant(name), tf.range(rows, dtype=tf.int64), fraction,
                    seed).numpy()


def _is_test(name: tf.Tensor, row: tf.Tensor, fraction: float, seed: int) -> tf.Tensor:
    key = tf.strings.join([str(int(seed)), name, tf.strings.as_string(row)], ":")
    bucket = tf.strings.to_hash_bucket_fast(key, _BUCKETS)
    return bucket < int(round(fraction * _BUCKETS))


@dataclasses.dataclass
class TrainFiles:
    """Training rows streamed from files (built by :func:`scan`).

    Attributes:
        files: The files, sorted.
        columns: Every file's header (the same in all).
        rows: Training rows (test rows excluded) per file.
        test_fraction: Share of rows held out (by :func:`held_out`).
        seed: Seed of the test split.
    """

    files: list[str]
    columns: list[str]
    rows: list[int]
    test_fraction: float
    seed: int = 0

    @property
    def num_rows(self) -> int:
        """Training rows in all files."""
        return int(sum(self.rows))

    def shard(self, num_shards: int, index: int) -> tuple[list[int], str]:
        """The files worker ``index`` of ``num_shards`` reads, and the policy.

        Returns:
            ``(file positions, "FILE" or "DATA")``: every ``num_shards``-th file
            from ``index`` (FILE), or all files when there are fewer files than
            workers (DATA: the worker then keeps every ``num_shards``-th row).
        """
        if num_shards <= 1:
            return list(range(len(self.files))), "FILE"
        if len(self.files) < num_shards:
            return list(range(len(self.files))), "DATA"
        return list(range(index, len(self.files), num_shards)), "FILE"

    def shard_rows(self, num_shards: int, index: int) -> int:
        """Training rows worker ``index`` of ``num_shards`` reads per epoch."""
        positions, policy = self.shard(num_shards, index)
        if policy == "DATA":
            return len(range(index, self.num_rows, num_shards))
        return int(sum(self.rows[i] for i in positions))


def scan(
    files: Sequence[str], columns: Sequence[str], test_fraction: float,
    seed: int = 0, what: str = "the data",
) -> tuple[TrainFiles, pd.DataFrame, pd.DataFrame]:
    """One pass over ``files``, a file at a time (memory: one file, plus the
    test rows and distinct candidates kept).

    Args:
        files: Table files of one format with the same header.
        columns: The columns to read.
        test_fraction: Share of rows held out for evaluation.
        seed: Seed of the test split.
        what: How messages name the data.

    Returns:
        ``(train files, test rows, all distinct rows of columns)``; text cells
        are ``str`` (missing cells ``""``).

    Raises:
        DataError: an unreadable file, a missing column, a header that differs
            from the first file's.
    """
    header: list[str] | None = None
    rows, tests, distinct = [], [], []
    for path in files:
        frame = read_table(path)
        if header is None:
            header = [str(c) for c in frame.columns]
        elif [str(c) for c in frame.columns] != header and _format(path) != ".parquet":
            raise DataError(
                f"{path!r} has the columns {list(frame.columns)}, but {files[0]!r} has "
                f"{header}; every file of {what} needs the same header.")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(f"{what}: {path!r} has no column(s) {missing}; available "
                            f"columns: {list(frame.columns)}.")
        check_text_columns(frame, columns, f"{what} ({path!r})")
        frame = frame[list(columns)].astype(object).fillna("").astype(str)
        mask = held_out(os.path.basename(path), len(frame), test_fraction, seed)
        rows.append(int((~mask).sum()))
        tests.append(frame[mask])
        distinct.append(frame.drop_duplicates())
    test = pd.concat(tests, ignore_index=True)
    every = pd.concat(distinct, ignore_index=True).drop_duplicates()
    return (TrainFiles(list(files), header or [], rows, test_fraction, seed), test,
            every.reset_index(drop=True))


def train_dataset(
    source: TrainFiles,
    features: Sequence[Feature],
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_shards: int = 1,
    index: int = 0,
    repeat: bool = False,
    num_batches: int | None = None,
) -> tf.data.Dataset:
    """Streams worker ``index``'s training rows in batches of ``batch_size``.

    Args:
        source: The files (:func:`scan`).
        features: Specs of the columns to read (text stays ``tf.string``,
            numeric columns become float32).
        batch_size: Rows per batch of this worker.
        seed: Shuffle seed.
        shuffle: Shuffle the file order and the rows (each epoch anew).
        num_shards: Workers reading the files.
        index: This worker (``0 <= index < num_shards``).
        repeat: Repeat forever (parameter-server training).
        num_batches: Instead of ``batch_size``: split each pass over this
            worker's rows into exactly this many batches of near-equal size,
            and repeat (multi-worker training, where every worker must take the
            same number of steps per epoch: :func:`equal_steps`).

    Returns:
        Dataset of ``{name: [batch]}`` dicts; without ``num_batches`` the last
        batch may be partial. Either way each pass reads every training row
        of this worker once.

    Raises:
        DataError: fewer rows than ``num_batches``.
    """
    names = list(dict.fromkeys(f.name for f in features))
    dtypes = {f.name: f.dtype for f in features}
    missing = [n for n in names if n not in source.columns]
    if missing:
        raise DataError(f"the training files have no column(s) {missing}; available "
                        f"columns: {source.columns}.")
    positions, policy = source.shard(num_shards, index)
    if policy == "DATA":
        logger.info("%d file(s) for %d workers: every worker reads all files and "
                    "keeps every %d-th row (sharding by DATA); give at least as "
                    "many files as workers to shard by FILE", len(source.files),
                    num_shards, num_shards)
    if num_shards > 1:
        logger.info("worker %d of %d reads %d of %d file(s), %d training rows",
                    index, num_shards, len(positions), len(source.files),
                    source.shard_rows(num_shards, index))
    paths = [source.files[i] for i in positions]
    files = tf.data.Dataset.from_tensor_slices(
        (paths, [os.path.basename(p) for p in paths]))
    if shuffle and policy == "FILE":
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    fraction, split_seed = source.test_fraction, source.seed

    def read(path: tf.Tensor, name: tf.Tensor) -> tf.data.Dataset:
        rows = _reader(paths[0], source.columns, names)(path).enumerate()
        return rows.filter(
            lambda row, _: tf.logical_not(_is_test(name, row, fraction, split_seed))
        ).map(lambda _, values: values)

    if policy == "DATA":  # one order everywhere, then every num_shards-th row
        rows = files.flat_map(read).shard(num_shards, index)
    else:
        rows = files.interleave(read, cycle_length=min(4, len(paths)),
                                num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=not shuffle)

    def to_features(values: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {n: values[n] if dtypes[n] == tf.string
                else tf.strings.to_number(values[n], tf.float32) for n in names}

    rows = rows.map(to_features, num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle:
        rows = rows.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    if num_batches is not None:
        dataset = _split(rows, source.shard_rows(num_shards, index), num_batches,
                         index).repeat()
    elif repeat:
        dataset = rows.repeat().batch(batch_size, drop_remainder=True)
    else:
        dataset = rows.batch(batch_size)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()  # sharded here: no auto-sharding on top
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    return dataset.with_options(options)


def equal_steps(source: TrainFiles, num_shards: int, rows_per_step: int) -> int:
    """Steps per epoch that let every worker read all its rows once: the
    largest worker's rows over ``rows_per_step`` (rounded up); the others
    take as many, smaller, steps.

    >>> equal_steps(TrainFiles(["a", "b"], ["q"], [20, 9], 0.0), 2, 8)
    3
    """
    return max(-(-source.shard_rows(num_shards, w) // rows_per_step)
               for w in range(num_shards))


def _split(rows: tf.data.Dataset, count: int, parts: int,
           index: int) -> tf.data.Dataset:
    """Batches a pass of ``count`` rows into exactly ``parts`` batches whose
    sizes differ by at most one (batch ``k`` holds rows
    ``[ceil(k count / parts), ceil((k + 1) count / parts))``)."""
    if count < parts:
        raise DataError(
            f"worker {index} has {count} training row(s) for {parts} steps per "
            "epoch (the largest worker's); the files differ too much in size. "
            "Split the data into files of similar size, or use fewer workers.")
    total, groups = tf.constant(count, tf.int64), tf.constant(parts, tf.int64)

    def start(k: tf.Tensor) -> tf.Tensor:
        return (k * total + groups - 1) // groups

    return rows.enumerate().group_by_window(
        key_func=lambda i, _: (i * groups) // total,
        reduce_func=lambda k, window: window.map(lambda _, x: x).batch(count),
        window_size_func=lambda k: start(k + 1) - start(k))


@tf.autograph.experimental.do_not_convert
def _reader(example: str, header: Sequence[str], names: Sequence[str]):
    """``path -> Dataset of {name: string}``: CSV/TSV with ``tf.data``'s CSV
    reader (works on any worker), Parquet through pyarrow (in this process)."""
    kind = _format(example)
    if kind in (".csv", ".tsv"):
        selected = sorted(header.index(n) for n in names)

        def read_csv(path: tf.Tensor) -> tf.data.Dataset:
            data = tf.data.experimental.CsvDataset(
                path, [tf.constant("", tf.string)] * len(selected), header=True,
                field_delim="\t" if kind == ".tsv" else ",", select_cols=selected)
            return data.map(lambda *cells: {header[i]: c for i, c in
                                            zip(selected, cells, strict=True)})

        return read_csv

    def rows(path: bytes):
        frame = pd.read_parquet(path.decode(), columns=list(names))
        frame = frame.astype(object).fillna("").astype(str)
        yield from ({n: row[i] for i, n in enumerate(names)}
                    for row in frame.itertuples(index=False))

    spec = {n: tf.TensorSpec([], tf.string) for n in names}
    return lambda path: tf.data.Dataset.from_generator(
        rows, args=(path,), output_signature=spec)


__all__ = ["TrainFiles", "equal_steps", "expand", "held_out", "is_glob", "scan",
           "train_dataset"]
