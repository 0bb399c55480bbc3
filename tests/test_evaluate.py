"""Tests for tfdssm.training.metrics: rank metrics against hand arithmetic and numpy."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import math

import numpy as np
import pytest
import tensorflow as tf

from tfdssm.errors import DataError
from tfdssm.features import NumericFeature
from tfdssm.model import runner
from tfdssm.model.towers import Tower
from tfdssm.training import metrics as evaluate
from tfdssm.training.metrics import rank_metrics

# Four candidates in 2-d and three queries (dot-product scores).
CANDIDATES = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0]], np.float32)
QUERIES = np.array([[1.0, 0.1], [1.0, 0.0], [0.3, 1.0]], np.float32)
POSITIVES = np.array([0, 1, 3])
# Scores            c0     c1     c2     c3     positive  rank (# strictly higher)
#   q0 = [1, 0.1]   1.0    0.1    0.55  -1.0    c0        0
#   q1 = [1, 0]     1.0    0.0    0.5   -1.0    c1        2 (c0, c2)
#   q2 = [0.3, 1]   0.3    1.0    0.65  -0.3    c3        3 (c0, c1, c2)
# ranks = [0, 2, 3]


def test_rank_metrics_hand_computed():
    m = rank_metrics(QUERIES, POSITIVES, CANDIDATES, ks=[1, 3, 4], auc_negatives=0)
    # K=1: only rank 0 hits.  recall = 1/3; ndcg = (1/log2(2))/3 = 1/3; mrr = (1/1)/3
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["mrr@1"] == pytest.approx(1 / 3)
    # K=3: ranks 0 and 2 hit.  recall = 2/3
    #   ndcg = (1/log2(0+2) + 1/log2(2+2)) / 3 = (1 + 0.5) / 3 = 0.5
    #   mrr  = (1/1 + 1/3) / 3 = 4/9
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx(0.5)
    assert m["mrr@3"] == pytest.approx(4 / 9)
    # K=4: all hit.  ndcg = (1 + 1/2 + 1/log2(5)) / 3
    #   mrr = (1 + 1/3 + 1/4) / 3 = 19/36
    assert m["recall@4"] == pytest.approx(1.0)
    assert m["ndcg@4"] == pytest.approx((1 + 0.5 + 1 / math.log2(5)) / 3)
    assert m["mrr@4"] == pytest.approx(19 / 36)
    assert m["num_queries"] == 3 and m["num_candidates"] == 4
    assert "auc" not in m  # auc_negatives=0 skips it


def test_rank_metrics_exclusion_hand_computed():
    # q0 excludes its own positive c0 (must be ignored): rank stays 0.
    # q1 excludes c3, which scores below the positive: rank stays 2.
    # q2 excludes c1 (above the positive) and c3 (its positive, ignored): rank 3 -> 2.
    exclude = [[0], [3], [1, 3]]
    m = rank_metrics(QUERIES, POSITIVES, CANDIDATES, exclude=exclude, ks=[1, 3],
                     auc_negatives=0)
    # ranks = [0, 2, 2]
    # K=1: recall = 1/3.  K=3: recall = 1; mrr = (1 + 1/3 + 1/3)/3 = 5/9;
    #   ndcg = (1 + 0.5 + 0.5)/3 = 2/3
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["mrr@3"] == pytest.approx(5 / 9)
    assert m["ndcg@3"] == pytest.approx(2 / 3)


def test_ties_with_the_positive_do_not_count_against_it():
    candidates = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    m = rank_metrics(candidates[[1]], np.array([1]), candidates, ks=[1],
                     auc_negatives=0)
    assert m["recall@1"] == 1.0  # c0 ties with the positive c1: not strictly higher


def _reference_ranks(queries, positives, candidates, exclude=None):
    """Rank of the positive = its position in a descending argsort of the scores."""
    scores = queries.astype(np.float64) @ candidates.T.astype(np.float64)
    ranks = []
    for row, pos in enumerate(positives):
        s = scores[row].copy()
        if exclude is not None:
            for j in exclude[row]:
                if j != pos:
                    s[j] = -np.inf
        order = np.argsort(-s, kind="stable")
        ranks.append(int(np.flatnonzero(order == pos)[0]))
    return np.array(ranks)


def _metrics_from_ranks(ranks, k):
    hit = ranks < k
    return {
        f"recall@{k}": hit.mean(),
        f"ndcg@{k}": np.where(hit, 1 / np.log2(ranks + 2), 0).mean(),
        f"mrr@{k}": np.where(hit, 1 / (ranks + 1), 0).mean(),
    }


@pytest.mark.parametrize("chunk", [512, 7])
def test_rank_metrics_match_numpy_argsort_reference(chunk):
    rng = np.random.default_rng(1)
    queries = rng.normal(size=[40, 6]).astype(np.float32)
    candidates = rng.normal(size=[30, 6]).astype(np.float32)
    positives = rng.integers(0, 30, size=40)
    ranks = _reference_ranks(queries, positives, candidates)
    assert len(set(ranks.tolist())) > 5  # a spread of ranks, not a degenerate case
    ks = [1, 5, 10, 30]
    m = rank_metrics(queries, positives, candidates, ks=ks, chunk=chunk,
                     auc_negatives=0)
    for k in ks:
        for name, value in _metrics_from_ranks(ranks, k).items():
            assert m[name] == pytest.approx(value, abs=1e-9), name


def test_rank_metrics_exclusion_matches_reference_and_never_drops_positive():
    rng = np.random.default_rng(2)
    queries = rng.normal(size=[25, 4]).astype(np.float32)
    candidates = rng.normal(size=[20, 4]).astype(np.float32)
    positives = rng.integers(0, 20, size=25)
    # Every query excludes 5 random candidates, and always lists its positive too.
    exclude = [list(rng.choice(20, 5, replace=False)) + [int(p)] for p in positives]
    plain = _reference_ranks(queries, positives, candidates)
    excl = _reference_ranks(queries, positives, candidates, exclude)
    scores = queries @ candidates.T
    for row, pos in enumerate(positives):
        above = sum(1 for j in set(exclude[row]) - {pos}
                    if scores[row, j] > scores[row, pos])
        assert excl[row] == plain[row] - above  # each excluded higher one: rank - 1
    assert (excl < plain).any()
    m = rank_metrics(queries, positives, candidates, exclude=exclude, ks=[1, 3, 20],
                     chunk=6, auc_negatives=0)
    for k in [1, 3, 20]:
        for name, value in _metrics_from_ranks(excl, k).items():
            assert m[name] == pytest.approx(value, abs=1e-9), name
    # Excluding everything (positive included) leaves the positive at rank 0.
    everything = [list(range(20))] * 25
    m = rank_metrics(queries, positives, candidates, exclude=everything, ks=[1],
                     auc_negatives=0)
    assert m["recall@1"] == 1.0


def test_auc_is_one_when_positive_scores_highest():
    rng = np.random.default_rng(3)
    candidates = rng.normal(size=[50, 8]).astype(np.float32)
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    positives = rng.integers(0, 50, size=30)
    queries = candidates[positives]  # cosine 1 with the positive, < 1 with the rest
    m = rank_metrics(queries, positives, candidates, ks=[1], auc_negatives=20)
    assert m["auc"] == 1.0
    assert m["recall@1"] == 1.0


def test_auc_is_zero_when_positive_scores_lowest():
    candidates = np.array([[1.0], [2.0], [3.0]], np.float32)
    m = rank_metrics(np.array([[1.0]], np.float32), np.array([0]), candidates,
                     ks=[1], auc_negatives=10)
    assert m["auc"] == 0.0


def test_auc_counts_ties_half():
    candidates = np.ones([5, 3], np.float32)
    m = rank_metrics(candidates[:2], np.array([0, 4]), candidates, ks=[1],
                     auc_negatives=8)
    assert m["auc"] == 0.5


def test_auc_is_about_half_for_random_embeddings():
    rng = np.random.default_rng(4)
    queries = rng.normal(size=[300, 8]).astype(np.float32)
    candidates = rng.normal(size=[400, 8]).astype(np.float32)
    positives = rng.integers(0, 400, size=300)
    m = rank_metrics(queries, positives, candidates, ks=[10], auc_negatives=200)
    assert m["auc"] == pytest.approx(0.5, abs=0.05)
    # Sampled AUC estimates the exact per-query AUC 1 - rank / (n - 1).
    ranks = _reference_ranks(queries, positives, candidates)
    assert m["auc"] == pytest.approx(np.mean(1 - ranks / 399), abs=0.02)


def test_auc_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    queries = rng.normal(size=[10, 4]).astype(np.float32)
    candidates = rng.normal(size=[30, 4]).astype(np.float32)
    positives = rng.integers(0, 30, size=10)
    first = rank_metrics(queries, positives, candidates, seed=7)
    again = rank_metrics(queries, positives, candidates, seed=7)
    assert first == again


@pytest.mark.parametrize(
    "num_queries, positives, match",
    [
        (3, [0, 1], "3 queries and 2 positives"),
        (0, [], "at least one query"),
        (2, [0, 4], "outside the candidate corpus"),
        (2, [-1, 0], "outside the candidate corpus"),
    ],
)
def test_rank_metrics_errors(num_queries, positives, match):
    queries = np.zeros([num_queries, 2], np.float32)
    with pytest.raises(DataError, match=match):
        rank_metrics(queries, np.array(positives, dtype=np.int64), CANDIDATES)


def test_embed_batches_a_tower_and_equals_one_call():
    tower = Tower([NumericFeature("x")], hidden=(4,), output_dim=3)
    arrays = {"x": np.arange(7, dtype=np.float32), "ignored": np.zeros(7)}
    chunked = runner.embed(tower, arrays, batch_size=3)
    whole = tower({"x": tf.constant(arrays["x"])}).numpy()
    assert chunked.shape == (7, 3) and chunked.dtype == np.float32
    np.testing.assert_allclose(chunked, whole, atol=1e-6)


def test_embed_empty_table_is_an_error():
    tower = Tower([NumericFeature("x")], hidden=(4,), output_dim=3)
    with pytest.raises(DataError, match="no rows"):
        runner.embed(tower, {"x": np.zeros([0], np.float32)})


def test_format_metrics_one_aligned_line_per_metric():
    text = evaluate.format_metrics({"recall@10": 0.25, "num_queries": 3})
    assert text.splitlines() == ["  recall@10       0.2500", "  num_queries     3"]


def test_retrieval_metrics_compare_non_ascii_ids_as_text():
    # A SavedModel's top_k returns UTF-8 bytes; the ids are documents here
    # (the pairs default) and often not ASCII.
    served = np.array([["café au lait".encode(), "naïve".encode()],
                       [b"x", "—dash".encode()]], dtype=object)

    def top_k(query, k):
        return {"ids": tf.constant(served[: len(query), : int(k[0])])}

    got = evaluate.retrieval_metrics(top_k, {"query": np.array(["a", "b"])},
                                     ["naïve", "nothing"], ks=(1, 2))
    assert got["recall@1"] == 0.0 and got["recall@2"] == 0.5
    assert got["mrr@2"] == 0.25
