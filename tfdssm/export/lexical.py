"""BM25 over hashed words, computed in the graph with core TensorFlow ops.

The lexical half of a hybrid retrieval model (:mod:`tfdssm.export.index`). A word is
a run of letters, digits and combining marks (everything else, punctuation
included, separates words: ``os.path.join`` is three words), normalised by
:class:`tfdssm.text.normalize.TextNormalizer` (NFKC + casefold); each word is
identified by its 31-bit word hash (:func:`tfdssm.text.hashing.word_ngram_ids` with
``num_buckets = MODULUS``, so two different words share an id with probability
~1e-9). There is no stemming and no stop list: inverse document frequency
already weighs common words down to almost nothing.

The index is a posting list per word, sorted by word id::

    terms    int32 [V + 1]      distinct word ids of the corpus, ascending, then a
                                sentinel that no word hashes to
    offsets  int64 [V + 2]      postings of terms[t] are offsets[t]:offsets[t + 1]
    docs     int32 [nnz]        document of each posting
    weights  float32 [nnz]      its BM25 term weight

A posting's weight is Lucene's BM25 (also ``bm25s``'s default)::

    idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avg_len))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

and a query's score for a document is the sum of the weights of the query's
words in it (a word said twice counts twice). Scoring gathers only the
postings of the query's words, so its cost grows with how many documents
contain them, not with the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.text.hashing import MODULUS, word_ngram_ids
from tfdssm.text.normalize import PAD, TextNormalizer

LEXICAL_VERSION = 1
DEFAULT_K1 = 1.5
DEFAULT_B = 0.75
QUERY_MAX_LENGTH = 1024  # code points of a query that count
DOCUMENT_MAX_LENGTH = 16384  # code points of a document that are indexed
_SENTINEL = np.iinfo(np.int32).max  # word ids are < MODULUS = 2**31 - 1
_INDEX_BATCH = 256
# Anything but letters, digits and combining marks separates words (RE2 syntax;
# invalid UTF-8 is left to the normaliser, which replaces it).
_NOT_WORD = r"[^\p{L}\p{N}\p{M}]+"


class WordIds(tf.Module):
    """Text -> hashed word ids, the tokeniser of the lexical index.

    Call args:
        texts: string ``[batch]``.
        max_length: Static number of normalised code points read per text.

    Returns:
        ``(ids, valid)``: int32 ``[batch, max_length]`` word ids (0 where
        invalid) and bool ``[batch, max_length]``; word ``j`` of row ``i`` is at
        ``[i, j]``.

    >>> ids, valid = WordIds()(tf.constant(["New York, new york!"]), 32)
    >>> ids = ids.numpy()[0][valid.numpy()[0]]
    >>> len(ids), bool(ids[0] == ids[2]), bool(ids[1] == ids[3])
    (4, True, True)
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name)
        self.normalizer = TextNormalizer()

    def __call__(
        self, texts: tf.Tensor, max_length: int
    ) -> tuple[tf.Tensor, tf.Tensor]:
        return self.ids(self.code_points(texts, max_length))

    def code_points(self, texts: tf.Tensor, max_length: int) -> tf.Tensor:
        """int32 ``[batch, max_length]``: words kept, everything else a space."""
        texts = tf.strings.regex_replace(tf.reshape(texts, [-1]), _NOT_WORD, " ")
        return self.normalizer(texts, max_length)

    @staticmethod
    def ids(code_points: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(ids, valid)`` of :meth:`code_points`' words."""
        return word_ngram_ids(code_points, MODULUS, (1,))


def tokenize(
    texts: Iterable[str], max_length: int = DOCUMENT_MAX_LENGTH,
    batch_size: int = _INDEX_BATCH,
) -> list[np.ndarray]:
    """Hashed word ids of each text, in text order (the index's tokens).

    Args:
        texts: Documents or queries.
        max_length: Normalised code points read per text.
        batch_size: Texts per TensorFlow call.

    Returns:
        One int32 array per text.

    >>> [len(ids) for ids in tokenize(["a b c", "", "é"])]
    [3, 0, 1]
    """
    words = WordIds()

    @tf.function(reduce_retracing=True, autograph=False)
    def call(batch: tf.Tensor, length: int) -> tuple[tf.Tensor, ...]:
        code_points = words.code_points(batch, length)
        ids, valid = words.ids(code_points)
        return ids, valid, code_points[:, -1] != PAD  # filled: may go on

    texts = [str(t) for t in texts]
    out: list[np.ndarray] = [np.zeros([0], np.int32)] * len(texts)
    # Similar lengths batched together, each batch read to a power of two
    # above its longest text; a text that fills it is read again in full.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        longest = max(len(texts[i]) for i in chunk)
        length = min(max_length,
                     1 << max(5, (longest + longest // 4 + 8).bit_length()))
        ids, valid, full = (t.numpy() for t in call(
            tf.constant([texts[i] for i in chunk]), length))
        again = [i for i, f in zip(chunk, full, strict=True) if f]
        for i, row, mask in zip(chunk, ids, valid, strict=True):
            out[i] = row[mask]
        if again and length < max_length:
            ids, valid, _ = (t.numpy() for t in call(
                tf.constant([texts[i] for i in again]), max_length))
            for i, row, mask in zip(again, ids, valid, strict=True):
                out[i] = row[mask]
    return out


def bm25_postings(
    documents: Sequence[np.ndarray], k1: float = DEFAULT_K1, b: float = DEFAULT_B
) -> dict[str, np.ndarray]:
    """Posting lists with BM25 weights from tokenised documents.

    Args:
        documents: One array of word ids per document (:func:`tokenize`).
        k1: Term-frequency saturation.
        b: Length normalisation (0: none, 1: full).

    Returns:
        ``{"terms": int32 [V + 1], "offsets": int64 [V + 2], "docs": int32 [nnz],
        "weights": float32 [nnz]}`` as described in the module docstring.

    >>> p = bm25_postings([np.array([7, 7, 9]), np.array([9])])
    >>> p["terms"].tolist()[:-1], p["offsets"].tolist(), p["docs"].tolist()
    ([7, 9], [0, 1, 3, 3], [0, 0, 1])
    """
    if k1 < 0 or not 0 <= b <= 1:
        raise ConfigError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, received k1={k1}, "
                          f"b={b}.")
    num_docs = len(documents)
    lengths = np.array([len(d) for d in documents], np.float64)
    average = max(lengths.mean() if num_docs else 0.0, 1e-9)
    doc_of = np.repeat(np.arange(num_docs, dtype=np.int64), lengths.astype(np.int64))
    words = (np.concatenate(documents).astype(np.int64) if num_docs
             else np.zeros([0], np.int64))
    # One (term, doc) pair per distinct word of a document, with its count.
    pairs, tf_counts = np.unique(words * num_docs + doc_of, return_counts=True)
    terms_of, docs = np.divmod(pairs, max(num_docs, 1))
    terms, df = np.unique(terms_of, return_counts=True)
    idf = np.log1p((num_docs - df + 0.5) / (df + 0.5))
    term_index = np.searchsorted(terms, terms_of)
    tf_ = tf_counts.astype(np.float64)
    norm = k1 * (1.0 - b + b * lengths[docs] / average)
    weights = idf[term_index] * tf_ * (k1 + 1.0) / (tf_ + norm)
    offsets = np.concatenate([[0], np.cumsum(df), [len(docs)]]).astype(np.int64)
    return {
        "terms": np.append(terms, _SENTINEL).astype(np.int32),
        "offsets": offsets,
        "docs": docs.astype(np.int32),
        "weights": weights.astype(np.float32),
    }


class LexicalIndex(tf.Module):
    """BM25 scores of query texts against a fixed corpus, in the graph.

    Args:
        postings: Output of :func:`bm25_postings`.
        num_documents: Corpus size ``N`` (documents without words included).
        k1, b: The BM25 parameters the postings were built with (recorded).
        query_max_length: Normalised code points of a query that count.

    Call args:
        texts: string ``[batch]`` query texts.

    Returns:
        float32 ``[batch, N]`` BM25 scores (0 for a document sharing no word).

    >>> index = LexicalIndex.from_texts(["red apple", "green apple", "blue sky"])
    >>> scores = index(tf.constant(["apple", "sky sky", "zebra"])).numpy()
    >>> (scores[0] > 0).tolist(), bool(scores[1, 2] > 0), float(scores[2].max())
    ([True, True, False], True, 0.0)
    """

    def __init__(
        self,
        postings: dict[str, np.ndarray],
        num_documents: int,
        k1: float = DEFAULT_K1,
        b: float = DEFAULT_B,
        query_max_length: int = QUERY_MAX_LENGTH,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or "lexical_index")
        if num_documents < 1:
            raise ConfigError("a lexical index needs at least one document.")
        self.num_documents = int(num_documents)
        self.num_terms = int(len(postings["terms"]) - 1)
        self.num_postings = int(len(postings["docs"]))
        self.k1, self.b = float(k1), float(b)
        self.query_max_length = int(query_max_length)
        self.words = WordIds()
        self.terms = tf.Variable(postings["terms"], trainable=False, name="terms")
        self.offsets = tf.Variable(postings["offsets"], trainable=False,
                                   name="offsets")
        self.docs = tf.Variable(postings["docs"], trainable=False, name="docs")
        self.weights = tf.Variable(postings["weights"], trainable=False,
                                   name="weights")

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], k1: float = DEFAULT_K1, b: float = DEFAULT_B,
        max_length: int = DOCUMENT_MAX_LENGTH, **kwargs,
    ) -> LexicalIndex:
        """Tokenises and indexes a corpus (one text per document, in order)."""
        postings = bm25_postings(tokenize(texts, max_length), k1, b)
        return cls(postings, len(texts), k1, b, **kwargs)

    def __call__(self, texts: tf.Tensor) -> tf.Tensor:
        ids, valid = self.words(texts, self.query_max_length)
        batch = tf.shape(ids)[0]
        length = tf.shape(ids)[1]
        flat = tf.reshape(ids, [-1])
        position = tf.searchsorted(self.terms, flat, side="left")
        position = tf.minimum(position, tf.shape(self.terms)[0] - 1)
        found = tf.equal(tf.gather(self.terms, position), flat)
        found &= tf.reshape(valid, [-1])
        tokens = tf.cast(tf.where(found)[:, 0], tf.int32)  # query words in the corpus
        position = tf.gather(position, tokens)
        postings = tf.ragged.range(tf.gather(self.offsets, position),
                                   tf.gather(self.offsets, position + 1))
        posting = postings.flat_values  # [num_postings]: every posting once
        # The query word each posting belongs to (value_rowids is slow here).
        owner = tf.searchsorted(postings.row_splits[1:],
                                tf.range(tf.size(posting, out_type=tf.int64)),
                                side="right")
        row = tf.gather(tokens, owner) // length
        segment = row * self.num_documents + tf.gather(self.docs, posting)
        scores = tf.math.unsorted_segment_sum(
            tf.gather(self.weights, posting), segment, batch * self.num_documents)
        return tf.reshape(scores, [batch, self.num_documents])

    def describe(self) -> dict[str, object]:
        """What ``export.json`` records about the index."""
        return {"scorer": "bm25", "lexical_version": LEXICAL_VERSION,
                "k1": self.k1, "b": self.b, "num_terms": self.num_terms,
                "num_postings": self.num_postings,
                "tokens": "hashed words (NFKC + casefold, no stemming)"}


__all__ = ["LexicalIndex", "WordIds", "bm25_postings", "tokenize"]
