"""Tests for tfdssm.data: table readers, column checks, tf.data and TFRecords."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfdssm.data import readers as data
from tfdssm.errors import DataError, DataWarning
from tfdssm.features import CategoricalFeature, NumericFeature, TextFeature

ROWS = [
    {"query": "Café 北京", "doc": "naïve résumé", "age": "31"},
    {"query": "hello world", "doc": "ünïcödé ß", "age": "40.5"},
    {"query": "  spaced  out ", "doc": "emoji 🙂 text", "age": "-2"},
    {"query": "a,b \"quoted\"", "doc": "tab\tinside", "age": "0"},
    {"query": "x", "doc": "y", "age": "7"},
]
FEATURES = [TextFeature("query"), TextFeature("doc"), NumericFeature("age")]


def _frame() -> pd.DataFrame:
    return pd.DataFrame(ROWS)


def _rows_of(dataset: tf.data.Dataset) -> list[tuple]:
    """All rows of a batched dataset as sorted (query, doc, age) tuples."""
    rows = []
    for batch in dataset:
        for q, d, a in zip(batch["query"].numpy(), batch["doc"].numpy(),
                           batch["age"].numpy(), strict=True):
            rows.append((q.decode("utf-8"), d.decode("utf-8"), float(a)))
    return sorted(rows)


EXPECTED_ROWS = sorted((r["query"], r["doc"], float(r["age"])) for r in ROWS)


# --------------------------------------------------------------------------- #
# read_table
# --------------------------------------------------------------------------- #


def test_read_table_csv_keeps_strings_verbatim(tmp_path):
    path = tmp_path / "pairs.csv"
    _frame().to_csv(path, index=False)
    frame = data.read_table(path)
    assert list(frame.columns) == ["query", "doc", "age"]
    assert frame.to_dict("records") == ROWS  # numbers stay text: no type guessing


def test_read_table_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("query\tdoc\nCafé 北京\tnaïve, with comma\nNA\tnull\n",
                    encoding="utf-8")
    frame = data.read_table(path)
    assert frame.to_dict("records") == [
        {"query": "Café 北京", "doc": "naïve, with comma"},
        {"query": "NA", "doc": "null"},  # literal NA/null stay text, not NaN
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".pq"])
def test_read_table_parquet(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    frame = _frame().assign(age=lambda f: f["age"].astype(float))
    frame.to_parquet(path, index=False)
    read = data.read_table(path)
    pd.testing.assert_frame_equal(read, frame)


def test_read_table_passes_dataframe_through():
    frame = _frame()
    assert data.read_table(frame) is frame


def test_read_table_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=r"nope\.csv.*does not exist"):
        data.read_table(path)


def test_read_table_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_table(tmp_path)


def test_read_table_empty_file_names_it(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.csv.*empty"):
        data.read_table(path)


def test_read_table_unknown_suffix_names_file_and_suffix(tmp_path):
    path = tmp_path / "pairs.xlsx"
    path.write_text("query,doc\na,b\n")
    with pytest.raises(DataError, match=r"pairs\.xlsx.*\.xlsx"):
        data.read_table(path)


def test_read_table_non_utf8_csv_names_file(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("query,doc\ncaf\xe9,na\xefve\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv.*not valid UTF-8"):
        data.read_table(path)


def test_read_table_malformed_csv_names_file(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("query,doc\na,b\nc,d,e,f\n")
    with pytest.raises(DataError, match=r"ragged\.csv"):
        data.read_table(path)


def test_read_table_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet"):
        data.read_table(path)


# --------------------------------------------------------------------------- #
# Column checks and conversion
# --------------------------------------------------------------------------- #


def test_check_columns_lists_missing_and_available():
    frame = pd.DataFrame({"query": ["a"], "doc": ["b"]})
    with pytest.raises(DataError, match=r"\['Query'\].*available columns: "
                       r"\['query', 'doc'\]"):
        data.check_columns(frame, ["Query", "doc"])


def test_make_dataset_missing_column_lists_available(tmp_path):
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"query": ["a"], "document": ["b"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"\['doc'\].*\['query', 'document'\]"):
        data.make_dataset(path, [TextFeature("query"), TextFeature("doc")])


def _warned(record: list) -> str:
    """The messages of the tfdssm warnings in ``record``, one a line."""
    return "\n".join(str(w.message) for w in record
                     if issubclass(w.category, DataWarning))


def test_nan_text_cells_become_empty_with_warning():
    frame = pd.DataFrame({"query": ["a", None, np.nan, "d"],
                          "doc": ["w", "x", "y", None]})
    with pytest.warns(DataWarning) as record:
        arrays = data.to_feature_arrays(frame,
                                        [TextFeature("query"), TextFeature("doc")])
    assert arrays["query"].tolist() == ["a", "", "", "d"]
    assert arrays["doc"].tolist() == ["w", "x", "y", ""]
    err = _warned(record)
    assert "'query' has 2 missing" in err and "'doc' has 1 missing" in err


def test_nan_text_cells_keep_every_row_in_dataset():
    frame = pd.DataFrame({"query": ["a", None, "c"], "doc": [np.nan, "y", "z"]})
    with pytest.warns(DataWarning) as record:
        dataset = data.make_dataset(frame, [TextFeature("query"), TextFeature("doc")],
                                    batch_size=2, shuffle=False)
    queries = [q for b in dataset for q in b["query"].numpy().tolist()]
    docs = [d for b in dataset for d in b["doc"].numpy().tolist()]
    assert queries == [b"a", b"", b"c"]
    assert docs == [b"", b"y", b"z"]
    err = _warned(record)
    assert "'query' has 1 missing" in err and "'doc' has 1 missing" in err


def test_missing_cell_in_categorical_dtype_column():
    frame = pd.DataFrame({"gender": pd.Series(["F", None, "M"], dtype="category")})
    with pytest.warns(DataWarning, match="'gender' has 1 missing"):
        arrays = data.to_feature_arrays(frame,
                                        [CategoricalFeature("gender", ("F", "M"))])
    assert arrays["gender"].tolist() == ["F", "", "M"]


def test_empty_csv_text_cells_become_empty_strings(tmp_path):
    path = tmp_path / "holes.csv"
    path.write_text("query,doc\n,b\nc,\ne,f\n")
    arrays = data.to_feature_arrays(data.read_table(path),
                                    [TextFeature("query"), TextFeature("doc")])
    assert arrays["query"].tolist() == ["", "c", "e"]
    assert arrays["doc"].tolist() == ["b", "", "f"]


def test_empty_csv_text_cells_warn(tmp_path):
    path = tmp_path / "holes.csv"
    path.write_text("query,doc\n,b\nc,d\n")
    with pytest.warns(DataWarning, match="'query' has 1 missing"):
        data.to_feature_arrays(data.read_table(path), [TextFeature("query")])


def test_non_numeric_cell_names_column_and_row():
    frame = pd.DataFrame({"query": ["a", "b", "c"], "age": ["1", "2", "old"]})
    with pytest.raises(DataError, match=r"'age' must hold finite numbers; data row 3 "
                       r"holds 'old'"):
        data.to_feature_arrays(frame, [TextFeature("query"), NumericFeature("age")])


def test_missing_numeric_cell_is_an_error(tmp_path):
    path = tmp_path / "ages.csv"
    path.write_text("query,age\na,1\nb,\n")
    with pytest.raises(DataError, match=r"'age'.*data row 2"):
        data.make_dataset(path, [TextFeature("query"), NumericFeature("age")])


@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_infinite_numeric_cell_is_an_error(value):
    frame = pd.DataFrame({"age": ["1", value]})
    with pytest.raises(DataError, match=r"'age' must hold finite numbers; data row 2"):
        data.to_feature_arrays(frame, [NumericFeature("age")])


def test_numeric_columns_become_float32():
    frame = pd.DataFrame({"age": [1, 2, 3], "user": [10, 20, 30]})
    arrays = data.to_feature_arrays(
        frame, [NumericFeature("age"), CategoricalFeature("user", ("10", "20"))]
    )
    assert arrays["age"].dtype == np.float32
    assert arrays["age"].tolist() == [1.0, 2.0, 3.0]
    assert arrays["user"].tolist() == ["10", "20", "30"]  # categorical ids as text


# --------------------------------------------------------------------------- #
# make_dataset
# --------------------------------------------------------------------------- #


def test_make_dataset_dtypes_and_raw_strings(tmp_path):
    path = tmp_path / "rows.csv"
    _frame().to_csv(path, index=False)
    dataset = data.make_dataset(path, FEATURES, batch_size=8, shuffle=False)
    assert dataset.element_spec["query"].dtype == tf.string
    assert dataset.element_spec["doc"].dtype == tf.string
    assert dataset.element_spec["age"].dtype == tf.float32
    batch = next(iter(dataset))
    assert batch["query"].numpy()[0].decode("utf-8") == "Café 北京"  # not normalised
    assert batch["query"].numpy().tolist()[2] == b"  spaced  out "
    assert batch["age"].numpy().tolist() == [31.0, 40.5, -2.0, 0.0, 7.0]


@pytest.mark.parametrize(
    "batch_size, drop_remainder, sizes",
    [(2, False, [2, 2, 1]), (2, True, [2, 2]), (5, False, [5]), (64, False, [5])],
)
def test_make_dataset_batch_sizes(batch_size, drop_remainder, sizes):
    dataset = data.make_dataset(_frame(), FEATURES, batch_size=batch_size,
                                drop_remainder=drop_remainder)
    assert [int(b["query"].shape[0]) for b in dataset] == sizes


def test_make_dataset_shuffle_keeps_every_row():
    dataset = data.make_dataset(_frame(), FEATURES, batch_size=2, shuffle=True, seed=3)
    assert _rows_of(dataset) == EXPECTED_ROWS


def test_make_dataset_csv_tsv_parquet_frame_agree(tmp_path):
    frame = _frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    for source in (frame, *(tmp_path / f"t.{s}" for s in ("csv", "tsv", "parquet"))):
        dataset = data.make_dataset(source, FEATURES, batch_size=3)
        assert _rows_of(dataset) == EXPECTED_ROWS, source


@pytest.mark.parametrize("batch_size", [0, -1])
def test_make_dataset_rejects_non_positive_batch_size(batch_size):
    with pytest.raises(DataError, match=f"must be >= 1, received {batch_size}"):
        data.make_dataset(_frame(), FEATURES, batch_size=batch_size)


def test_make_dataset_header_only(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("query,doc,age\n")
    with pytest.raises(DataError, match="no rows"):
        data.make_dataset(path, FEATURES)


# --------------------------------------------------------------------------- #
# TFRecords
# --------------------------------------------------------------------------- #


def test_tfrecord_round_trip_equals_csv_dataset(tmp_path):
    csv = tmp_path / "rows.csv"
    _frame().to_csv(csv, index=False)
    record = tmp_path / "rows.tfrecord"
    written = data.write_tfrecord(data.read_table(csv), FEATURES, str(record))
    assert written == len(ROWS)
    from_records = data.tfrecord_dataset(str(record), FEATURES, batch_size=2, seed=1)
    assert from_records.element_spec["age"].dtype == tf.float32
    assert from_records.element_spec["query"].dtype == tf.string
    from_csv = data.make_dataset(csv, FEATURES, batch_size=3)
    assert _rows_of(from_records) == _rows_of(from_csv) == EXPECTED_ROWS


def test_tfrecord_dataset_reads_several_files_and_paths(tmp_path):
    frame = _frame()
    first, second = tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"
    data.write_tfrecord(frame.iloc[:2], FEATURES, str(first))
    data.write_tfrecord(frame.iloc[2:].reset_index(drop=True), FEATURES, str(second))
    dataset = data.tfrecord_dataset([first, second], FEATURES, batch_size=4,
                                    shuffle=False)
    assert [int(b["query"].shape[0]) for b in dataset] == [4, 1]
    assert _rows_of(dataset) == EXPECTED_ROWS


def test_tfrecord_dataset_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.tfrecord.*do not exist"):
        data.tfrecord_dataset(str(tmp_path / "missing.tfrecord"), FEATURES)
