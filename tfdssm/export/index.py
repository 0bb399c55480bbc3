"""Retrieval SavedModels: query features -> top-k candidate ids over the corpus.

Two modules share one signature contract and differ only in how they search:

* :class:`BruteForceRetrieval` scores every candidate with a matrix product
  (exact; stock TensorFlow ops, so stock TF Serving serves it);
* :class:`ScannRetrieval` searches a ScaNN index built with ScaNN's TensorFlow
  ops (``scann.scann_ops``), saved with the ``Scann`` op namespace allowed; it
  needs a server that has loaded those ops (``import scann``, or the
  ``google/tf-serving-scann`` image).

Signatures (inputs named after the query tower's columns, each ``[batch]``):

==================  ==========================================  ===================
signature           extra inputs                                outputs
==================  ==========================================  ===================
``serving_default``  (none)                                      top ``max_k``
``top_k``            ``k`` int32 ``[batch]``                     top ``max(k)``
``top_k_exclude``    ``k`` int32 ``[batch]``, ``exclude`` string  top ``max(k)``
                     ``[batch, num_excluded]`` (pad with ``""``)
``top_k_filter``     ``k``, ``exclude`` as above; ``allow`` and   top ``max(k)``
                     ``deny`` string ``[batch, n]`` holding      among those that
                     ``namespace=token`` (pad with ``""``)       pass the filter
==================  ==========================================  ===================

Outputs: ``ids`` string ``[batch, width]`` and ``scores`` float32
``[batch, width]`` (the query-candidate dot product; the cosine for normalised
towers), best first. ``width`` is ``max_k`` for ``serving_default`` and
``max(k)`` over the batch otherwise; row ``i`` holds ``k[i]`` results and is
padded with id ``""`` and score ``-inf`` (also when exclusions leave fewer than
``k[i]`` candidates). ``k`` outside ``[1, max_k]``, an empty batch, or ``k`` /
``exclude`` with a different number of rows than the query fail inside the graph
with ``INVALID_ARGUMENT`` and a message saying so (also on TF Serving).

Exclusion retrieves ``max(k) + num_excluded`` candidates and drops the excluded
ids, so every row still gets ``k`` results when the corpus has them.

Filters (``top_k_filter``; :mod:`tfdssm.export.tokens` has the rule, restrict
columns are chosen at export): a candidate passes when it has one of the
allowed tokens in every namespace the row allows tokens in, and none of the
denied ones. The brute-force model scores the passing candidates exactly
(:func:`tfdssm.export.restricts.exact_search`). The ScaNN model oversamples:
it asks the index for ``2 * wanted * N / passing + wanted`` neighbours,
searching ``FILTER_LEAVES`` (3) times the index's leaves and re-scoring
``reorder * N / passing`` candidates exactly (as many passing ones as an
unfiltered search re-scores), keeps the passing ones, and falls back to exact
scoring of the passing candidates when that number is above
``max_oversample`` (a selective filter), when at most ``exact_below``
candidates pass (a quarter of what the index's own search scans per query:
scoring them exactly costs about the same), or when the oversampled answer
holds fewer than ``min(wanted, passing)`` of them. The path is chosen per row
(a batch mixing broad and selective filters is split); a batch whose rows all
pass everything (an empty filter) is searched exactly as ``top_k`` does.
A filter nothing passes gives ``""`` ids and ``-inf`` scores. Tokens that are
not ``namespace=token`` or name an unknown namespace fail with
``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError, ExportError
from tfdssm.export import native_logs
from tfdssm.export.hybrid import Hybrid
from tfdssm.export.restricts import Restricts, count_passing, exact_search
from tfdssm.model import multihead

DEFAULT_MAX_K = 100
BRUTE_FORCE_BELOW = 1000  # ScaNN: exact float scoring below this corpus size.
RESERVED_INPUTS = ("k", "exclude", "allow", "deny")
OVERSAMPLE = 2.0  # ScaNN filters: expected passing neighbours / wanted
MAX_OVERSAMPLE = 2000  # ScaNN filters: at least this many neighbours may be asked
EXACT_SHARE = 0.25  # ScaNN filters: exact when passing <= this x candidates scanned
FILTER_LEAVES = 3  # ScaNN filters: search this many times the index's leaves


def scann_options(num_candidates: int, max_k: int = DEFAULT_MAX_K) -> dict[str, Any]:
    """ScaNN index parameters for a corpus size (measured in docs/benchmarks.md).

    * ``< 1000`` candidates: exact brute-force scoring (no tree, no quantisation).
    * otherwise a k-means tree with ``min(sqrt(N), N / 100)`` leaves (>= ~100
      candidates each), searching ``max(25 %, 5000 / N)`` of them (all leaves
      up to 5,000 candidates; 5 % lost a third of the recall@10 on diffuse
      128-d data, ``benchmarks/retrieval.py``), anisotropic hashing (2
      dimensions per block, threshold 0.2) and exact float re-scoring of the
      best 200 (500 above 250,000 candidates; at least ``2 * max_k``, and more
      when a request asks for more).

    >>> scann_options(500)["mode"]
    'brute_force'
    >>> options = scann_options(1_000_000)
    >>> options["num_leaves"], options["num_leaves_to_search"]
    (1000, 250)
    """
    if num_candidates < BRUTE_FORCE_BELOW:
        return {"mode": "brute_force"}
    leaves = max(2, min(round(math.sqrt(num_candidates)), num_candidates // 100))
    fraction = max(0.25, min(1.0, 5000 / num_candidates))
    return {
        "mode": "tree_ah",
        "num_leaves": leaves,
        "num_leaves_to_search": min(leaves, math.ceil(leaves * fraction)),
        "training_sample_size": min(num_candidates, 100_000),
        "dimensions_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder": max(2 * max_k, 200 if num_candidates <= 250_000 else 500),
    }


class RetrievalModule(tf.Module):
    """Base of the retrieval SavedModels: query tower + corpus + search.

    Args:
        query_encoder: Callable on ``{column: [batch] tensor}`` returning float32
            ``[batch, dim]`` (a :class:`tfdssm.model.towers.Tower`, or a tf.Module
            wrapping a SavedModel signature); tracked so its weights are saved.
        input_spec: ``{column: TensorSpec([None], dtype, name=column)}``.
        embeddings: float32 ``[num_candidates, dim]`` candidate embeddings.
        ids: ``num_candidates`` distinct, non-empty candidate ids.
        max_k: Largest ``k`` a request may ask for (capped at the corpus size).
        hybrid: Fuse the dense score with BM25 (:mod:`tfdssm.export.hybrid`); its
            lexical index must list the same candidates in the same order.
        restricts: The candidates' restrict tokens for ``top_k_filter``
            (:class:`tfdssm.export.restricts.Restricts`, same candidate order);
            default none (every request token is then an unknown namespace).
    """

    kind = "base"
    keeps_embeddings = False

    def __init__(
        self,
        query_encoder: Any,
        input_spec: Mapping[str, tf.TensorSpec],
        embeddings: np.ndarray,
        ids: Sequence[str],
        max_k: int = DEFAULT_MAX_K,
        name: str | None = None,
        hybrid: Hybrid | None = None,
        restricts: Restricts | None = None,
    ) -> None:
        super().__init__(name=name or f"retrieval_{self.kind}")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        ids = [str(i) for i in ids]
        _check_corpus(embeddings, ids, input_spec, max_k)
        _check_hybrid(hybrid, input_spec, len(ids))
        if restricts is None:
            restricts = Restricts((), {}, len(ids))
        if restricts.num_candidates != len(ids):
            raise ExportError(
                f"the restrict tokens cover {restricts.num_candidates} candidates but "
                f"the corpus has {len(ids)}; build them from the same corpus, in "
                "the same order.")
        self.query_encoder = query_encoder
        self.input_spec = dict(input_spec)
        self.num_candidates, self.dim = (int(n) for n in embeddings.shape)
        self.max_k = min(int(max_k), self.num_candidates)
        self.ids = tf.Variable(np.asarray(ids, dtype=object), dtype=tf.string,
                               trainable=False, name="candidate_ids")
        self.hybrid = hybrid
        self.restricts = restricts
        self.filters = bool(restricts.namespaces)
        # hybrid re-scores with them; ScaNN filters fall back to exact scoring
        if self.keeps_embeddings or hybrid is not None or self.filters:
            self.embeddings = tf.Variable(embeddings, trainable=False,
                                          name="candidate_embeddings")
        self.embed_query = tf.function(
            lambda features: self.query_encoder(features),
            input_signature=[self.input_spec], autograph=False,
        )

    def search(self, queries: tf.Tensor, n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Best ``n`` candidates per query: scores and indices ``[batch, <= n]``.

        Missing results (fewer found than asked) have a NaN score.
        """
        raise NotImplementedError

    def search_filtered(
        self, queries: tf.Tensor, n: tf.Tensor, passing: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Best ``n`` passing candidates per query row (exact here; ScaNN
        overrides it).

        Args:
            queries: float32 ``[batch, dim]`` or ``[batch, heads, dim]``.
            n: int32 scalar.
            passing: bool ``[batch, N]``.

        Returns:
            ``(scores, indices)`` ``[batch, <= n]``; NaN score = missing.
        """
        return exact_search(self.embeddings, queries, passing, n)

    def top_k(
        self,
        features: Mapping[str, tf.Tensor],
        k: tf.Tensor,
        exclude: tf.Tensor,
        allow: tf.Tensor | None = None,
        deny: tf.Tensor | None = None,
    ) -> dict[str, tf.Tensor]:
        """The retrieval contract (see the module docstring) for one batch.

        Args:
            features: ``{column: [batch]}`` query features.
            k: int32 ``[batch]``, results wanted per row.
            exclude: string ``[batch, num_excluded]``, ids to skip (``""`` = none).
            allow: string ``[batch, n]`` ``namespace=token`` to allow, or ``None``
                (no filter; then ``deny`` is ``None`` too).
            deny: string ``[batch, m]`` ``namespace=token`` to deny.

        Returns:
            ``{"ids": string [batch, max(k)], "scores": float32 [batch, max(k)]}``.
        """
        queries = self.embed_query(features)
        batch = tf.shape(queries)[0]
        checks = [
            tf.debugging.Assert(batch > 0,
                                ["empty batch: send at least one query row."]),
            tf.debugging.Assert(
                tf.equal(tf.shape(k)[0], batch),
                ["k needs one value per query row; received this many values:",
                 tf.shape(k)[0], "for this many rows:", batch]),
            tf.debugging.Assert(
                tf.equal(tf.shape(exclude)[0], batch),
                ["exclude needs one row per query row; received this many rows:",
                 tf.shape(exclude)[0], "for this many query rows:", batch]),
            *[tf.debugging.Assert(
                tf.equal(tf.shape(t)[0], batch),
                [f"{name} needs one row per query row; received this many rows:",
                 tf.shape(t)[0], "for this many query rows:", batch])
              for name, t in (("allow", allow), ("deny", deny)) if t is not None],
            tf.debugging.Assert(
                tf.reduce_all((k >= 1) & (k <= self.max_k)),
                [f"k must be between 1 and max_k={self.max_k} (set at export time "
                 "with --max-k); received k =", k], summarize=20),
        ]
        with tf.control_dependencies(checks):
            width = tf.reduce_max(k)
        wanted = tf.minimum(width + tf.shape(exclude)[1], self.num_candidates)
        passing = None
        if allow is not None:
            with tf.control_dependencies(checks):
                passing = self.restricts.passing(allow, deny)
            if not self.filters:  # no tokens: only the request's checks apply
                with tf.control_dependencies([passing]):
                    wanted = tf.identity(wanted)
                passing = None
        # Multi-head queries [batch, heads, dim]: every head searches, the
        # union is re-ranked by the best head's score below.
        if passing is None:
            search = functools.partial(multihead.search_heads, self.search)
        else:
            search = functools.partial(self.search_filtered, passing=passing)
        if self.hybrid is None:
            scores, indices = search(queries, wanted)
        else:
            scores, indices = self.hybrid.search(
                self.search if passing is None else search, self.embeddings,
                features, queries, wanted, passing)
        candidate_ids = tf.gather(self.ids, tf.maximum(indices, 0))
        valid = tf.logical_not(tf.math.is_nan(scores)) & (indices >= 0)
        valid &= tf.logical_not(excluded(candidate_ids, exclude))
        minus_inf = tf.constant(-np.inf, tf.float32)
        scores = tf.where(valid, scores, minus_inf)
        take = tf.minimum(width, tf.shape(scores)[1])
        best = tf.math.top_k(scores, take)
        candidate_ids = tf.gather(candidate_ids, best.indices, batch_dims=1)
        padding = [[0, 0], [0, width - take]]
        candidate_ids = tf.pad(candidate_ids, padding, constant_values="")
        scores = tf.pad(best.values, padding, constant_values=-np.inf)
        keep = (tf.range(width)[None, :] < k[:, None]) & (scores > minus_inf)
        return {"ids": tf.where(keep, candidate_ids, ""),
                "scores": tf.where(keep, scores, minus_inf)}

    def signatures(self) -> dict[str, Any]:
        """``serving_default``, ``top_k``, ``top_k_exclude`` and ``top_k_filter``
        concrete functions."""
        spec = self.input_spec
        k_spec = tf.TensorSpec([None], tf.int32, name="k")
        exclude_spec = tf.TensorSpec([None, None], tf.string, name="exclude")

        @tf.function(input_signature=[spec], autograph=False)
        def serving_default(features):
            batch = tf.shape(next(iter(features.values())))[0]
            out = self.top_k(features, tf.fill([batch], self.max_k),
                             tf.zeros([batch, 0], tf.string))
            return {n: tf.ensure_shape(t, [None, self.max_k]) for n, t in out.items()}

        @tf.function(input_signature=[spec, k_spec], autograph=False)
        def top_k(features, k):
            return self.top_k(features, k, tf.zeros([tf.shape(k)[0], 0], tf.string))

        @tf.function(input_signature=[spec, k_spec, exclude_spec], autograph=False)
        def top_k_exclude(features, k, exclude):
            return self.top_k(features, k, exclude)

        allow_spec = tf.TensorSpec([None, None], tf.string, name="allow")
        deny_spec = tf.TensorSpec([None, None], tf.string, name="deny")

        @tf.function(input_signature=[spec, k_spec, exclude_spec, allow_spec,
                                      deny_spec], autograph=False)
        def top_k_filter(features, k, exclude, allow, deny):
            return self.top_k(features, k, exclude, allow, deny)

        return {"serving_default": serving_default, "top_k": top_k,
                "top_k_exclude": top_k_exclude, "top_k_filter": top_k_filter}

    def save_options(self) -> tf.saved_model.SaveOptions:
        return tf.saved_model.SaveOptions()

    def save(self, path: str | os.PathLike) -> None:
        """Writes the SavedModel (no versioning; see :mod:`tfdssm.export`)."""
        tf.saved_model.save(self, str(path), signatures=self.signatures(),
                            options=self.save_options())

    def describe(self) -> dict[str, Any]:
        """What ``export.json`` records about this index."""
        out = {"index": self.kind, "max_k": self.max_k,
               "num_candidates": self.num_candidates, "dim": self.dim,
               "signatures": ["serving_default", "top_k", "top_k_exclude",
                              "top_k_filter"],
               "restricts": self.restricts.describe()}
        if self.hybrid is not None:
            out["hybrid"] = self.hybrid.describe()
        return out


def excluded(candidate_ids: tf.Tensor, exclude: tf.Tensor) -> tf.Tensor:
    """Whether each retrieved id is in its row's exclusion list (``""`` = none).

    Sort-and-search on 64-bit fingerprints, confirmed by string equality:
    memory and time grow with ``batch * (retrieved + excluded)``, not with their
    product, so a long exclusion list cannot exhaust the server.

    Args:
        candidate_ids: string ``[batch, n]``.
        exclude: string ``[batch, m]``.

    Returns:
        bool ``[batch, n]``.

    >>> excluded(tf.constant([["a", "b", "c"]]), tf.constant([["c", "", "a"]])
    ...          ).numpy().tolist()
    [[True, False, True]]
    """
    batch = tf.shape(exclude)[0]
    # One sentinel column keeps gathers valid when there is nothing to exclude.
    exclude = tf.concat([exclude, tf.fill([batch, 1], "")], axis=1)
    fingerprints = tf.strings.to_hash_bucket_fast(exclude, _FINGERPRINTS)
    fingerprints = tf.where(tf.equal(exclude, ""), tf.constant(-1, tf.int64),
                            fingerprints)  # padding never matches (ids are >= 0)
    order = tf.argsort(fingerprints, axis=1, stable=True)
    sorted_prints = tf.gather(fingerprints, order, batch_dims=1)
    sorted_ids = tf.gather(exclude, order, batch_dims=1)
    wanted = tf.strings.to_hash_bucket_fast(candidate_ids, _FINGERPRINTS)
    found = tf.searchsorted(sorted_prints, wanted, side="left")
    found = tf.minimum(found, tf.shape(exclude, out_type=found.dtype)[1] - 1)
    return (tf.equal(tf.gather(sorted_prints, found, batch_dims=1), wanted)
            & tf.equal(tf.gather(sorted_ids, found, batch_dims=1), candidate_ids))


_FINGERPRINTS = 2**63 - 1  # to_hash_bucket_fast buckets: the full int64 range


class BruteForceRetrieval(RetrievalModule):
    """Exact top-k by scoring the whole corpus (stock TensorFlow ops only).

    Args: as :class:`RetrievalModule`.
    """

    kind = "brute_force"
    keeps_embeddings = True

    def search(self, queries: tf.Tensor, n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        scores = tf.matmul(queries, self.embeddings, transpose_b=True)
        best = tf.math.top_k(scores, n)
        return best.values, best.indices


class ScannRetrieval(RetrievalModule):
    """Approximate top-k with a ScaNN index (needs ScaNN's TF ops to load).

    Args:
        query_encoder, input_spec, embeddings, ids, max_k, name, hybrid: As
            :class:`RetrievalModule`.
        options: Index parameters; default :func:`scann_options` for the corpus.
        restricts: As :class:`RetrievalModule`; with restrict tokens the model
            also keeps the float embeddings (for the exact fallback of
            ``top_k_filter``).
    """

    kind = "scann"
    # Filters: choose oversample / exact per row. False sends a batch with
    # one selective row down the exact path whole (the earlier behaviour,
    # kept for benchmarks/filters.py to compare against).
    split_rows = True

    def __init__(
        self,
        query_encoder: Any,
        input_spec: Mapping[str, tf.TensorSpec],
        embeddings: np.ndarray,
        ids: Sequence[str],
        max_k: int = DEFAULT_MAX_K,
        name: str | None = None,
        options: Mapping[str, Any] | None = None,
        hybrid: Hybrid | None = None,
        restricts: Restricts | None = None,
    ) -> None:
        super().__init__(query_encoder, input_spec, embeddings, ids, max_k, name,
                         hybrid, restricts)
        scann_ops = _scann_ops()
        self.options = dict(options or scann_options(self.num_candidates, self.max_k))
        builder = scann_ops.builder(np.asarray(embeddings, np.float32),
                                    min(10, self.num_candidates), "dot_product")
        mode = self.options.get("mode")
        if mode == "brute_force":
            builder = builder.score_brute_force()
            self.reorder = 0
        elif mode == "tree_ah":
            o = self.options
            builder = builder.tree(
                num_leaves=o["num_leaves"],
                num_leaves_to_search=o["num_leaves_to_search"],
                training_sample_size=o["training_sample_size"],
            ).score_ah(
                o["dimensions_per_block"],
                anisotropic_quantization_threshold=o["anisotropic_quantization_threshold"],
            ).reorder(o["reorder"])
            self.reorder = int(o["reorder"])
        else:
            raise ConfigError(
                "ScaNN options need mode 'brute_force' or 'tree_ah', received "
                f"{mode!r}.")
        with native_logs.quiet_native_info():  # ScaNN's info lines: debug log
            self.searcher = builder.build().serialize_to_module()
        # Filters: most neighbours asked of ScaNN before scoring the passing
        # candidates exactly instead.
        self.max_oversample = min(self.num_candidates,
                                  max(MAX_OVERSAMPLE, 4 * self.reorder))
        # A filtered search scans FILTER_LEAVES times the leaves (the index's
        # own recall is its ceiling; the mask costs more than the wider scan).
        if mode == "brute_force":
            self.filter_leaves, scanned = -1, float(self.num_candidates)
        else:
            leaves = int(self.options["num_leaves"])
            own = int(self.options["num_leaves_to_search"])
            self.filter_leaves = min(leaves, FILTER_LEAVES * own)
            scanned = self.num_candidates * own / leaves
        # ... and at most this many passing candidates are scored exactly
        # anyway: a quarter of what the index's own search scans per query
        # (gathering and scoring them costs about what that scan does).
        self.exact_below = int(scanned * EXACT_SHARE)

    def search(
        self,
        queries: tf.Tensor,
        n: tf.Tensor,
        leaves: int = -1,
        pre_reorder: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """As :meth:`RetrievalModule.search`; ``leaves`` (-1: the index's
        own) and ``pre_reorder`` (default ``max(n, reorder)``) override the
        index's search parameters for one call."""
        handle = self.searcher.recreate_handle()  # created once per loaded model
        if pre_reorder is None:
            pre_reorder = tf.maximum(n, self.reorder) if self.reorder else n
        parallel = tf.shape(queries)[0] >= 16
        result = _scann_ops().scann_search_batched(
            handle, queries, n, pre_reorder, leaves, parallel)
        return result.distances, result.indices

    def search_filtered(
        self, queries: tf.Tensor, n: tf.Tensor, passing: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Oversample-and-filter with an exact fallback (see the module doc),
        chosen per row: a batch mixing broad and selective filters sends
        each row down its own path.

        The graph holds one oversampled search and one exact search: the
        rows that oversample go first; the rows chosen for the exact path,
        plus all of the oversampled ones when any of them found too few
        passing candidates, are then scored exactly, and the two parts are
        stitched back in row order. (Each path once: a larger graph costs
        its loading, its first call's optimisation and its memory.)
        """
        batch = tf.shape(passing)[0]
        count = tf.cast(count_passing(passing), tf.float32)  # [batch]
        asked = tf.math.ceil(OVERSAMPLE * tf.cast(n, tf.float32)
                             * self.num_candidates / tf.maximum(count, 1.0))
        row_exact = ((asked + tf.cast(n, tf.float32) > self.max_oversample)
                     | (count <= self.exact_below))
        if not self.split_rows:  # one selective row sends the batch exact
            row_exact = tf.fill([batch], tf.reduce_any(row_exact))
        some = tf.cast(tf.where(tf.logical_not(row_exact))[:, 0], tf.int32)

        def oversampled() -> tuple[tf.Tensor, ...]:
            return self._oversample(tf.gather(queries, some), n, passing, some,
                                    tf.gather(count, some))

        def none() -> tuple[tf.Tensor, ...]:
            return (tf.zeros([0, 0], tf.float32), tf.zeros([0, 0], tf.int32),
                    tf.constant(True))

        approximate, indices, enough = tf.cond(tf.size(some) > 0, oversampled,
                                               none)
        exact_rows = tf.cast(tf.where(row_exact | tf.logical_not(enough))[:, 0],
                             tf.int32)
        kept = tf.cast(tf.where(tf.logical_not(row_exact) & enough)[:, 0], tf.int32)

        def exact() -> tuple[tf.Tensor, tf.Tensor]:
            mask = tf.cond(tf.equal(tf.size(exact_rows), batch), lambda: passing,
                           lambda: tf.gather(passing, exact_rows))
            return exact_search(self.embeddings, tf.gather(queries, exact_rows),
                                mask, n)

        def no_rows() -> tuple[tf.Tensor, tf.Tensor]:
            return tf.zeros([0, 0], tf.float32), tf.zeros([0, 0], tf.int32)

        parts = [(approximate[:tf.size(kept)], indices[:tf.size(kept)]),
                 tf.cond(tf.size(exact_rows) > 0, exact, no_rows)]
        width = tf.maximum(tf.shape(parts[0][0])[1], tf.shape(parts[1][0])[1])
        parts = [_pad_columns(scores, indices, width) for scores, indices in parts]

        def filtered() -> tuple[tf.Tensor, tf.Tensor]:
            rows = [kept, exact_rows]
            return (tf.dynamic_stitch(rows, [p[0] for p in parts]),
                    tf.dynamic_stitch(rows, [p[1] for p in parts]))

        def unfiltered() -> tuple[tf.Tensor, tf.Tensor]:  # exactly top_k's search
            scores, indices = multihead.search_heads(self.search, queries, n)
            return scores, tf.cast(indices, tf.int32)

        return tf.cond(tf.reduce_all(count >= self.num_candidates), unfiltered,
                       filtered)

    def _oversample(
        self, queries: tf.Tensor, n: tf.Tensor, passing: tf.Tensor,
        rows: tf.Tensor, count: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Asks ScaNN for ``OVERSAMPLE * n * N / passing + n`` neighbours
        (searching ``filter_leaves`` leaves, re-scoring ``reorder * N /
        passing``) and keeps the best passing ``n``.

        Args:
            queries: float32 ``[rows, dim]`` or ``[rows, heads, dim]``.
            n: int32 scalar.
            passing: bool ``[batch, N]`` (the whole batch's mask).
            rows: int32 ``[rows]``, the batch rows of ``queries``.
            count: float32 ``[rows]``, candidates passing per row.

        Returns:
            ``(scores [rows, <= n], indices int32 [rows, <= n], enough)``;
            NaN score = missing; ``enough`` (bool scalar) is False when a
            row found fewer than ``min(n, passing)`` (the caller then scores
            these rows exactly).
        """
        wanted = tf.cast(n, tf.float32)
        fewest = tf.maximum(tf.reduce_min(count), 1.0)
        most = tf.math.ceil(OVERSAMPLE * wanted * self.num_candidates / fewest
                            ) + wanted
        m = tf.cast(tf.minimum(most, float(self.num_candidates)), tf.int32)
        # Re-score reorder / pass fraction: as many passing candidates as an
        # unfiltered search re-scores.
        reorder = tf.cast(tf.minimum(
            tf.math.ceil(self.reorder * self.num_candidates / fewest),
            float(self.num_candidates)), tf.int32)
        heads = queries.shape[1] if queries.shape.rank == 3 else 1
        rows = tf.repeat(rows, heads) if heads > 1 else rows  # per searched row

        def keep_passing(queries: tf.Tensor, size: tf.Tensor):
            pre_reorder = tf.maximum(size, reorder) if self.reorder else size
            scores, indices = self.search(queries, size, self.filter_leaves,
                                          pre_reorder)
            at = tf.stack([tf.broadcast_to(rows[:, None], tf.shape(indices)),
                           tf.maximum(indices, 0)], axis=-1)
            ok = (tf.gather_nd(passing, at)
                  & (indices >= 0) & tf.logical_not(tf.math.is_nan(scores)))
            scores = tf.where(ok, scores, tf.constant(-np.inf, tf.float32))
            best = tf.math.top_k(scores, tf.minimum(n, tf.shape(scores)[1]))
            chosen = tf.gather(indices, best.indices, batch_dims=1)
            return (tf.where(tf.math.is_inf(best.values),
                             tf.constant(np.nan, tf.float32), best.values), chosen)

        scores, indices = multihead.search_heads(keep_passing, queries, m)
        found = tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_nan(scores)),
                                      tf.float32), axis=1)
        enough = tf.reduce_all(found >= tf.minimum(wanted, count))
        return scores, tf.cast(indices, tf.int32), enough

    def save_options(self) -> tf.saved_model.SaveOptions:
        return tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "scann": dict(self.options)}
        if self.filters:
            out["filter"] = {"oversample": OVERSAMPLE,
                             "max_oversample": self.max_oversample,
                             "exact_below": self.exact_below,
                             "leaves_to_search": self.filter_leaves,
                             "reorder": "reorder * N / passing"}
        return out


