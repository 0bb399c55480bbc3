"""Restrict tokens: the namespaced labels candidates carry for filtered retrieval.

At export, chosen corpus columns (``restrict_columns=("genres", "language")``)
become *namespaces*; each candidate carries the tokens of its value in each of
them. A list (or array) value gives one token per element; a string value is
split on ``"|"`` (MovieLens writes ``Action|Comedy``); numbers become their
text; empty and missing values give no token. Tokens are written
``namespace=token`` on the wire (``"genres=Comedy"``).

A request allows and denies tokens. A candidate *passes* when, for every
namespace the request allows tokens in, it has at least one of them (OR within
a namespace, AND across namespaces), and it has none of the denied tokens.

No TensorFlow here: the exporter, :class:`tfdssm.retrieve.LocalRetriever` and
the client share these definitions; the retrieval SavedModels evaluate the same
rule in-graph (:mod:`tfdssm.export.restricts`).

The export stores the tokens beside the candidate embeddings in
``candidate_tokens.jsonl``: line ``i`` is a JSON object ``{namespace: [tokens]}``
for row ``i`` of ``candidates.npy`` / ``candidate_ids.txt``.

>>> rows = candidate_tokens({"genres": ["Action|Comedy", "Drama"],
...                          "language": [["en", "fr"], "en"]}, ["genres", "language"])
>>> rows[0]
{'genres': ['Action', 'Comedy'], 'language': ['en', 'fr']}
>>> passes(rows, allow=["genres=Comedy", "genres=Drama"], deny=["language=fr"])
[False, True]
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tfdssm.errors import DataError, ExportError

TOKENS_FILE = "candidate_tokens.jsonl"
SEPARATOR = "|"  # splits string values into several tokens
Tokens = dict[str, list[str]]


def check_columns(columns: Sequence[str], available: Iterable[str]) -> list[str]:
    """The restrict columns, checked: names, no ``=``, no repeats, present.

    Raises:
        ExportError: a column is missing from the corpus, repeated, empty or
            contains ``=`` (which separates namespace and token).
    """
    columns = [str(c) for c in columns]
    available = list(available)
    bad = [c for c in columns if not c or "=" in c or c != c.strip()]
    if bad:
        raise ExportError(f"restrict columns must be non-empty names without '=' or "
                          f"surrounding spaces; received {bad}.")
    if len(set(columns)) != len(columns):
        raise ExportError(f"restrict columns repeat a name: {columns}.")
    missing = [c for c in columns if c not in available]
    if missing:
        raise ExportError(f"restrict column(s) {missing} are not in the corpus; its "
                          f"columns are {available}. Pass corpus columns "
                          "(e.g. --restrict-columns genres).")
    return columns


def value_tokens(value: Any, separator: str = SEPARATOR) -> list[str]:
    """The tokens of one cell, in first-seen order without repeats.

    >>> value_tokens("Action|Comedy|Action"), value_tokens(["en", " fr "])
    (['Action', 'Comedy'], ['en', 'fr'])
    >>> value_tokens(None), value_tokens(float("nan")), value_tokens(1995)
    ([], [], ['1995'])
    """
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        parts: Iterable[Any] = value.split(separator)
    elif hasattr(value, "__iter__"):
        parts = [v for item in value for v in value_tokens(item, separator)]
    else:
        parts = [value]
    out: list[str] = []
    for part in parts:
        text = str(part).strip()
        if text and text not in out:
            out.append(text)
    return out


def candidate_tokens(
    corpus: Mapping[str, Sequence[Any]] | Any,
    columns: Sequence[str],
    separator: str = SEPARATOR,
) -> list[Tokens]:
    """Per candidate, ``{namespace: [tokens]}`` from the restrict columns.

    Args:
        corpus: A pandas DataFrame, or ``{column: values}``, one row per candidate.
        columns: The restrict columns (namespaces).
        separator: Splits string values into several tokens.

    Returns:
        One dict per row with every namespace as a key (possibly an empty list).
    """
    available = list(corpus.columns) if hasattr(corpus, "columns") else list(corpus)
    columns = check_columns(columns, available)
    values = {c: list(corpus[c]) for c in columns}
    rows = len(values[columns[0]]) if columns else len(corpus)
    return [{c: value_tokens(values[c][i], separator) for c in columns}
            for i in range(rows)]


def parse_token(item: str, namespaces: Sequence[str] | None = None) -> tuple[str, str]:
    """Splits ``namespace=token`` (at the first ``=``).

    >>> parse_token("genres=Sci-Fi")
    ('genres', 'Sci-Fi')

    Raises:
        DataError: no ``=``, an empty namespace or token, or (given
            ``namespaces``) an unknown namespace.
    """
    namespace, sep, token = str(item).partition("=")
    if not sep or not namespace or not token:
        raise DataError(f"expected a filter token NAMESPACE=TOKEN (e.g. "
                        f"genres=Comedy), received {item!r}.")
    if namespaces is not None and namespace not in namespaces:
        raise DataError(f"unknown filter namespace {namespace!r} in {item!r}; this "
                        f"export's namespaces are {list(namespaces)} (chosen at "
                        "export with --restrict-columns).")
    return namespace, token


def passes(
    tokens: Sequence[Mapping[str, Sequence[str]]],
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    namespaces: Sequence[str] | None = None,
) -> list[bool]:
    """Which candidates pass one request's filter (the rule in the module doc).

    Args:
        tokens: Per candidate, ``{namespace: [tokens]}``.
        allow: ``namespace=token`` items (``""`` ignored).
        deny: ``namespace=token`` items (``""`` ignored).
        namespaces: If given, unknown namespaces are a :class:`DataError`.

    Returns:
        One bool per candidate.
    """
    wanted: dict[str, set[str]] = {}
    for item in allow:
        if item:
            namespace, token = parse_token(item, namespaces)
            wanted.setdefault(namespace, set()).add(token)
    denied: dict[str, set[str]] = {}
    for item in deny:
        if item:
            namespace, token = parse_token(item, namespaces)
            denied.setdefault(namespace, set()).add(token)
    out = []
    for row in tokens:
        ok = all(wanted[n] & set(row.get(n, ())) for n in wanted)
        ok = ok and not any(denied[n] & set(row.get(n, ())) for n in denied)
        out.append(bool(ok))
    return out


def postings(
    tokens: Sequence[Mapping[str, Sequence[str]]], namespaces: Sequence[str]
) -> dict[str, list[int]]:
    """``{"namespace=token": [candidate rows]}`` (the inverted index).

    >>> postings([{"g": ["a", "b"]}, {"g": ["b"]}], ["g"])
    {'g=a': [0], 'g=b': [0, 1]}
    """
    out: dict[str, list[int]] = {}
    for row, labels in enumerate(tokens):
        for namespace in namespaces:
            for token in labels.get(namespace, ()):
                out.setdefault(f"{namespace}={token}", []).append(row)
    return out


def passing_mask(
    index: Mapping[str, Sequence[int]],
    namespaces: Sequence[str],
    num_candidates: int,
    allow: Sequence[Sequence[str]],
    deny: Sequence[Sequence[str]],
) -> Any:
    """bool numpy ``[rows, num_candidates]``: the filter of each request row,
    from the inverted index (:func:`postings`).

    Raises:
        DataError: a malformed token or unknown namespace.
    """
    import numpy as np  # noqa: PLC0415

    if len(allow) != len(deny):
        raise DataError(f"allow has {len(allow)} rows but deny has {len(deny)}; "
                        "give one list per query row.")
    out = np.ones([len(allow), num_candidates], bool)
    for row, (wanted, unwanted) in enumerate(zip(allow, deny, strict=True)):
        by_namespace: dict[str, Any] = {}
        for item in wanted:
            if item:
                namespace, _ = parse_token(item, namespaces)
                hits = by_namespace.setdefault(namespace,
                                               np.zeros(num_candidates, bool))
                hits[list(index.get(item, ()))] = True
        for hits in by_namespace.values():
            out[row] &= hits
        for item in unwanted:
            if item:
                parse_token(item, namespaces)
                out[row, list(index.get(item, ()))] = False
    return out


def write_tokens(directory: str | os.PathLike, tokens: Sequence[Tokens],
                 columns: Sequence[str]) -> dict[str, Any]:
    """Writes ``candidate_tokens.jsonl`` (atomically); returns its ``export.json``
    entry (``file``, ``namespaces`` and the number of distinct tokens in each)."""
    directory = pathlib.Path(directory)
    tmp = directory / f".{TOKENS_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in tokens:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
    os.replace(tmp, directory / TOKENS_FILE)
    distinct = {c: len({t for row in tokens for t in row.get(c, ())}) for c in columns}
    return {"file": TOKENS_FILE, "namespaces": list(columns),
            "distinct_tokens": distinct, "separator": SEPARATOR,
            "format": "jsonl, line i = {namespace: [tokens]} of candidate row i"}


def read_tokens(directory: str | os.PathLike) -> list[Tokens]:
    """Reads ``candidate_tokens.jsonl`` back (one dict per candidate row).

    Raises:
        ExportError: the file is missing (an export made without restrict columns).
    """
    path = pathlib.Path(directory) / TOKENS_FILE
    if not path.is_file():
        raise ExportError(f"{str(path)!r} not found: this export has no restrict "
                          "tokens. Re-export with restrict columns "
                          "(tfdssm train --restrict-columns genres,...).")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


__all__ = [
    "SEPARATOR",
    "TOKENS_FILE",
    "candidate_tokens",
    "check_columns",
    "parse_token",
    "passes",
    "passing_mask",
    "postings",
    "read_tokens",
    "value_tokens",
    "write_tokens",
]
