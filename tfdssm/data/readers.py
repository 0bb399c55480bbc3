"""Tables in, ``tf.data`` out: CSV, TSV, Parquet, pandas and TFRecord readers.

Raw strings stay strings all the way into the towers, which hash them in-graph.
Every reader checks the columns the feature specs need and says which are missing.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.data.tables import (  # noqa: F401 - TABLE_SUFFIXES, read_table re-exported
    TABLE_SUFFIXES,
    misparse_hint,
    read_table,
)
from tfdssm.errors import DataError, DataWarning
from tfdssm.features import Feature
from tfdssm.text.normalize import to_valid_unicode


def check_text_columns(frame: pd.DataFrame, names: Sequence[str],
                       what: str = "data") -> None:
    """Refuses text columns whose cells are lists, arrays or dicts (e.g. a Parquet
    list column), which would otherwise be trained on their ``repr``.

    >>> check_text_columns(pd.DataFrame({"q": [["a", "b"]]}), ["q"])
    Traceback (most recent call last):
    ...
    tfdssm.errors.DataError: data column 'q' holds lists (data row 1: ['a', 'b']), \
not text; join each list into one string first \
(e.g. `df['q'] = df['q'].str.join(' ')`) or choose a text column.
    """
    for name in dict.fromkeys(names):
        if name not in frame.columns or frame[name].dtype != object:
            continue
        nested = frame[name].map(lambda v: isinstance(v, list | tuple | dict | set
                                                      | np.ndarray)).to_numpy(bool)
        if nested.any():
            row = int(np.flatnonzero(nested)[0])
            value = frame[name].iloc[row]
            shown = repr(list(value) if isinstance(value, np.ndarray) else value)
            raise DataError(
                f"{what} column {name!r} holds lists (data row {row + 1}: "
                f"{shown[:60]}), not text; join each list into one string first "
                f"(e.g. `df[{name!r}] = df[{name!r}].str.join(' ')`) or choose a text "
                "column.")


def check_columns(frame: pd.DataFrame, names: Sequence[str],
                  what: str = "data") -> None:
    """Raises a :class:`DataError` naming missing columns and the available ones."""
    missing = [n for n in names if n not in frame.columns]
    if missing:
        hint = misparse_hint(list(frame.columns))
        raise DataError(
            f"{what} has no column(s) {missing}; available columns: "
            f"{list(frame.columns)}. "
            + (hint or "Check the column names (they are case-sensitive).")
        )


def check_ids(frame: pd.DataFrame, column: str, what: str = "data") -> None:
    """Raises a :class:`DataError` if a candidate id cell is missing or empty.

    >>> check_ids(pd.DataFrame({"id": ["a", ""]}), "id")
    Traceback (most recent call last):
    ...
    tfdssm.errors.DataError: data column 'id' (the candidate id) has 1 missing or \
