"""Corpus files for ``tfdssm index``: globs, row readers and embedding records.

Plain Python (no Beam): the pipeline calls these inside its transforms, and
tests and notebooks can call them directly.

* :func:`expand` turns the ``--corpus`` patterns into files (local paths or any
  file system Beam knows: ``gs://``, ``s3://``, ``hdfs://``).
* :func:`read_chunks` yields the rows of a CSV/TSV, Parquet or TFRecord
  (``tf.train.Example``) file in chunks of columns (the candidate tower's
  columns and the id column); :func:`read_rows` one dict per row.
* :func:`encode_chunk` / :func:`decode_records`: the embedding files the
  pipeline writes are TFRecords of ``tf.train.Example``, one per chunk of rows:
  ``tfdssm:id`` (bytes ``[n]``), ``tfdssm:embedding`` (float32 ``[n, dim]`` as
  raw little-endian bytes), ``tfdssm:dim`` and the candidate columns.
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
DIM_KEY = "tfdssm:dim"
_CHUNK_ROWS = 512


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


def read_chunks(
    path: str, columns: Mapping[str, str], id_column: str,
    chunk_rows: int = _CHUNK_ROWS,
) -> Iterator[dict[str, list]]:
    """Rows of one corpus file in chunks: ``{column: [values of <= chunk_rows
    rows]}`` with ``id_column`` and ``columns`` (the pipeline's unit of work).

    Args:
        path: A ``.csv``/``.tsv``, ``.parquet``/``.pq`` or ``.tfrecord`` file.
        columns: The candidate tower's columns and their kinds, ``"string"`` or
            ``"float"`` (missing text is ``""``; numbers must be present).
        id_column: Column naming each candidate (may be one of ``columns``).
        chunk_rows: Most rows per chunk.

    Yields:
        Column dicts; rows without an id are skipped.

    Raises:
        DataError: a column is missing, or a number cannot be parsed.
    """
    lower = path.lower()
    wanted = list(dict.fromkeys([id_column, *columns]))
    if lower.endswith(TFRECORD_SUFFIXES):
        chunks: Iterator[dict[str, list]] = _tfrecord_chunks(path, wanted, chunk_rows)
    elif lower.endswith(PARQUET_SUFFIXES):
        chunks = _parquet_chunks(path, wanted, chunk_rows)
    else:
        chunks = _csv_chunks(path, wanted, "\t" if lower.endswith(".tsv") else ",",
                             chunk_rows)
    kinds = {**{id_column: "string"}, **columns}
    for chunk in chunks:
        converted = {n: _convert(chunk[n], kinds[n], n, path) for n in wanted}
        named = [i for i, v in enumerate(converted[id_column]) if v]
        if len(named) < len(converted[id_column]):
            converted = {n: [v[i] for i in named] for n, v in converted.items()}
        if named:
            yield converted


def read_rows(
    path: str, columns: Mapping[str, str], id_column: str
) -> Iterator[dict[str, Any]]:
    """Rows of one corpus file, one dict each (see :func:`read_chunks`)."""
    for chunk in read_chunks(path, columns, id_column):
        names = list(chunk)
        for values in zip(*(chunk[n] for n in names), strict=True):
            yield dict(zip(names, values, strict=True))


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


def _csv_chunks(path: str, wanted: Sequence[str], sep: str,
                chunk_rows: int) -> Iterator[dict]:
    import pandas as pd  # noqa: PLC0415

    with _open(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8")
        reader = pd.read_csv(text, sep=sep, dtype=str, keep_default_na=False,
                             chunksize=chunk_rows)
        for frame in reader:
            _missing(path, wanted, list(frame.columns))
            yield {c: frame[c].tolist() for c in wanted}


def _parquet_chunks(path: str, wanted: Sequence[str],
                    chunk_rows: int) -> Iterator[dict]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    with _open(path) as raw:
        handle = pq.ParquetFile(raw)
        _missing(path, wanted, handle.schema_arrow.names)
        for batch in handle.iter_batches(batch_size=chunk_rows, columns=list(wanted)):
            yield {c: batch.column(c).to_pylist() for c in wanted}


def _tfrecord_chunks(path: str, wanted: Sequence[str],
                     chunk_rows: int) -> Iterator[dict]:
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
        if len(chunk[wanted[0]]) >= chunk_rows:
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


def encode_chunk(chunk: Mapping[str, Sequence[Any]], id_column: str,
                 embeddings: np.ndarray, rows: Sequence[int] | None = None) -> bytes:
    """One embedding record for rows of a chunk: a serialized ``tf.train.Example``
    with ``tfdssm:id`` (bytes ``[n]``), ``tfdssm:embedding`` (one bytes value:
    float32 little-endian ``[n, dim]``, row-major), ``tfdssm:dim`` (int64) and
    the chunk's other columns (bytes or float ``[n]``).

    Args:
        chunk: ``{column: values}``.
        id_column: The id column.
        embeddings: float32 ``[len(chunk rows), dim]``.
        rows: Which rows (default: all).
    """
    from tensorflow.core.example import example_pb2  # noqa: PLC0415

    rows = range(len(chunk[id_column])) if rows is None else list(rows)
    example = example_pb2.Example()
    feature = example.features.feature
    feature[ID_KEY].bytes_list.value.extend(
        str(chunk[id_column][i]).encode("utf-8") for i in rows)
    matrix = np.ascontiguousarray(np.asarray(embeddings)[list(rows)], dtype="<f4")
    feature[EMBEDDING_KEY].bytes_list.value.append(matrix.tobytes())
    feature[DIM_KEY].int64_list.value.append(int(matrix.shape[1]))
    for name, values in chunk.items():
        if name in (ID_KEY, EMBEDDING_KEY, DIM_KEY) or name == id_column:
            continue
        picked = [values[i] for i in rows]
        if picked and isinstance(picked[0], str):
            feature[name].bytes_list.value.extend(v.encode("utf-8") for v in picked)
        else:
            feature[name].float_list.value.extend(float(v) for v in picked)
    return example.SerializeToString()


def decode_records(
    files: Sequence[str], columns: Mapping[str, str], id_column: str | None = None
) -> tuple[list[str], np.ndarray, dict[str, list]]:
    """Reads embedding records back: ``(ids, float32 [n, dim], {column: values})``.

    Args:
        files: TFRecord files written by the pipeline.
        columns: Candidate columns to read (``"string"`` or ``"float"``).
        id_column: A column that holds the ids themselves (filled from them).
    """
    import tensorflow as tf  # noqa: PLC0415
    from tensorflow.core.example import example_pb2  # noqa: PLC0415

    ids: list[str] = []
    vectors: list[np.ndarray] = []
    values: dict[str, list] = {c: [] for c in columns}
    if not files:
        return ids, np.zeros([0, 0], np.float32), values
    for record in tf.data.TFRecordDataset(list(files)).as_numpy_iterator():
        feature = example_pb2.Example.FromString(record).features.feature
        chunk_ids = [v.decode("utf-8") for v in feature[ID_KEY].bytes_list.value]
        dim = int(feature[DIM_KEY].int64_list.value[0])
        raw = feature[EMBEDDING_KEY].bytes_list.value[0]
        vectors.append(np.frombuffer(raw, dtype="<f4").reshape(len(chunk_ids), dim))
        ids.extend(chunk_ids)
        for name, kind in columns.items():
            if name == id_column:
                values[name].extend(chunk_ids)
            elif kind == "string":
                values[name].extend(v.decode("utf-8")
                                    for v in feature[name].bytes_list.value)
            else:
                values[name].extend(feature[name].float_list.value)
    if not ids:
        return ids, np.zeros([0, 0], np.float32), values
    return ids, np.concatenate(vectors).astype(np.float32), values


__all__ = ["SUFFIXES", "decode_records", "encode_chunk", "expand", "read_chunks",
           "read_rows", "shard_of"]
