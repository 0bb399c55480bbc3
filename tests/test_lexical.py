"""BM25 over hashed words (tfdssm.lexical) against a plain Python BM25."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import math

import numpy as np
import pytest
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.export import lexical

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A quick brown dog; a QUICK fox!",
    "Lazy afternoons, lazy dogs.",
    "",
    "os.path.join joins path components",
    "Ünïcödé café naïve résumé",
]
QUERIES = ["quick fox", "lazy lazy dog", "path join", "café", "nothing matches",
           "", "the the the"]


def reference_bm25(docs: list[list[int]], query: list[int], k1: float, b: float
                   ) -> list[float]:
    """Lucene BM25, written out term by term (the formula in tfdssm.lexical)."""
    n = len(docs)
    average = sum(len(d) for d in docs) / n
    scores = []
    for doc in docs:
        total = 0.0
        for term in query:
            if term not in doc:
                continue
            df = sum(term in d for d in docs)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf_ = doc.count(term)
            total += idf * tf_ * (k1 + 1) / (tf_ + k1 * (1 - b + b * len(doc) / average))
        scores.append(total)
    return scores


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (1.2, 0.0), (0.9, 1.0)])
def test_scores_match_a_reference_bm25(k1, b):
    docs = [list(map(int, d)) for d in lexical.tokenize(CORPUS)]
    index = lexical.LexicalIndex.from_texts(CORPUS, k1=k1, b=b)
    got = index(tf.constant(QUERIES)).numpy()
    for row, query in enumerate(lexical.tokenize(QUERIES)):
        want = reference_bm25(docs, list(map(int, query)), k1, b)
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-5)


def test_words_are_case_accent_and_punctuation_insensitive_as_normalised():
    ids = lexical.tokenize(["QUICK, quick!", "os.path.join", "ＣＡＦＥ cafe"])
    assert len(ids[0]) == 2 and ids[0][0] == ids[0][1]
    assert len(ids[1]) == 3
    assert ids[2][0] == ids[2][1]  # NFKC folds full-width letters


def test_a_query_sharing_no_word_scores_zero_everywhere():
    index = lexical.LexicalIndex.from_texts(CORPUS)
    scores = index(tf.constant(["zebra", "", "!!!"])).numpy()
    assert scores.shape == (3, len(CORPUS)) and not scores.any()


def test_a_repeated_query_word_counts_twice():
    index = lexical.LexicalIndex.from_texts(CORPUS)
    once, twice = index(tf.constant(["lazy", "lazy lazy"])).numpy()
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-6)


def test_postings_layout():
    postings = lexical.bm25_postings([np.array([5, 3, 5]), np.array([], np.int32),
                                      np.array([3])])
    assert postings["terms"].tolist()[:-1] == [3, 5]
    assert postings["offsets"].tolist() == [0, 2, 3, 3]
    assert postings["docs"].tolist() == [0, 2, 0]
    assert (postings["weights"] > 0).all()


def test_bad_parameters_are_refused():
    with pytest.raises(ConfigError, match="k1 >= 0 and 0 <= b <= 1"):
        lexical.bm25_postings([np.array([1])], k1=1.0, b=1.5)
    with pytest.raises(ConfigError, match="at least one document"):
        lexical.LexicalIndex(lexical.bm25_postings([]), 0)


def test_saved_and_reloaded_index_scores_the_same(tmp_path):
    index = lexical.LexicalIndex.from_texts(CORPUS)
    module = tf.Module()
    module.index = index
    module.score = tf.function(lambda t: index(t),
                               input_signature=[tf.TensorSpec([None], tf.string)])
    tf.saved_model.save(module, str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    np.testing.assert_allclose(loaded.score(tf.constant(QUERIES)).numpy(),
                               index(tf.constant(QUERIES)).numpy(), rtol=1e-6)


def test_tokenize_reads_every_text_in_full_whatever_its_batch():
    # Short and long texts batched together, a text that expands under NFKC
    # (U+FDFA is 18 code points) and one longer than its batch's first read.
    texts = ["a b", "ﷺ" * 40, "x" * 3000 + " y z", "", "short one"] * 3
    words = lexical.WordIds()
    for max_length in (64, 16384):
        got = lexical.tokenize(texts, max_length=max_length, batch_size=4)
        for text, ids in zip(texts, got, strict=True):
            want, valid = words(tf.constant([text]), max_length)
            np.testing.assert_array_equal(ids, want.numpy()[0][valid.numpy()[0]])
