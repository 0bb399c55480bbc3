"""Filtered retrieval in the graph: which candidates pass a request's filter,
and exact top-k among them.

The retrieval SavedModels (:mod:`tfdssm.export.index`) hold a
:class:`Restricts`: the restrict-token vocabulary (``namespace=token``, see
:mod:`tfdssm.export.tokens`) and, per token, its posting list (the candidates
carrying it). A request's ``allow`` and ``deny`` (string ``[batch, n]``,
``""`` padding) become a bool ``[batch, num_candidates]`` mask of passing
candidates: OR over the allowed tokens of a namespace, AND over namespaces,
minus every candidate with a denied token. A token carried by more than
``dense_share`` of the corpus (1/32 by default) is also kept as a precomputed
byte vector over the corpus, so a broad token costs one ``[N]`` copy instead of
scattering its long posting list per request; rarer tokens are scattered from
their postings. The cost is ``O(batch * num_candidates)`` element-wise work
plus the length of the rare posting lists named in the request. Stock
TensorFlow ops only (fingerprint lookup, ``searchsorted``, ``scatter_nd``,
``gather``, ``PopulationCount``), so the brute-force model keeps serving on
stock TF Serving.

:func:`exact_search` scores the passing candidates exactly: when few pass (at
most ``gather_limit`` over the batch) it gathers only their embeddings, else
it scores the whole corpus and masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ExportError
from tfdssm.export.tokens import check_columns, postings

GATHER_LIMIT = 262_144  # passing (row, candidate) pairs scored by gathering
DENSE_SHARE = 1 / 32  # tokens on more of the corpus also get a dense byte vector
_FINGERPRINTS = 2**63 - 1  # to_hash_bucket_fast buckets: the full int64 range


class Restricts(tf.Module):
    """The candidates' restrict tokens, as posting lists, and the filter rule.

    Args:
        namespaces: The namespaces (restrict columns), in export order.
        postings: ``{"namespace=token": candidate row indices}``.
        num_candidates: Corpus size.
        dense_share: Tokens carried by more than this share of the corpus are
            also stored as a ``uint8 [num_candidates]`` vector (memory: at
            most ``1 / dense_share`` bytes per posting, 4x the int64 postings
            at the default 1/32); ``1.0`` disables, ``0.0`` makes every token
            dense.

    Use :meth:`from_tokens` to build it from per-candidate token dicts.
    """

    def __init__(
        self,
        namespaces: Sequence[str],
        postings: Mapping[str, Sequence[int] | np.ndarray],
        num_candidates: int,
        name: str | None = None,
        dense_share: float = DENSE_SHARE,
    ) -> None:
        super().__init__(name=name or "restricts")
        self.namespaces = tuple(check_columns(namespaces, namespaces))
        self.num_candidates = int(num_candidates)
        vocabulary = [""] + sorted(postings)  # "" is a sentinel (empty postings)
        for token in vocabulary[1:]:
            namespace = token.partition("=")[0]
            if namespace not in self.namespaces:
                raise ExportError(f"restrict token {token!r} is not in one of the "
                                  f"namespaces {list(self.namespaces)}.")
        lists = [np.zeros([0], np.int64)] + [
            np.unique(np.asarray(postings[t], np.int64)) for t in vocabulary[1:]]
        for token, rows in zip(vocabulary, lists, strict=True):
            if len(rows) and (rows[0] < 0 or rows[-1] >= self.num_candidates):
                raise ExportError(f"restrict token {token!r} names candidate rows "
                                  f"outside [0, {self.num_candidates}).")
        prints = tf.strings.to_hash_bucket_fast(vocabulary, _FINGERPRINTS).numpy()
        prints[0] = -1  # the sentinel never matches (fingerprints are >= 0)
        if len(set(prints.tolist())) != len(prints):
            raise ExportError("two restrict tokens share a 64-bit fingerprint; "
                              "rename one of them.")
        order = np.argsort(prints, kind="stable")
        lengths = np.array([len(lists[i]) for i in order], np.int64)
        splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = (np.concatenate([lists[i] for i in order]) if len(order)
                else np.zeros([0], np.int64))
        self.num_tokens = len(vocabulary) - 1
        self.vocabulary = tf.Variable(
            np.asarray([vocabulary[i] for i in order], dtype=object), dtype=tf.string,
            trainable=False, name="restrict_vocabulary")
        self.fingerprints = tf.Variable(prints[order], trainable=False,
                                        name="restrict_fingerprints")
        self.splits = tf.Variable(splits, trainable=False, name="posting_splits")
        self.postings = tf.Variable(flat.astype(np.int64), trainable=False,
                                    name="postings")
        # Broad tokens: row dense_row[position] of the dense table; row 0 is
        # all False (the rare tokens and the sentinel point there).
        broad = [i for i in order if len(lists[i]) > dense_share
                 * self.num_candidates]
        table = np.zeros([len(broad) + 1, self.num_candidates], bool)
        for at, i in enumerate(broad, start=1):
            table[at, lists[i]] = True
        where = {i: at for at, i in enumerate(broad, start=1)}
        self.num_dense = len(broad)
        self.dense_row = tf.Variable(
            np.array([where.get(i, 0) for i in order], np.int64),
            trainable=False, name="dense_row")
        self.dense = tf.Variable(table, trainable=False, name="dense_tokens")

    @classmethod
    def from_tokens(
        cls, tokens: Sequence[Mapping[str, Sequence[str]]], namespaces: Sequence[str]
    ) -> Restricts:
        """From ``{namespace: [tokens]}`` per candidate
        (:func:`tfdssm.export.tokens.candidate_tokens`).

        >>> Restricts.from_tokens([{"g": ["a", "b"]}, {"g": ["b"]}], ["g"]).describe()
        {'namespaces': ['g'], 'tokens': 2, 'postings': 3, 'dense_tokens': 2}
        """
        return cls(namespaces, postings(tokens, namespaces), len(tokens))

    def describe(self) -> dict[str, Any]:
        """What ``export.json`` records about the in-graph tokens."""
        return {"namespaces": list(self.namespaces), "tokens": self.num_tokens,
                "postings": int(self.splits[-1].numpy()),
                "dense_tokens": self.num_dense}

    def _lookup(self, tokens: tf.Tensor, what: str) -> tuple[tf.Tensor, ...]:
        """Parses and looks up ``[batch, n]`` request tokens (flattened).

        Returns:
            ``(row, namespace id, vocabulary position, found, non-empty, batch)``;
            the first five are ``[batch * n]``.
        """
        batch = tf.shape(tokens)[0]
        width = tf.shape(tokens)[1]
        flat = tf.reshape(tokens, [-1])
        row = tf.repeat(tf.range(batch, dtype=tf.int64), width)
        present = tf.not_equal(flat, "")
        well_formed = tf.strings.regex_full_match(flat, "[^=]+=(?s:.+)")
        namespace = tf.strings.regex_replace(flat, "=(?s:.*)$", "")
        ns_id = tf.fill(tf.shape(flat), tf.constant(-1, tf.int32))
        for index, name in enumerate(self.namespaces):
            ns_id = tf.where(tf.equal(namespace, name), index, ns_id)
        malformed = present & tf.logical_not(well_formed)
        unknown = present & well_formed & (ns_id < 0)
        known = ", ".join(self.namespaces) or "(none)"
        checks = [
            tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(malformed)),
                [f"{what} tokens must be NAMESPACE=TOKEN (e.g. genres=Comedy) or "
                 "\"\" (padding); received:", tf.boolean_mask(flat, malformed)],
                summarize=10),
            tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(unknown)),
                [f"unknown {what} namespace; the namespaces of this model are: "
                 f"{known} (chosen at export with --restrict-columns); received:",
                 tf.boolean_mask(flat, unknown)], summarize=10),
        ]
        with tf.control_dependencies(checks):
            prints = tf.strings.to_hash_bucket_fast(flat, _FINGERPRINTS)
        size = tf.shape(self.fingerprints, out_type=tf.int64)[0]
        position = tf.searchsorted(self.fingerprints[None, :], prints[None, :],
                                   out_type=tf.int64)[0]
        position = tf.minimum(position, size - 1)
        found = (present
                 & tf.equal(tf.gather(self.fingerprints, position), prints)
                 & tf.equal(tf.gather(self.vocabulary, position), flat))
        return row, ns_id, position, found, present

    def _cells(self, row: tf.Tensor, position: tf.Tensor, keep: tf.Tensor,
               batch: tf.Tensor) -> tf.Tensor:
        """Expands the kept request tokens' posting lists.

        Args:
            row, position: int64 ``[tokens]``: request row and vocabulary
                position of each request token.
            keep: bool ``[tokens]``: the tokens to expand.
            batch: Request rows.

        Returns:
            int64 ``[hits]``: cell ``row * num_candidates + candidate`` of every
            (request row, candidate) pair the kept tokens name.
        """
        row = tf.boolean_mask(row, keep)  # a few request tokens: cheap
        position = tf.boolean_mask(position, keep)
        starts = tf.gather(self.splits, position)
        limits = tf.gather(self.splits, position + 1)
        spans = tf.ragged.range(starts, limits)  # one RaggedRange op
        candidates = tf.gather(self.postings, spans.flat_values)

        def with_rows() -> tf.Tensor:
            step = tf.range(tf.size(candidates, out_type=tf.int64))
            which = tf.searchsorted(spans.row_splits[None, 1:], step[None, :],
                                    side="right", out_type=tf.int64)[0]
            return tf.gather(row, which) * self.num_candidates + candidates

        return tf.cond(batch > 1, with_rows, lambda: candidates)

    def _mark(self, cells: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
        """bool ``[batch, num_candidates]``: True at the given cells.

        A scatter for few cells; ``bincount`` (multi-threaded, a fixed cost
        over the whole mask) for more than a sixteenth of the mask.
        """
        size = tf.cast(batch, tf.int64) * self.num_candidates

        def scatter() -> tf.Tensor:
            return tf.tensor_scatter_nd_update(
                tf.zeros(tf.reshape(size, [1]), tf.bool), cells[:, None],
                tf.ones(tf.shape(cells), tf.bool))

        def count() -> tf.Tensor:
            return tf.math.bincount(cells, minlength=size, maxlength=size,
                                    dtype=tf.int32) > 0

        mask = tf.cond(tf.size(cells, out_type=tf.int64) * 16 < size, scatter,
                       count)
        return tf.reshape(mask, tf.stack([batch, self.num_candidates]))

    def _union(self, row: tf.Tensor, position: tf.Tensor, keep: tf.Tensor,
               batch: tf.Tensor) -> tf.Tensor:
        """bool ``[batch, num_candidates]``: per request row, the candidates
        carrying any of the kept request tokens.

        Broad tokens are read from the dense table (one row copy and OR per
        token and request row); the others are marked from their posting
        lists.

        Args:
            row, position: int64 ``[batch * width]``: request row and
                vocabulary position of each request token, row-major.
            keep: bool ``[batch * width]``: the tokens to take.
            batch: Request rows.
        """
        dense_row = tf.where(keep, tf.gather(self.dense_row, position), 0)
        broad = dense_row > 0
        rare = keep & tf.logical_not(broad)

        def marked() -> tf.Tensor:
            return self._mark(self._cells(row, position, rare, batch), batch)

        def dense() -> tf.Tensor:
            # [batch, width] table rows, the broad ones first in each row.
            table_rows = tf.reshape(dense_row, tf.stack([batch, -1]))
            table_rows = tf.sort(table_rows, axis=1, direction="DESCENDING")
            count = tf.reduce_max(tf.reduce_sum(
                tf.cast(table_rows > 0, tf.int32), axis=1))
            mask = tf.gather(self.dense, table_rows[:, 0])

            def more(column: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, ...]:
                return column + 1, mask | tf.gather(self.dense, table_rows[:, column])

            return tf.while_loop(lambda column, _: column < count, more,
                                 (tf.constant(1), mask))[1]

        def with_broad() -> tf.Tensor:
            mask = dense()  # once in the graph, whether rare tokens follow
            return tf.cond(tf.reduce_any(rare), lambda: mask | marked(),
                           lambda: mask)

        return tf.cond(tf.reduce_any(broad), with_broad, marked)

    def passing(self, allow: tf.Tensor, deny: tf.Tensor) -> tf.Tensor:
        """Which candidates pass each row's filter.

        One union of the named tokens (dense rows and/or marked posting
        lists) per namespace asked for and one for the denied tokens, all
        computed by one :meth:`_union` over ``groups x batch`` rows (one
        copy of it in the graph, whatever the number of namespaces: the
        graph's size is what loading and the first call pay for).

        Args:
            allow: string ``[batch, n]``, ``namespace=token`` or ``""``.
            deny: string ``[batch, m]``, same batch.

        Returns:
            bool ``[batch, num_candidates]``.

        Raises (in the graph, ``INVALID_ARGUMENT``): a token that is not
        ``NAMESPACE=TOKEN``, or names a namespace the model does not have.
        """
        batch = tf.shape(allow)[0]
        spaces = len(self.namespaces)
        everyone = tf.stack([batch, self.num_candidates])
        _, ns_id, position, found, present = self._lookup(allow, "allow")
        _, _, deny_position, deny_found, _ = self._lookup(deny, "deny")
        columns = tf.maximum(tf.shape(allow)[1], tf.shape(deny)[1])

        def table(values: tf.Tensor, width: tf.Tensor, fill: Any) -> tf.Tensor:
            values = tf.reshape(values, tf.stack([batch, width]))
            return tf.pad(values, [[0, 0], [0, columns - width]],
                          constant_values=fill)

        # Groups: one per namespace, then the denied tokens; [groups, batch,
        # columns] token positions and which of them a group takes.
        ns_id = table(ns_id, tf.shape(allow)[1], -1)
        group = tf.range(spaces, dtype=tf.int32)[:, None, None]
        mine = tf.equal(ns_id[None], group)  # [spaces, batch, columns]
        takes = tf.concat([
            table(found, tf.shape(allow)[1], False)[None] & mine,
            table(deny_found, tf.shape(deny)[1], False)[None]], axis=0)
        positions = tf.concat([
            tf.tile(table(position, tf.shape(allow)[1], 0)[None], [spaces, 1, 1]),
            table(deny_position, tf.shape(deny)[1], 0)[None]], axis=0)
        # [groups, batch]: rows that ask for a namespace / deny something.
        asked = tf.concat([
            tf.reduce_any(table(present, tf.shape(allow)[1], False)[None] & mine,
                          axis=2),
            tf.reduce_any(takes[spaces:], axis=2)], axis=0)
        chosen = tf.where(tf.reduce_any(asked, axis=1))[:, 0]  # [slots]
        slots = tf.shape(chosen)[0]
        rows = slots * batch
        flat_takes = tf.reshape(tf.gather(takes, chosen), [-1])
        flat_positions = tf.reshape(tf.gather(positions, chosen), [-1])
        row = tf.repeat(tf.range(tf.cast(rows, tf.int64)), columns)

        def some() -> tf.Tensor:
            union = self._union(row, flat_positions, flat_takes, rows)
            union = tf.reshape(union, tf.stack([slots, batch, self.num_candidates]))

            def combine() -> tf.Tensor:
                denies = tf.equal(chosen, spaces)[:, None, None]
                waived = tf.logical_not(tf.gather(asked, chosen))[:, :, None]
                return tf.reduce_all(tf.where(denies, tf.logical_not(union),
                                              union | waived), axis=0)

            # One namespace asked by every row, nothing denied: no
            # combination pass.
            single = (tf.equal(slots, 1) & tf.reduce_all(tf.gather(asked, chosen))
                      & tf.reduce_all(chosen < spaces))
            return tf.cond(single, lambda: union[0], combine)

        return tf.cond(tf.equal(slots, 0), lambda: tf.ones(everyone, tf.bool), some)


def count_passing(passing: tf.Tensor) -> tf.Tensor:
    """int64 ``[batch]``: True values per row of a bool ``[batch, N]`` mask.

    Counts eight bytes at a time (``PopulationCount`` of the mask's bytes
    read as uint64), which reads the mask once instead of summing a float
    copy of it.

    >>> count_passing(tf.constant([[True, False, True], [False] * 3])).numpy()
    array([2, 0])
    """
    batch = tf.shape(passing)[0]
    size = passing.shape[1]
    bytes_ = tf.cast(passing, tf.uint8)
    if size is None or size % 8:
        bytes_ = tf.pad(bytes_, [[0, 0], [0, (-tf.shape(passing)[1]) % 8]])
    words = tf.bitcast(tf.reshape(bytes_, tf.stack([batch, -1, 8])), tf.uint64)
    return tf.reduce_sum(tf.cast(tf.raw_ops.PopulationCount(x=words), tf.int64),
                         axis=1)


def dense_scores(queries: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
    """``[batch, N]`` scores of ``[batch, dim]`` queries, or the best head's for
    ``[batch, heads, dim]`` ones."""
    if queries.shape.rank == 3:
        return tf.reduce_max(tf.einsum("bhd,nd->bhn", queries, vectors), axis=1)
    return tf.matmul(queries, vectors, transpose_b=True)


def exact_search(
    embeddings: tf.Tensor,
    queries: tf.Tensor,
    passing: tf.Tensor,
    n: tf.Tensor,
    gather_limit: int = GATHER_LIMIT,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The best ``n`` passing candidates per row, exactly.

    Args:
        embeddings: float32 ``[N, dim]``.
        queries: float32 ``[batch, dim]`` or ``[batch, heads, dim]``.
        passing: bool ``[batch, N]``.
        n: int32 scalar, results wanted (<= N).
        gather_limit: Up to this many passing pairs over the batch, only their
            embeddings are scored; above it, the whole corpus is.

    Returns:
        ``(scores float32 [batch, <= n], indices int32 [batch, <= n])``, best
        first; missing results (fewer pass than ``n``) have a NaN score.
    """
    batch = tf.shape(passing)[0]
    counts = count_passing(passing)

    def single() -> tuple[tf.Tensor, tf.Tensor]:  # one query row: no table
        candidate = tf.where(passing[0])[:, 0]
        vectors = tf.gather(embeddings, candidate)
        scores = dense_scores(queries, vectors)  # [1, pairs]
        best = tf.math.top_k(scores, tf.minimum(n, tf.shape(scores)[1]))
        return best.values, tf.cast(tf.gather(candidate, best.indices), tf.int32)

    def gathered() -> tuple[tf.Tensor, tf.Tensor]:
        coords = tf.where(passing)  # [pairs, 2], row-major
        row, candidate = coords[:, 0], coords[:, 1]
        vectors = tf.gather(embeddings, candidate)
        mine = tf.gather(queries, row)
        if queries.shape.rank == 3:
            scores = tf.reduce_max(tf.einsum("phd,pd->ph", mine, vectors), axis=1)
        else:
            scores = tf.reduce_sum(mine * vectors, axis=1)
        width = tf.maximum(tf.reduce_max(counts), 1)
        column = tf.range(tf.shape(row, out_type=tf.int64)[0]) - tf.gather(
            tf.cumsum(counts, exclusive=True), row)
        where = tf.stack([row, column], axis=1)
        shape = tf.stack([tf.cast(batch, tf.int64), width])
        table = tf.tensor_scatter_nd_update(
            tf.fill(shape, tf.constant(-np.inf, tf.float32)), where, scores)
        index = tf.tensor_scatter_nd_update(
            tf.fill(shape, tf.constant(-1, tf.int32)), where,
            tf.cast(candidate, tf.int32))
        best = tf.math.top_k(table, tf.cast(tf.minimum(tf.cast(n, tf.int64), width),
                                            tf.int32))
        return best.values, tf.gather(index, best.indices, batch_dims=1)

    def scored() -> tuple[tf.Tensor, tf.Tensor]:
        scores = dense_scores(queries, embeddings)
        scores = tf.where(passing, scores, tf.constant(-np.inf, tf.float32))
        best = tf.math.top_k(scores, n)
        return best.values, best.indices

    few = tf.reduce_sum(counts) <= gather_limit
    values, indices = tf.cond(
        few & tf.equal(batch, 1), single,
        lambda: tf.cond(few, gathered, scored))
    missing = tf.math.is_inf(values) & (values < 0)
    return tf.where(missing, tf.constant(np.nan, tf.float32), values), indices


__all__ = ["DENSE_SHARE", "GATHER_LIMIT", "Restricts", "count_passing", "dense_scores",
           "exact_search"]
