"""Corpus files for ``tfdssm index``: globs, row readers and embedding records.

Plain Python (no Beam): the pipeline calls these inside its transforms, and
tests and notebooks can call them directly.

* :func:`expand` turns the ``--corpus`` patterns into files (local paths or any
  file system Beam knows: ``gs://``, ``s3://``, ``hdfs://``).
* :func:`read_rows` yields one ``{column: value}`` per corpus row of a CSV/TSV,
  Parquet or TFRecord (``tf.train.Example``) file, with the candidate tower's
  columns and the id column.
* :func:`encode_record` / :func:`decode_records`: the embedding files the
  pipeline writes are TFRecords of ``tf.train.Example`` with ``tfdssm:id`` (bytes),
  ``tfdssm:embedding`` (float ``[dim]``) and the candidate columns, so that anyone
  with TensorFlow can read them.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tfdssm.errors import DataError

CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfr")
SUFFIXES = CSV_SUFFIXES + PARQUET_SUFFIXES + TFRECORD_SUFFIXES
ID_KEY = "tfdssm:id"
EMBEDDING_KEY = "tfdssm:embedding"
_CHUNK_ROWS = 10_000


def expand(patterns: Sequence[str]) -> list[str]:
    """Files matching the glob patterns, sorted, each once.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for n in ("a.csv", "b.csv"): _ = (d / n).write_text("x\\n1\\n")
    >>> [pathlib.Path(p).name for p in expand([str(d / "*.csv")])]
    ['a.csv', 'b.csv']

    Raises:
        DataError: a pattern matches nothing, or a file has an unknown suffix.
    """
    from apache_beam.io.filesystems import FileSystems  # noqa: PLC0415

    found: dict[str, None] = {}
    for pattern in patterns:
        matched = [m.path for result in FileSystems.match([pattern])
                   for m in result.metadata_list]
        if not matched:
            raise DataError(f"--corpus {pattern!r} matches no file; pass a file or a "
                            "glob such as 'corpus/part-*.parquet'.")
        for path in sorted(matched):
            found[path] = None
    unknown = [p for p in found if not p.lower().endswith(SUFFIXES)]
    if unknown:
        raise DataError(f"cannot read {unknown[:3]}: corpus files must end in one of "
                        f"{SUFFIXES}. Convert them to CSV, Parquet or TFRecord.")
    return list(found)


def read_rows(
    path: str, columns: Mapping[str, str], id_column: str
) -> Iterator[dict[str, Any]]:
    """Rows of one corpus file: ``{id_column: str, column: str | float, ...}``.

    Args:
        path: A ``.csv``/``.tsv``, ``.parquet``/``.pq`` or ``.tfrecord`` file.
        columns: The candidate tower's columns and their kinds, ``"string"`` or
            ``"float"`` (missing text is ``""``; numbers must be present).
        id_column: Column naming each candidate (may be one of ``columns``).

    Yields:
        One dict per row; rows without an id are skipped.

    Raises:
        DataError: a column is missing, or a number cannot be parsed.
    """
    lower = path.lower()
    wanted = list(dict.fromkeys([id_column, *columns]))
    if lower.endswith(TFRECORD_SUFFIXES):
        chunks: Iterator[dict[str, list]] = _tfrecord_chunks(path, wanted)
    elif lower.endswith(PARQUET_SUFFIXES):
        chunks = _parquet_chunks(path, wanted)
    else:
        chunks = _csv_chunks(path, wanted, "\t" if lower.endswith(".tsv") else ",")
    kinds = {**{id_column: "string"}, **columns}
    for chunk in chunks:
        size = len(chunk[id_column])
        converted = {n: _convert(chunk[n], kinds[n], n, path) for n in wanted}
        for i in range(size):
            row = {n: converted[n][i] for n in wanted}
            if row[id_column]:
                yield row


def _convert(values: Sequence[Any], kind: str, name: str, path: str) -> list[Any]:
    if kind == "string":
        return ["" if v is None or (isinstance(v, float) and np.isnan(v))
                else v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in values]
    out = []
    for v in values:
        try:
            number = float(v)
        except (TypeError, ValueError):
            number = float("nan")
        if not np.isfinite(number):
            raise DataError(f"{path!r}: column {name!r} must hold finite numbers; "
                            f"found {v!r}. Fill or drop those rows first.")
        out.append(number)
    return out


def _missing(path: str, wanted: Sequence[str], have: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise DataError(f"{path!r} has no column(s) {missing}; it has {list(have)}. "
                        "The corpus needs the candidate tower's columns and the id "
                        "column (--id-column).")


def _open(path: str) -> Any:
    from apache_beam.io.filesystems import FileSystems  # noqa: PLC0415

    return FileSystems.open(path)


def _csv_chunks(path: str, wanted: Sequence[str], sep: str) -> Iterator[dict]:
    import pandas as pd  # noqa: PLC0415

    with _open(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8")
        reader = pd.read_csv(text, sep=sep, dtype=str, keep_default_na=False,
                             chunksize=_CHUNK_ROWS)
        for frame in reader:
            _missing(path, wanted, list(frame.columns))
            yield {c: frame[c].tolist() for c in wanted}


def _parquet_chunks(path: str, wanted: Sequence[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    with _open(path) as raw:
        handle = pq.ParquetFile(raw)
        _missing(path, wanted, handle.schema_arrow.names)
        for batch in handle.iter_batches(batch_size=_CHUNK_ROWS, columns=list(wanted)):
            yield {c: batch.column(c).to_pylist() for c in wanted}


def _tfrecord_chunks(path: str, wanted: Sequence[str]) -> Iterator[dict]:
    import tensorflow as tf  # noqa: PLC0415

    chunk: dict[str, list] = {c: [] for c in wanted}
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        features = tf.train.Example.FromString(record).features.feature
        _missing(path, wanted, list(features))
        for column in wanted:
            feature = features[column]
            values = (feature.bytes_list.value or feature.float_list.value
                      or feature.int64_list.value)
            chunk[column].append(values[0] if len(values) else None)
        if len(chunk[wanted[0]]) >= _CHUNK_ROWS:
            yield chunk
            chunk = {c: [] for c in wanted}
    if chunk[wanted[0]]:
        yield chunk


def shard_of(candidate_id: str, num_shards: int) -> int:
    """The retrieval shard a candidate goes to (CRC32 of its id; stable
    across processes and runs).

    >>> shard_of("movie-1", 4), shard_of("movie-1", 4) == shard_of("movie-1", 4)
    (0, True)
    """
    return zlib.crc32(candidate_id.encode("utf-8")) % num_shards


def encode_record(row: Mapping[str, Any], id_column: str,
                  embedding: np.ndarray) -> bytes:
    """One embedding record: serialized ``tf.train.Example`` with ``id``,
    ``embedding`` float ``[dim]`` and the row's other columns."""
    from tensorflow.core.example import example_pb2, feature_pb2  # noqa: PLC0415

    example = example_pb2.Example()
    feature = example.features.feature
    feature[ID_KEY].bytes_list.value.append(str(row[id_column]).encode("utf-8"))
    feature[EMBEDDING_KEY].CopyFrom(feature_pb2.Feature(
        float_list=feature_pb2.FloatList(value=np.asarray(embedding, np.float32))))
    for name, value in row.items():
        if name in (ID_KEY, EMBEDDING_KEY):
            continue
        if isinstance(value, str):
            feature[name].bytes_list.value.append(value.encode("utf-8"))
        else:
            feature[name].float_list.value.append(float(value))
    return example.SerializeToString()