def _pad_columns(
    scores: tf.Tensor, indices: tf.Tensor, width: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Pads ``[rows, <= width]`` results to ``width`` columns (NaN score =
    missing)."""
    extra = [[0, 0], [0, width - tf.shape(scores)[1]]]
    return (tf.pad(scores, extra, constant_values=np.nan),
            tf.pad(tf.cast(indices, tf.int32), extra))


def _scann_ops() -> Any:
    """ScaNN's TF ops module (importing it registers the ``Scann>`` ops)."""
    try:
        from scann.scann_ops.py import scann_ops  # noqa: PLC0415
    except ImportError as error:
        raise ExportError(
            f"the ScaNN retrieval model needs scann's TensorFlow ops ({error}); "
            "install the pinned stack: pip install 'scann[tf]==1.4.2'."
        ) from None
    return scann_ops


class SignatureEncoder(tf.Module):
    """Wraps a loaded towers SavedModel's ``query`` signature as an encoder.

    Lets a retrieval model be rebuilt from an export directory without the
    Keras model: ``SignatureEncoder(export.load_towers(export_dir))``.
    """

    def __init__(self, towers: Any, signature: str = "query") -> None:
        super().__init__(name="signature_encoder")
        self.towers = towers
        self.signature = signature

    @property
    def input_spec(self) -> dict[str, tf.TensorSpec]:
        specs = self.towers.signatures[self.signature].structured_input_signature[1]
        return {n: tf.TensorSpec([None], s.dtype, name=n) for n, s in specs.items()}

    def __call__(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        return self.towers.signatures[self.signature](**features)["embedding"]


def _check_hybrid(
    hybrid: Hybrid | None, spec: Mapping[str, tf.TensorSpec], num_candidates: int
) -> None:
    if hybrid is None:
        return
    column = hybrid.text_column
    if column not in spec or spec[column].dtype != tf.string:
        raise ExportError(
            f"the hybrid model's lexical index reads the query text column "
            f"{column!r}, but the query inputs are {dict(spec)}; pass the name of "
            "a string query feature.")
    if hybrid.lexical.num_documents != num_candidates:
        raise ExportError(
            f"the lexical index covers {hybrid.lexical.num_documents} documents "
            f"but the corpus has {num_candidates} candidates; build it from the "
            "same corpus, in the same order.")


def _check_corpus(
    embeddings: np.ndarray, ids: Sequence[str], spec: Mapping[str, Any], max_k: int
) -> None:
    if embeddings.ndim != 2 or not len(embeddings):
        raise ExportError(
            f"candidate embeddings must be a non-empty [num_candidates, dim] matrix, "
            f"received shape {list(embeddings.shape)}."
        )
    if len(ids) != len(embeddings):
        raise ExportError(
            f"got {len(ids)} candidate ids for {len(embeddings)} embeddings; "
            "they must match one to one."
        )
    if not np.isfinite(embeddings).all():
        raise ExportError("candidate embeddings contain NaN or infinite values; "
                          "the model diverged. Retrain with a lower learning rate.")
    seen: dict[str, int] = {}
    for row, cid in enumerate(ids):
        if not cid:
            raise ExportError("a candidate id is the empty string, which the "
                              "retrieval models use as padding; give it an id.")
        if cid in seen:
            raise ExportError(
                f"candidate id {cid!r} appears twice in the corpus (rows "
                f"{seen[cid]} and {row}); ids must be unique, or retrieval would "
                "return one id for two vectors. Deduplicate the corpus first "
                "(tfdssm.export.unique_candidates does, for a DataFrame).")
        seen[cid] = row
    clash = [n for n in spec if n in RESERVED_INPUTS]
    if clash:
        raise ExportError(
            f"query feature(s) {clash} clash with the retrieval inputs "
            f"{list(RESERVED_INPUTS)}; rename those columns."
        )
    if max_k < 1:
        raise ConfigError(f"max_k must be >= 1, received {max_k}.")


__all__ = [
    "BruteForceRetrieval",
    "DEFAULT_MAX_K",
    "RetrievalModule",
    "ScannRetrieval",
    "SignatureEncoder",
    "OVERSAMPLE",
    "excluded",
    "scann_options",
]
