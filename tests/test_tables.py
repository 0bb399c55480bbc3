"""Table files without TensorFlow: the delimiter sniffed (or given), the header
and columns checked, a misparse explained (tfdssm.data.tables)."""

from __future__ import annotations

import pytest

from tfdssm.data import tables
from tfdssm.errors import DataError

ROWS = [("how to sort, fast", "sorted(x); list.sort()"), ("open a file", "open(p)")]


def _write(path, sep, header=("query", "doc"), rows=ROWS):
    lines = [sep.join(header)]
    for row in rows:
        lines.append(sep.join(f'"{c}"' if sep in c else c for c in row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("sep", [",", "\t", ";", "|"])
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt"])
def test_the_delimiter_is_sniffed_whatever_the_suffix(tmp_path, sep, suffix):
    path = _write(tmp_path / f"pairs{suffix}", sep)
    names, found, has_rows = tables.table_header(path)
    assert (names, found, has_rows) == (["query", "doc"], sep, True)
    frame = tables.read_table(path)
    assert list(frame.columns) == ["query", "doc"]
    assert frame["query"].tolist() == [r[0] for r in ROWS]
    assert frame["doc"].tolist() == [r[1] for r in ROWS]


def test_a_given_separator_wins_and_a_misparse_says_how_to_fix_it(tmp_path):
    path = _write(tmp_path / "pairs.csv", "\t")
    with pytest.raises(DataError) as error:
        tables.check_table(path, ["query", "doc"], sep=",")
    message = str(error.value)
    assert "available columns: ['query\\tdoc']" in message
    assert "one column 'query\\tdoc', which contains a tab" in message
    assert "--sep tab" in message and "pairs.csv" in message
    assert tables.check_table(path, ["query", "doc"], sep="tab") == "\t"


def test_rows_that_do_not_split_name_the_delimiter(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("query,doc\na,b\nc,d,e,f\n")
    with pytest.raises(DataError) as error:
        tables.read_table(path, sep=",")
    assert "split on comma (',')" in str(error.value)
    assert "--sep" in str(error.value)


def test_a_misspelt_column_lists_the_available_ones(tmp_path):
    path = _write(tmp_path / "pairs.csv", ",")
    with pytest.raises(DataError, match=r"no column\(s\) \['qury'\]; available "
                       r"columns: \['query', 'doc'\]\. Check the column names"):
        tables.check_table(path, ["qury", "doc"])


def test_header_only_and_unknown_separators(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("query,doc\n")
    with pytest.raises(DataError, match="header but no rows"):
        tables.check_table(path, ["query"])
    with pytest.raises(DataError, match="unknown separator ':'"):
        tables.parse_separator(":")


def test_the_library_readers_accept_sep(tmp_path):
    from tfdssm.data import readers
    from tfdssm.features import TextFeature

    path = _write(tmp_path / "pairs.csv", ";")
    dataset = readers.make_dataset(path, [TextFeature("query")], shuffle=False,
                                   sep=";")
    assert next(iter(dataset))["query"].numpy().tolist()[0] == b"how to sort, fast"
    with pytest.raises(DataError, match="semicolon-separated"):
        readers.make_dataset(path, [TextFeature("query")], sep="|")