def decode_records(
    files: Sequence[str], columns: Mapping[str, str]
) -> tuple[list[str], np.ndarray, dict[str, list]]:
    """Reads embedding records back: ``(ids, float32 [n, dim], {column: values})``.

    Args:
        files: TFRecord files written by the pipeline.
        columns: Candidate columns to read (``"string"`` or ``"float"``).
    """
    import tensorflow as tf  # noqa: PLC0415

    ids: list[str] = []
    vectors: list[np.ndarray] = []
    values: dict[str, list] = {c: [] for c in columns if c not in (ID_KEY,)}
    if not files:
        return ids, np.zeros([0, 0], np.float32), values
    first = next(iter(tf.data.TFRecordDataset(list(files)).take(1)), None)
    if first is None:
        return ids, np.zeros([0, 0], np.float32), values
    dim = len(tf.train.Example.FromString(first.numpy())
              .features.feature[EMBEDDING_KEY].float_list.value)
    spec = {ID_KEY: tf.io.FixedLenFeature([], tf.string),
            EMBEDDING_KEY: tf.io.FixedLenFeature([dim], tf.float32)}
    for name, kind in columns.items():
        if name in values:
            spec[name] = tf.io.FixedLenFeature(
                [], tf.string if kind == "string" else tf.float32)
    dataset = (tf.data.TFRecordDataset(list(files)).batch(4096)
               .map(lambda x: tf.io.parse_example(x, spec)))
    for batch in dataset.as_numpy_iterator():
        ids.extend(v.decode("utf-8") for v in batch[ID_KEY])
        vectors.append(batch[EMBEDDING_KEY])
        for name in values:
            column = batch[name]
            if column.dtype == object:
                values[name].extend(v.decode("utf-8") for v in column)
            else:
                values[name].extend(column.tolist())
    return ids, np.concatenate(vectors).astype(np.float32, copy=False), values


__all__ = ["SUFFIXES", "decode_records", "encode_record", "expand", "read_rows",
           "shard_of"]
