"""Table files: their delimiter, header and columns, checked without TensorFlow.

The CLI calls :func:`check_table` before TensorFlow loads, so that a wrong path,
column or delimiter fails in a fraction of a second; :func:`read_table` (also
``tfdssm.data.readers.read_table``) reads the whole table with pandas.

A CSV/TSV file's delimiter is sniffed from its first lines among
:data:`SEPARATORS` (``,`` tab ``;`` ``|``), whatever its suffix, unless given.
"""

from __future__ import annotations

import codecs
import csv
import glob
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from tfdssm.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
PARQUET_SUFFIXES = (".parquet", ".pq")
SEPARATORS = (",", "\t", ";", "|")
SEPARATOR_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
_ALIASES = {"comma": ",", "tab": "\t", "\\t": "\t", "semicolon": ";", "pipe": "|"}
_SAMPLE_BYTES = 64 * 1024


def parse_separator(text: str) -> str:
    """A separator from its character or name (``tab``, ``\\t``, ``comma``, ...).

    >>> parse_separator("tab"), parse_separator(";")
    ('\\t', ';')

    Raises:
        DataError: anything but one of :data:`SEPARATORS` or their names.
    """
    sep = _ALIASES.get(text.lower(), text)
    if sep not in SEPARATORS:
        raise DataError(
            f"unknown separator {text!r}; expected one of ',', tab (or '\\t'), ';', "
            "'|'.")
    return sep


def show_separator(sep: str) -> str:
    """How messages name a separator.

    >>> show_separator("\\t"), show_separator(",")
    ('tab', "comma (',')")
    """
    return "tab" if sep == "\t" else f"{SEPARATOR_NAMES[sep]} ({sep!r})"


def _cli_separator(sep: str) -> str:
    return "tab" if sep == "\t" else repr(sep)