empty cell(s), first in data row 2; every row needs an id. Fill or drop those rows.
    """
    check_columns(frame, [column], what)
    empty = frame[column].isna().to_numpy() | (
        frame[column].astype(str).str.strip() == "").to_numpy()
    if empty.any():
        raise DataError(
            f"{what} column {column!r} (the candidate id) has {int(empty.sum())} "
            f"missing or empty cell(s), first in data row "
            f"{int(np.flatnonzero(empty)[0]) + 1}; every row needs an id. Fill or "
            "drop those rows."
        )


def distinct_candidates(
    frame: pd.DataFrame, id_column: str, columns: Sequence[str], what: str = "data"
) -> pd.DataFrame:
    """One row per candidate id: exact duplicate rows are dropped.

    Args:
        frame: Rows holding ``id_column`` and the candidate features ``columns``.
        id_column: The candidate id column.
        columns: The columns that describe a candidate.
        what: How messages name the table.

    Returns:
        The distinct rows of ``[id_column, *columns]``, in first-seen order.

    Raises:
        DataError: a missing column, or an id that appears with different values
            (rows with an empty id are left for the caller to handle).
    """
    columns = list(dict.fromkeys([id_column, *columns]))
    check_columns(frame, columns, what)
    rows = frame[columns].astype(
        {c: str for c in columns if frame[c].dtype == object})
    distinct = rows.drop_duplicates()
    named = distinct[id_column].astype(str) != ""
    clashes = distinct[id_column].duplicated(keep=False) & named
    if clashes.any():
        cid = distinct.loc[clashes, id_column].iloc[0]
        same = distinct[distinct[id_column] == cid]
        differ = [c for c in columns[1:] if same[c].nunique(dropna=False) > 1]
        shown = "; ".join(
            ", ".join(f"{c}={row[c]!r}"[:80] for c in differ)
            for _, row in same.head(2).iterrows())
        raise DataError(
            f"{what}: candidate id {cid!r} in column {id_column!r} appears with "
            f"different values of {differ} ({shown}); an id must identify one "
            "candidate. Fix the data (a missing cell?) or pass a different "
            "--candidate-id-column."
        )
    return distinct.reset_index(drop=True)


def to_feature_arrays(
    frame: pd.DataFrame, features: Sequence[Feature], what: str = "data",
    warn_empty: bool = True,
) -> dict[str, np.ndarray]:
    """Converts the columns the features need into numpy arrays for ``tf.data``.

    Text-like columns become ``str`` (missing cells become ``""``, counted in a
    warning unless ``warn_empty`` is false; lone surrogates become U+FFFD);
    numeric columns become float32 and must not be missing.

    ``warn_empty=False`` is for a second read of rows already reported: the
    candidate corpus, whose empty cells the export reports once (it leaves
    such candidates out) and the training data reports as data.

    Raises:
        DataError: missing columns, non-numeric or missing numeric values, list
            cells in a text column.
    """
    names = list(dict.fromkeys(f.name for f in features))
    check_columns(frame, names, what)
    check_text_columns(frame, [f.name for f in features if f.dtype == tf.string], what)
    arrays: dict[str, np.ndarray] = {}
    for feature in {f.name: f for f in features}.values():
        column = frame[feature.name]
        if feature.dtype == tf.string:
            missing = int((column.isna() | column.eq("")).sum())
            if missing and warn_empty:
                warnings.warn(
                    f"{what} column {feature.name!r} has {missing} missing or "
                    "empty cell(s); they are used as empty text.",
                    DataWarning, stacklevel=2,
                )
            values = column.astype(object).fillna("").astype(str).to_numpy()
            arrays[feature.name] = np.asarray(
                [to_valid_unicode(v) for v in values], dtype=object
            )
        else:
            values = pd.to_numeric(column, errors="coerce")
            bad = values.isna() | ~np.isfinite(values.fillna(0).to_numpy(np.float64))
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(
                    f"{what} column {feature.name!r} must hold finite numbers; data "
                    f"row {row + 1} holds {column.iloc[row]!r} ({int(bad.sum())} bad "
                    "cell(s) in all). Fill or drop them first."
                )
            arrays[feature.name] = values.to_numpy(dtype=np.float32)
    return arrays


def make_dataset(
    source: str | os.PathLike | pd.DataFrame,
    features: Sequence[Feature],
    batch_size: int = 256,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = False,
    row_index: str | None = None,
    sep: str | None = None,
) -> tf.data.Dataset:
    """Builds a batched ``tf.data.Dataset`` of raw feature columns.

    Args:
        source: CSV/TSV/Parquet path or DataFrame.
        features: Specs of every column the model reads.
        batch_size: Rows per batch.
        shuffle: Reshuffle rows each epoch.
        seed: Shuffle seed.
        drop_remainder: Drop a last partial batch.
        row_index: Also yield each row's position in the table (int64) under
            this name (e.g. for :mod:`tfdssm.training.negatives`).
        sep: CSV/TSV delimiter (``None``: sniffed, see
            :func:`tfdssm.data.tables.read_table`).

    Returns:
        Dataset of ``{name: [batch]}`` dicts (strings stay ``tf.string``).

    >>> frame = pd.DataFrame({"query": ["a b"], "doc": ["c"]})
    >>> from tfdssm.features import TextFeature
    >>> ds = make_dataset(frame, [TextFeature("query"), TextFeature("doc")])
    >>> next(iter(ds))["query"].numpy().tolist()
    [b'a b']
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, received {batch_size}.")
    frame = read_table(source, sep)
    if len(frame) == 0:
        raise DataError("the data has a header but no rows.")
    arrays = to_feature_arrays(frame, features)
    if row_index is not None:
        arrays[row_index] = np.arange(len(frame), dtype=np.int64)
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        dataset = dataset.shuffle(min(len(frame), 100_000), seed=seed,
                                  reshuffle_each_iteration=True)
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(
        tf.data.AUTOTUNE
    )


def write_tfrecord(frame: pd.DataFrame, features: Sequence[Feature], path: str) -> int:
    """Writes rows as ``tf.train.Example`` records (bytes or float features).

    Returns:
        Number of records written.
    """
    arrays = to_feature_arrays(frame, features)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(len(frame)):
            feature = {}
            for name, values in arrays.items():
                value = values[i]
                if isinstance(value, str):
                    feature[name] = tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[value.encode("utf-8")])
                    )
                else:
                    feature[name] = tf.train.Feature(
                        float_list=tf.train.FloatList(value=[float(value)])
                    )
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())
    return len(frame)


def tfrecord_dataset(
    paths: str | Sequence[str],
    features: Sequence[Feature],
    batch_size: int = 256,
    shuffle: bool = True,
    seed: int = 0,
) -> tf.data.Dataset:
    """Reads ``tf.train.Example`` TFRecords with one value per feature column.

    Raises:
        DataError: a path does not exist.
    """
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    missing = [str(p) for p in paths if not pathlib.Path(p).is_file()]
    if missing:
        raise DataError(f"TFRecord file(s) {missing} do not exist.")
    spec = {
        f.name: tf.io.FixedLenFeature(
            [], f.dtype, default_value="" if f.dtype == tf.string else None
        )
        for f in features
    }
    dataset = tf.data.TFRecordDataset([str(p) for p in paths])
    if shuffle:
        dataset = dataset.shuffle(10_000, seed=seed)
    return (
        dataset.batch(batch_size)
        .map(
            lambda x: tf.io.parse_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def corpus_of(
    frame: pd.DataFrame, candidate_id: str, columns: Sequence[str], what: str = "data"
) -> pd.DataFrame:
    """Distinct candidates (first row per id) with the given columns.

    An id column of its own must have an id in every row; when the id is a text
    column (the document itself), a missing text is an empty document.

    Raises:
        DataError: a missing or empty id, or the same id with different feature
            values.
    """
    if candidate_id not in columns:
        check_ids(frame, candidate_id, what)
    return distinct_candidates(frame, candidate_id, columns, what)

