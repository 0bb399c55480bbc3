"""Hard negatives: mined non-positive candidates fed to the retrieval task.

Each training row gets ``per_row`` extra candidates from the training corpus
(the documents of the training rows) that score high for its query but are not
its positive. :meth:`tfdssm.model.DSSM.compute_loss` embeds them with the
candidate tower and appends them to the in-batch candidates, so every row's
hard negatives are also negatives for every other row of the batch (as in DPR),
and appends their ids for accidental-hit removal: a mined candidate that shares
a row's positive id is masked for that row.

Two miners, both pure functions returning int32 ``[num_queries, m]`` corpus
indices, never the positive nor a candidate with the positive's id:

* :func:`mine_bm25`: BM25 (:class:`tfdssm.export.lexical.LexicalIndex`) of the query
  text against the documents' text; mined once before training.
* :func:`mine_dense`: exact dot products of the current towers' embeddings
  (ANCE-style self-mining); :class:`HardNegatives` re-mines every ``every``
  epochs. The first mining uses the initial (untrained) towers.

Feeding without rebuilding the model: the training dataset carries each row's
index (:data:`ROW_INDEX`); a ``tf.data`` map gathers the row's current
negatives from a non-trainable ``tf.Variable`` that the callback reassigns,
then gathers the candidate columns of those documents under
:data:`HARD_NEGATIVES`. Nothing of this reaches the model's config or the
exported towers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.data import readers as data
from tfdssm.errors import ConfigError
from tfdssm.export.lexical import LexicalIndex, tokenize
from tfdssm.features import Feature
from tfdssm.model.dssm import HARD_NEGATIVES  # batch key: candidate columns
from tfdssm.model.multihead import max_over_heads
from tfdssm.model.runner import embed
from tfdssm.training import HARD_NEGATIVES as MINING_MODES

logger = logging.getLogger("tfdssm")

MODES = MINING_MODES  # the option list, defined once in tfdssm.training
ROW_INDEX = "__hard_negative_row__"  # dataset column: index of the training row


def _codes(candidate_ids: Sequence[Any] | None, size: int) -> np.ndarray:
    """Integer code per document; equal codes = the same candidate id."""
    if candidate_ids is None:
        return np.arange(size, dtype=np.int64)
    ids = pd.Series(np.asarray(candidate_ids, dtype=object)).astype(str)
    if len(ids) != size:
        raise ConfigError(f"candidate_ids has {len(ids)} entries for {size} "
                          "documents.")
    return pd.factorize(ids)[0].astype(np.int64)


def _check(positives: np.ndarray, codes: np.ndarray, m: int) -> np.ndarray:
    if m < 1:
        raise ConfigError(f"the number of hard negatives per row must be >= 1, "
                          f"received {m}.")
    positives = np.asarray(positives, dtype=np.int64).reshape(-1)
    if len(positives) and not (0 <= positives.min() and positives.max() < len(codes)):
        raise ConfigError("positives must be indices into the corpus.")
    counts = np.bincount(codes)
    available = len(codes) - counts[codes[positives]]
    if len(available) and available.min() < m:
        raise ConfigError(
            f"{m} hard negative(s) per row need at least {m} corpus document(s) "
            f"whose id differs from the positive's; some rows have only "
            f"{int(available.min())}.")
    return positives


def top_non_positives(
    scores: np.ndarray, positive_codes: np.ndarray, codes: np.ndarray, m: int
) -> np.ndarray:
    """Indices of the ``m`` best-scoring documents whose code differs from the
    row's positive code, best first (ties: lower index first).

    Args:
        scores: float ``[batch, N]``.
        positive_codes: ``[batch]`` code of each row's positive.
        codes: ``[N]`` code of each document.
        m: Negatives per row.

    Returns:
        int32 ``[batch, m]``.
    """
    scores = np.where(codes[None, :] == positive_codes[:, None], -np.inf,
                      scores.astype(np.float64))
    if m < scores.shape[1]:
        part = np.argpartition(-scores, m - 1, axis=1)[:, :m]
    else:
        part = np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    top = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -top), axis=1)  # score descending, then index
    return np.take_along_axis(part, order, axis=1)[:, :m].astype(np.int32)


def bm25_scores(
    postings: Mapping[str, np.ndarray], queries: Sequence[np.ndarray],
    num_documents: int,
) -> np.ndarray:
    """What :class:`LexicalIndex` computes, in numpy, for mining (one pass, no graph).

    Args:
        postings: :func:`tfdssm.export.lexical.bm25_postings` (or a LexicalIndex's).
        queries: Word ids of each query (:func:`tfdssm.export.lexical.tokenize`).
        num_documents: Corpus size.

    Returns:
        float64 ``[len(queries), num_documents]`` BM25 scores.
    """
    terms, offsets = postings["terms"], postings["offsets"]
    lengths = np.array([len(q) for q in queries], np.int64)
    words = (np.concatenate(queries).astype(np.int64) if len(queries)
             else np.zeros([0], np.int64))
    row_of = np.repeat(np.arange(len(queries)), lengths)
    position = np.minimum(np.searchsorted(terms, words), len(terms) - 1)
    found = terms[position] == words
    starts = offsets[position]
    counts = np.where(found, offsets[position + 1] - starts, 0)
    total = int(counts.sum())
    # Posting indices: starts[i] .. starts[i] + counts[i] for every word i.
    first = np.repeat(starts - np.cumsum(counts) + counts, counts)
    posting = first + np.arange(total)
    rows = np.repeat(row_of, counts)
    flat = rows * num_documents + postings["docs"][posting]
    scores = np.bincount(flat, weights=postings["weights"][posting],
                         minlength=len(queries) * num_documents)
    return scores.reshape(len(queries), num_documents)


def mine_bm25(
    queries: Sequence[str],
    documents: Sequence[str],
    positives: Sequence[int],
    candidate_ids: Sequence[Any] | None = None,
    num_negatives: int = 1,
    batch_size: int = 256,
    index: LexicalIndex | None = None,
) -> np.ndarray:
    """The lexically best non-positive documents of each query (BM25).

    Args:
        queries: Query texts.
        documents: The corpus texts.
        positives: Corpus index of each query's positive.
        candidate_ids: Id of each document; documents with the positive's id
            are never returned. Default: every document is distinct.
        num_negatives: ``m``, negatives per query.
        batch_size: Queries scored at a time.
        index: A :class:`LexicalIndex` over ``documents`` (built if ``None``);
            its postings are scored in numpy (:func:`bm25_scores`).

    Returns:
        int32 ``[len(queries), m]`` corpus indices, best first.
    """
    codes = _codes(candidate_ids, len(documents))
    positives = _check(positives, codes, num_negatives)
    if len(positives) != len(queries):
        raise ConfigError(f"{len(queries)} queries but {len(positives)} positives.")
    start = time.perf_counter()
    if index is None:
        index = LexicalIndex.from_texts([str(d) for d in documents])
    postings = {n: getattr(index, n).numpy()
                for n in ("terms", "offsets", "docs", "weights")}
    tokens = tokenize([str(q) for q in queries], index.query_max_length)
    out = []
    for begin in range(0, len(tokens), batch_size):
        scores = bm25_scores(postings, tokens[begin:begin + batch_size],
                             index.num_documents)
        out.append(top_non_positives(
            scores, codes[positives[begin:begin + batch_size]], codes, num_negatives))
    logger.info("mining BM25 hard negatives for %d queries over %d documents took "
                "%.1f s", len(queries), len(documents), time.perf_counter() - start)
    return (np.concatenate(out) if out
            else np.zeros([0, num_negatives], np.int32))


def mine_dense(
    query_embeddings: np.ndarray,
    document_embeddings: np.ndarray,
    positives: Sequence[int],
    candidate_ids: Sequence[Any] | None = None,
    num_negatives: int = 1,
    batch_size: int = 1024,
) -> np.ndarray:
    """The best-scoring non-positive documents of each query (exact dot product).

    Args:
        query_embeddings: ``[Q, dim]`` (or ``[Q, heads, dim]``: best head).
        document_embeddings: ``[N, dim]``.
        positives, candidate_ids, num_negatives: As :func:`mine_bm25`.
        batch_size: Queries scored at a time.

    Returns:
        int32 ``[Q, m]`` corpus indices, best first.
    """
    documents = np.asarray(document_embeddings, np.float32)
    queries = np.asarray(query_embeddings, np.float32)
    codes = _codes(candidate_ids, len(documents))
    positives = _check(positives, codes, num_negatives)
    if len(positives) != len(queries):
        raise ConfigError(f"{len(queries)} queries but {len(positives)} positives.")
    out = [
        top_non_positives(max_over_heads(queries[b:b + batch_size], documents),
                          codes[positives[b:b + batch_size]], codes, num_negatives)
        for b in range(0, len(queries), batch_size)
    ]
    return (np.concatenate(out) if out
            else np.zeros([0, num_negatives], np.int32))


def _texts(frame: pd.DataFrame, names: Sequence[str]) -> list[str]:
    """The string columns ``names`` of each row, joined by spaces."""
    columns = [frame[n] for n in names if pd.api.types.is_string_dtype(frame[n])]
    if not columns:
        raise ConfigError(f"hard_negatives='bm25' needs text columns; {list(names)} "
                          "has none.")
    text = columns[0].astype(str)
    for column in columns[1:]:
        text = text + " " + column.astype(str)
    return text.tolist()


class HardNegatives(tf.keras.callbacks.Callback):
    """Mines hard negatives for the training rows and feeds them to ``fit``.

    Args:
        mode: ``"bm25"`` (mined once, at construction) or ``"self"`` (mined with
            the model's towers when training begins, then every ``every``
            epochs).
        model: The :class:`tfdssm.model.DSSM` being trained.
        train: The training rows, in the order of the dataset's row index.
        corpus: One row per candidate (candidate columns + ``candidate_id``).
        features: Specs of every column the model reads.
        candidate_id: Column identifying a candidate.
        per_row: Hard negatives per training row (``m``).
        every: ``self`` mode: re-mine after every ``every`` epochs.

    Attributes:
        indices: int32 ``tf.Variable`` ``[len(train), m]`` of indices into
            :attr:`corpus` (the training corpus: the candidates of ``train``).
        minings: How many times negatives were mined.
    """

    def __init__(
        self,
        mode: str,
        model: Any,
        train: pd.DataFrame,
        corpus: pd.DataFrame,
        features: Sequence[Feature],
        candidate_id: str,
        per_row: int = 1,
        every: int = 1,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"hard_negatives must be one of {MODES} or None, "
                              f"received {mode!r}.")
        if every < 1:
            raise ConfigError(f"hard_negatives_every must be >= 1, received {every}.")
        self.mode, self.per_row, self.every = mode, int(per_row), int(every)
        self.dssm = model
        self.train_rows = train.reset_index(drop=True)
        train_ids = self.train_rows[candidate_id].astype(str)
        keep = corpus[candidate_id].astype(str).isin(set(train_ids)).to_numpy()
        self.corpus = corpus[keep].reset_index(drop=True)
        position = {c: i for i, c in enumerate(self.corpus[candidate_id].astype(str))}
        self.positives = train_ids.map(position).to_numpy(np.int64)
        self.candidate_id = candidate_id
        self.ids = self.corpus[candidate_id].astype(str).to_numpy(object)
        _check(self.positives, _codes(self.ids, len(self.ids)), self.per_row)
        by_name: Mapping[str, Feature] = {f.name: f for f in features}
        self.query_features = [by_name[n] for n in model.query_tower.feature_names]
        self.candidate_features = [by_name[n]
                                   for n in model.candidate_tower.feature_names]
        names = list(dict.fromkeys([*model.candidate_tower.feature_names,
                                    candidate_id]))
        # The corpus's empty cells are the export's to report, once.
        arrays = data.to_feature_arrays(
            self.corpus, [by_name[n] for n in names if n in by_name], "the corpus",
            warn_empty=False)
        if candidate_id not in arrays:
            arrays[candidate_id] = self.ids.astype(str).astype(bytes)
        self.columns = {n: tf.constant(arrays[n]) for n in names}
        self.indices = tf.Variable(
            tf.zeros([len(self.train_rows), self.per_row], tf.int32),
            trainable=False, name="hard_negatives")
        self.minings = 0
        if mode == "bm25":
            self.assign(mine_bm25(
                _texts(self.train_rows, model.query_tower.feature_names),
                _texts(self.corpus, model.candidate_tower.feature_names),
                self.positives, self.ids, self.per_row))

    def assign(self, indices: np.ndarray) -> None:
        """Replaces the negatives that the next batches read."""
        self.indices.assign(np.asarray(indices, np.int32))
        self.minings += 1

    def mine_self(self) -> np.ndarray:
        """Negatives by the model's current towers (exact dot product)."""
        start = time.perf_counter()
        queries = embed(self.dssm.query_tower, data.to_feature_arrays(
            self.train_rows, self.query_features, "the training rows"))
        documents = embed(self.dssm.candidate_tower, data.to_feature_arrays(
            self.corpus, self.candidate_features, "the corpus", warn_empty=False))
        mined = mine_dense(queries, documents, self.positives, self.ids, self.per_row)
        logger.info("mining self hard negatives for %d queries over %d documents "
                    "took %.1f s", len(queries), len(documents),
                    time.perf_counter() - start)
        return mined

    def attach(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """Adds each batch's hard negatives to a dataset of batches that carry
        :data:`ROW_INDEX` (:func:`tfdssm.data.readers.make_dataset` with
        ``row_index=ROW_INDEX``); the row index is dropped."""
        indices, columns = self.indices, self.columns

        def add(batch: dict[str, tf.Tensor]) -> dict[str, Any]:
            batch = dict(batch)
            rows = batch.pop(ROW_INDEX)
            chosen = tf.reshape(tf.gather(indices, rows), [-1])
            batch[HARD_NEGATIVES] = {n: tf.gather(c, chosen)
                                     for n, c in columns.items()}
            return batch

        return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
            tf.data.AUTOTUNE)

    def describe(self) -> dict[str, Any]:
        """What ``export.json`` records."""
        return {"mode": self.mode, "per_row": self.per_row,
                **({"every": self.every} if self.mode == "self" else {}),
                "minings": self.minings, "corpus": len(self.corpus)}

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.mode == "self" and self.minings == 0:
            self.assign(self.mine_self())

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        last = (self.params or {}).get("epochs")
        if (self.mode == "self" and (epoch + 1) % self.every == 0
                and (last is None or epoch + 1 < last)):
            self.assign(self.mine_self())


__all__ = ["HARD_NEGATIVES", "MODES", "ROW_INDEX", "HardNegatives", "mine_bm25",
           "mine_dense", "top_non_positives", "bm25_scores"]