def check_path(path: str | os.PathLike) -> pathlib.Path:
    """Checks that ``path`` is a readable, non-empty table file of a known suffix.

    Raises:
        DataError: missing, a directory, unknown suffix, empty, not readable.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (or is not a file).")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"cannot read {str(path)!r}: expected one of {TABLE_SUFFIXES}, got "
            f"{suffix or 'no suffix'!r}. Convert it to CSV or Parquet."
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty; it needs a header row.")
    if not os.access(path, os.R_OK):
        raise DataError(f"data file {str(path)!r} is not readable (permissions).")
    return path


def _sample(path: pathlib.Path) -> tuple[str, bool]:
    """The first whole lines of a text file (up to 64 KiB) and whether that is
    the whole file; checks that they are UTF-8."""
    with path.open("rb") as file:
        raw = file.read(_SAMPLE_BYTES + 1)
    whole = len(raw) <= _SAMPLE_BYTES
    raw = raw[:_SAMPLE_BYTES]
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        text = decoder.decode(raw, final=whole)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{str(path)!r} is not valid UTF-8 (byte {error.start}): re-save it as "
            "UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    if not whole and "\n" in text:
        text = text[: text.rindex("\n") + 1]  # whole lines only
    return text, whole


def _rows(text: str, sep: str) -> list[list[str]]:
    try:
        return [r for r in csv.reader(text.splitlines(), delimiter=sep) if r]
    except csv.Error:
        return []


def sniff_separator(text: str, default: str = ",") -> str:
    """The delimiter of a CSV/TSV sample among :data:`SEPARATORS`.

    ``csv.Sniffer`` proposes one; it is kept when every row then has as many
    fields as the header. Otherwise the separator that splits the header into
    the most fields, with every row the same width, wins; with none, ``default``.

    >>> sniff_separator("query\\tdoc\\nhow to, sort\\tsorted(x)\\n")
    '\\t'
    >>> sniff_separator("q;d\\na;b\\n")
    ';'
    >>> sniff_separator("query\\nno separator here\\n", default="\\t")
    '\\t'
    """

    def consistent(sep: str) -> int:
        rows = _rows(text, sep)
        if not rows or len(rows[0]) < 2:
            return 0
        return len(rows[0]) if all(len(r) == len(rows[0]) for r in rows) else 0

    try:
        proposed = csv.Sniffer().sniff(text, delimiters="".join(SEPARATORS)).delimiter
    except csv.Error:
        proposed = None
    if proposed in SEPARATORS and consistent(proposed):
        return proposed
    widths = {sep: consistent(sep) for sep in SEPARATORS}
    best = max(SEPARATORS, key=lambda s: (widths[s], s == default))
    return best if widths[best] else default


def misparse_hint(names: Sequence[str], sep: str | None = None,
                  path: str | os.PathLike | None = None, given: bool = False) -> str:
    """Why a one-column header may be a wrong delimiter, and the fix ("" if not).

    >>> print(misparse_hint(["query\\tdoc"], ",")[-65:])
    the file looks tab-separated; pass --sep tab (library: sep='\\t').
    """
    if len(names) != 1:
        return ""
    found = [s for s in SEPARATORS if s != sep and s in str(names[0])]
    if not found:
        return ""
    of = f" of {str(path)!r}" if path is not None else ""
    how = " as --sep says" if given else ""
    split = f", split on {show_separator(sep)}{how}," if sep else ""
    return (f"The header{of}{split} is one column {names[0]!r}, which contains a "
            f"{show_separator(found[0])}: the file looks "
            f"{SEPARATOR_NAMES[found[0]]}-separated; pass --sep "
            f"{_cli_separator(found[0])} (library: sep={found[0]!r}).")


def table_header(path: str | os.PathLike,
                 sep: str | None = None) -> tuple[list[str], str | None, bool]:
    """A table file's column names, without reading it whole.

    Args:
        path: A CSV/TSV/Parquet file.
        sep: The delimiter; ``None`` sniffs it (CSV/TSV only).

    Returns:
        ``(column names, delimiter (None for Parquet), has data rows)``.

    Raises:
        DataError: see :func:`check_path`; not UTF-8; a header naming a
            column twice; an unreadable Parquet file.
    """
    path = check_path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415 - only for Parquet

            meta = pq.read_metadata(path)
        except (OSError, ValueError) as error:  # ArrowInvalid is a ValueError
            raise DataError(f"cannot parse {str(path)!r}: {error}") from None
        return list(meta.schema.to_arrow_schema().names), None, meta.num_rows > 0
    text, _ = _sample(path)
    default = "\t" if path.suffix.lower() == ".tsv" else ","
    sep = parse_separator(sep) if sep is not None else sniff_separator(text, default)
    rows = _rows(text, sep)
    if not rows:
        raise DataError(f"data file {str(path)!r} has no header row.")
    names = rows[0]
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        columns = [i + 1 for i, n in enumerate(names) if n == repeated[0]]
        raise DataError(
            f"the header of {str(path)!r} names column {repeated[0]!r} more than once "
            f"(columns {columns}); only one could be read. Rename or drop the "
            "repeated column(s).")
    return names, sep, len(rows) > 1


def check_table(path: str | os.PathLike, columns: Sequence[str],
                sep: str | None = None, what: str | None = None) -> str | None:
    """Checks a table file before anything heavy reads it.

    Args:
        path: A CSV/TSV/Parquet file.
        columns: Columns it must have.
        sep: The delimiter (``None``: sniffed).
        what: How messages name the table (default: ``the data 'PATH'``).

    Returns:
        The delimiter to read it with (``None`` for Parquet).

    Raises:
        DataError: see :func:`table_header`; missing columns (the message
            names the available ones, and a likely wrong delimiter); a header
            but no rows.
    """
    what = what or f"the data {str(path)!r}"
    names, found, has_rows = table_header(path, sep)
    missing = [c for c in dict.fromkeys(columns) if c not in names]
    if missing:
        hint = misparse_hint(names, found, path, sep is not None)
        raise DataError(
            f"{what} has no column(s) {missing}; available columns: {names}. "
            + (hint or "Check the column names (they are case-sensitive).")
        )
    if not has_rows:
        raise DataError(f"{what} has a header but no rows.")
    return found


def read_table(source: Any, sep: str | None = None) -> Any:
    """Reads a CSV/TSV/Parquet file (or passes a DataFrame through).

    Args:
        source: A path ending in ``.csv``, ``.tsv``, ``.txt``, ``.parquet`` or
            ``.pq``, or a pandas DataFrame.
        sep: CSV/TSV delimiter: one of ``,`` ``\\t`` ``;`` ``|``; ``None``
            sniffs it from the first lines (whatever the suffix).

    Returns:
        The table (a ``pandas.DataFrame``); string columns are read as ``str``
        (no type guessing).

    Raises:
        DataError: missing, empty or unreadable file, unknown suffix, a header
            naming a column twice (pandas would rename the second ``name.1``
            and the first would be read silently), rows that do not split into
            the header's columns (the message names the delimiter used).
    """
    import pandas as pd  # noqa: PLC0415 - kept out of the CLI's fast path

    if isinstance(source, pd.DataFrame):
        return source
    path = pathlib.Path(source)
    _, sep, _ = table_header(path, sep)
    try:
        if sep is None:
            return pd.read_parquet(path)
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                           encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{str(path)!r} is not valid UTF-8 (byte {error.start}): re-save it as "
            "UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    except pd.errors.ParserError as error:
        raise DataError(
            f"cannot parse {str(path)!r} split on {show_separator(sep)}: {error}. If "
            "the file uses another delimiter, pass --sep (library: sep=...); if a "
            "text contains the delimiter, quote that cell."
        ) from None
    except (pd.errors.EmptyDataError, OSError, ValueError) as error:
        raise DataError(f"cannot parse {str(path)!r}: {error}") from None


_GLOB = set("*?[")  # a path with these is a pattern (glob), not a file


def is_glob(source: object) -> bool:
    """Whether ``source`` is a path pattern (``*``, ``?`` or ``[``).

    >>> is_glob("data/part-*.csv"), is_glob("data/pairs.csv")
    (True, False)
    """
    return isinstance(source, str | os.PathLike) and bool(_GLOB & set(str(source)))


def expand(pattern: str | os.PathLike) -> list[str]:
    """The files matching ``pattern``, sorted (every worker sees one order).

    Raises:
        DataError: nothing matches, or the files mix formats.
    """
    files = sorted(p for p in glob.glob(str(pattern)) if os.path.isfile(p))
    if not files:
        raise DataError(f"no file matches {str(pattern)!r}; check the pattern (quote "
                        "it so that the shell does not expand it).")
    suffixes = sorted({table_format(p) for p in files})
    if len(suffixes) > 1:
        raise DataError(f"{str(pattern)!r} matches files of formats {suffixes}; use "
                        "one format (e.g. 'part-*.csv').")
    return files


def table_format(path: str) -> str:
    """A table file's format by its suffix (``.pq`` is ``.parquet``).

    Raises:
        DataError: a suffix tfdssm cannot read.
    """
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"cannot read {path!r}: expected one of {TABLE_SUFFIXES}, got "
                        f"{suffix or 'no suffix'!r}.")
    return {".pq": ".parquet"}.get(suffix, suffix)
