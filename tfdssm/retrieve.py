"""Top-k retrieval from an export directory, in process (exact, brute force).

Loads ``towers/<newest>`` and ``corpus.parquet``, embeds the corpus once with the
``candidate`` signature, and scores queries from the ``query`` signature. A
hybrid export (dense + BM25) answers through its ``retrieval_brute_force``
SavedModel instead, so that ``tfdssm query`` returns what the server serves.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from tfdssm.data import readers as data
from tfdssm.errors import ConfigError, DataError, ExportError
from tfdssm.export import tokens
from tfdssm.export.loading import (
    ids_as_text,
    load_towers,
    read_committed,
    read_corpus,
    tower_features,
)
from tfdssm.model import multihead
from tfdssm.model.runner import embed


class LocalRetriever:
    """Exact top-k over an export's corpus.

    Args:
        export_dir: A directory written by ``tfdssm train``.

    Example (after ``make demo``)::

        retriever = LocalRetriever("saved_models/movielens")
        ids, scores = retriever.top_k({"user_id": ["42"], "age": [30], ...}, k=10)
    """

    def __init__(self, export_dir: str | os.PathLike) -> None:
        self.info = read_committed(export_dir)  # what servers serve, or an error
        self.export_dir = pathlib.Path(export_dir)
        self._served: Any = None  # a hybrid export's brute-force model, loaded once
        self._tokens: Any = None  # (postings, namespaces), read on first filter
        self.corpus = read_corpus(export_dir)
        self.towers = load_towers(export_dir, info=self.info)
        self.query_features = tower_features(self.info, "query")
        self.candidate_features = tower_features(self.info, "candidate")
        self.candidate_id = self.info["candidate_id"]
        self.ids = self.corpus[self.candidate_id].astype(str).to_numpy()
        self._position = {cid: i for i, cid in enumerate(self.ids)}
        # Said once, when the corpus was exported; not again on every query.
        arrays = data.to_feature_arrays(self.corpus, self.candidate_features,
                                        "the corpus", warn_empty=False)
        self.embeddings = embed(self.towers.signatures["candidate"], arrays)

    @property
    def query_names(self) -> list[str]:
        return [f.name for f in self.query_features]

    def embed_queries(self, features: Mapping[str, Sequence[Any]]) -> np.ndarray:
        """Embeds raw query features (column -> list of values) with the SavedModel.

        Raises:
            DataError: missing columns, columns of different lengths, no rows.
        """
        sizes = {name: len(values) for name, values in features.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"give every query feature the same number of values "
                            f"(one per query row); received {sizes}.")
        if not any(sizes.values()):
            raise DataError("empty batch: pass at least one query row.")
        frame = pd.DataFrame({k: list(v) for k, v in features.items()})
        arrays = data.to_feature_arrays(frame, self.query_features, "the query")
        return embed(self.towers.signatures["query"], arrays)

    def top_k(
        self,
        features: Mapping[str, Sequence[Any]],
        k: int = 10,
        exclude: Sequence[Sequence[str]] | None = None,
        allow: Sequence[Sequence[str]] | None = None,
        deny: Sequence[Sequence[str]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns ids ``[batch, k]`` (str) and scores ``[batch, k]`` (float32).

        Multi-head exports (``query`` embedding ``[batch, heads, dim]``) return
        the union of the heads' top-k re-ranked by the best head's score
        (:func:`tfdssm.model.multihead.union_top_k`).

        Args:
            features: Query column -> one value per row.
            k: Results per row.
            exclude: Per row, ids to leave out.
            allow: Per row, ``namespace=token`` items to allow (filtered
                retrieval, :mod:`tfdssm.export.tokens`: OR within a namespace,
                AND across namespaces); needs an export with restrict columns.
            deny: Per row, ``namespace=token`` items to deny.

        Returns:
            Rows with fewer than ``k`` candidates left (filters, exclusions)
            end with id ``""`` and score ``-inf``, as the served models.

        Raises:
            ConfigError: ``k`` out of range.
            DataError: missing query features, a malformed filter token or an
                unknown namespace.
            ExportError: a filter on an export without restrict tokens.
        """
        if not 1 <= k <= len(self.ids):
            raise ConfigError(
                f"k must be between 1 and the corpus size {len(self.ids)}, "
                f"received {k}."
            )
        filtered = bool(allow is not None and any(allow)) or bool(
            deny is not None and any(deny))
        if self.info.get("hybrid"):
            return self._served_top_k(features, k, exclude, allow, deny)
        queries = self.embed_queries(features)
        rows = len(queries)
        if exclude is not None and len(exclude) != rows:
            raise DataError(f"exclude has {len(exclude)} rows for {rows} "
                            "query rows; give one list of ids per query row.")
        drop = None if exclude is None else [
            [self._position[i] for i in ids if i in self._position] for ids in exclude]
        if filtered:
            passing = self.passing(_rows(allow, rows, "allow"),
                                   _rows(deny, rows, "deny"))
            drop = [sorted(set(drop[row] if drop else ()) |
                           set(np.flatnonzero(~passing[row]).tolist()))
                    for row in range(rows)]
        if queries.ndim == 3:
            top, scores = multihead.union_top_k(queries, self.embeddings, k, drop)
            return np.where(top >= 0, self.ids[np.maximum(top, 0)], ""), scores
        scores = queries @ self.embeddings.T
        if drop is not None:
            for row, columns in enumerate(drop):
                scores[row, columns] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, top, axis=1)
        return np.where(np.isneginf(scores), "", self.ids[top]), scores

    def passing(
        self, allow: Sequence[Sequence[str]], deny: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """bool ``[rows, num_candidates]``: which candidates pass each row's filter.

        Raises:
            ExportError: the export has no restrict tokens.
            DataError: a malformed token or an unknown namespace.
        """
        if self._tokens is None:
            labels = tokens.read_tokens(self.export_dir)
            if len(labels) != len(self.ids):
                raise ExportError(
                    f"{tokens.TOKENS_FILE} has {len(labels)} rows but the corpus "
                    f"has {len(self.ids)} candidates; re-run the export.")
            namespaces = self.info.get("restricts", {}).get("namespaces", [])
            self._tokens = (tokens.postings(labels, namespaces), namespaces)
        index, namespaces = self._tokens
        return tokens.passing_mask(index, namespaces, len(self.ids), allow, deny)

    def _served_top_k(
        self,
        features: Mapping[str, Sequence[Any]],
        k: int,
        exclude: Sequence[Sequence[str]] | None,
        allow: Sequence[Sequence[str]] | None = None,
        deny: Sequence[Sequence[str]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A hybrid export's answer: its ``retrieval_brute_force`` model's, which
        fuses the towers' score with BM25 in the graph (numpy cannot)."""
        import tensorflow as tf  # noqa: PLC0415

        max_k = int(self.info["retrieval_brute_force"]["max_k"])
        if k > max_k:
            raise ConfigError(f"k must be at most {max_k}, the max_k this hybrid "
                              f"export was made with (--max-k); received {k}.")
        if self._served is None:
            path = self.export_dir / self.info["retrieval_brute_force"]["path"]
            self._served = tf.saved_model.load(str(path))
        sizes = {name: len(values) for name, values in features.items()}
        if len(set(sizes.values())) > 1 or not any(sizes.values()):
            raise DataError("give every query feature the same, non-zero number of "
                            f"values (one per query row); received {sizes}.")
        frame = pd.DataFrame({n: list(v) for n, v in features.items()})
        arrays = data.to_feature_arrays(frame, self.query_features, "the query")
        rows = len(frame)
        exclude = [list(e) for e in exclude] if exclude is not None else [[]] * rows
        if len(exclude) != rows:
            raise DataError(f"exclude has {len(exclude)} rows for {rows} query rows; "
                            "give one list of ids per query row.")
        width = max(1, max(len(e) for e in exclude))
        padded = [e + [""] * (width - len(e)) for e in exclude]
        inputs = {**{n: tf.constant(v) for n, v in arrays.items()},
                  "k": tf.fill([rows], k), "exclude": tf.constant(padded, tf.string)}
        if allow or deny:
            namespaces = self.info.get("restricts", {}).get("namespaces", [])
            for name, items in (("allow", allow), ("deny", deny)):
                table = _rows(items, rows, name)
                for item in (i for r in table for i in r if i):
                    tokens.parse_token(item, namespaces)  # a clear DataError
                inputs[name] = tf.constant(_pad(table), tf.string)
            out = self._served.signatures["top_k_filter"](**inputs)
        else:
            out = self._served.signatures["top_k_exclude"](**inputs)
        return ids_as_text(out["ids"]), out["scores"].numpy()

    def describe(
        self, candidate_ids: Sequence[str], column: str | None = None
    ) -> list[str]:
        """A display string per candidate id (its first text column)."""
        if column is None:
            text = [f.name for f in self.candidate_features if f.kind == "text"]
            column = text[0] if text else self.candidate_id
        lookup = dict(zip(self.ids, self.corpus[column].astype(str), strict=True))
        return [lookup.get(str(i), "") for i in candidate_ids]


def _rows(
    items: Sequence[Sequence[str]] | Sequence[str] | None, rows: int, name: str
) -> list[list[str]]:
    """``rows`` lists from one list for every row (strings) or one per row."""
    if items is None or not len(items):
        return [[] for _ in range(rows)]
    if isinstance(items[0], str):
        return [list(items) for _ in range(rows)]
    table = [list(r) for r in items]
    if len(table) != rows:
        raise DataError(f"{name} has {len(table)} rows for {rows} query rows; give "
                        "one list per row or a single list for all.")
    return table


def _pad(table: Sequence[Sequence[str]]) -> list[list[str]]:
    width = max([1, *(len(r) for r in table)])
    return [list(r) + [""] * (width - len(r)) for r in table]


def parse_feature_args(pairs: Sequence[str]) -> dict[str, list[str]]:
    """Parses ``name=value`` strings into ``{name: [value]}``.

    >>> parse_feature_args(["user_id=42", "age=30"])
    {'user_id': ['42'], 'age': ['30']}
    """
    out: dict[str, list[str]] = {}
    for item in pairs:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise DataError(f"expected NAME=VALUE, received {item!r}.")
        out.setdefault(name, []).append(value)
    return out


__all__ = ["LocalRetriever", "parse_feature_args", "tower_features"]
