"""Tests for tfdssm.recipes (movielens on a synthetic table, pairs)."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import math

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfdssm.errors import ConfigError, DataError, DataWarning
from tfdssm.model.towers import SharedTower, Tower
from tfdssm.recipes import movielens, pairs
from tfdssm.training.run import split_frame

# --------------------------------------------------------------------------- #
# movielens
# --------------------------------------------------------------------------- #


def _rows(frame: pd.DataFrame) -> list[tuple]:
    return sorted(map(tuple, frame.astype(str).to_numpy().tolist()))


def test_movielens_towers_have_the_user_and_movie_features(movielens_frame):
    prepared = movielens.prepare(interactions=movielens_frame(60), hidden=(8,), dim=4,
                                 num_buckets=100)
    model = prepared.model
    assert isinstance(model.query_tower, Tower)
    assert isinstance(model.candidate_tower, Tower)
    assert model.query_tower.feature_names == list(movielens.USER_COLUMNS)
    assert model.candidate_tower.feature_names == list(movielens.MOVIE_COLUMNS)
    kinds = {f.name: f.kind for f in prepared.features}
    assert kinds == {
        "user_id": "categorical", "age": "numeric", "gender": "categorical",
        "occupation": "categorical", "zip_prefix": "categorical",
        "movie_id": "categorical", "title": "text", "genres": "multi_valued",
        "year": "categorical"}
    by_name = {f.name: f for f in prepared.features}
    assert by_name["genres"].vocabulary == ("Action", "Comedy", "Drama", "Romance",
                                            "Sci-Fi", "War")
    train_users = tuple(sorted(set(prepared.train["user_id"])))
    assert by_name["user_id"].vocabulary == train_users
    assert by_name["age"].mean == pytest.approx(prepared.train["age"].mean())
    assert by_name["title"].num_buckets == 100
    assert (prepared.candidate_id, prepared.query_key) == ("movie_id", "user_id")
    assert model.candidate_id == "movie_id"


def test_movielens_corpus_has_one_row_per_movie(movielens_frame):
    frame = movielens_frame(60)
    prepared = movielens.prepare(interactions=frame, hidden=(8,), dim=4,
                                 num_buckets=100)
    corpus = prepared.corpus
    assert list(corpus.columns) == list(movielens.MOVIE_COLUMNS)
    assert len(corpus) == frame["movie_id"].nunique() == 10
    # numeric order of ids
    assert corpus["movie_id"].tolist() == [str(i) for i in range(1, 11)]
    titles = dict(zip(frame["movie_id"], frame["title"], strict=True))
    assert corpus["title"].tolist() == [titles[m] for m in corpus["movie_id"]]


def test_movielens_split_is_80_20(movielens_frame):
    frame = movielens_frame(60)
    prepared = movielens.prepare(interactions=frame, hidden=(8,), dim=4,
                                 num_buckets=100)
    assert (len(prepared.train), len(prepared.test)) == (48, 12)
    columns = list(movielens.USER_COLUMNS + movielens.MOVIE_COLUMNS)
    rebuilt = pd.concat([prepared.train, prepared.test])[columns]
    original = frame[columns].assign(age=frame["age"].astype(float))
    assert _rows(rebuilt) == _rows(original)
    assert prepared.train["age"].dtype == np.float32
    assert prepared.info["split"] == "random 80%/20%, seed 42"
    again = movielens.prepare(interactions=frame, hidden=(8,), dim=4, num_buckets=100)
    pd.testing.assert_frame_equal(again.test, prepared.test)  # seeded split


def test_movielens_one_epoch_metrics(movielens_export):
    _, prepared, result = movielens_export
    metrics = result["metrics"]
    for k in (10, 50, 100):
        for name in ("recall", "ndcg", "mrr"):
            assert 0.0 <= metrics[f"{name}@{k}"] <= 1.0
            assert 0.0 <= metrics[f"{name}@{k}_excl"] <= 1.0
    assert "recall@10_excl" in metrics and "auc" in metrics
    assert "num_queries_excl" not in metrics
    assert metrics["num_queries"] == len(prepared.test) == 12
    assert metrics["num_candidates"] == 10
    # 10 movies: every positive is in the top 10. Excluding seen movies never hurts.
    assert metrics["recall@10"] == 1.0
    for k in (10, 50, 100):
        assert metrics[f"mrr@{k}_excl"] >= metrics[f"mrr@{k}"] - 1e-12
    assert len(result["history"]["loss"]) == 1
    assert math.isfinite(result["history"]["loss"][0])
    assert result["export"]["training"]["pipeline"] == "movielens"


# --------------------------------------------------------------------------- #
# pairs
# --------------------------------------------------------------------------- #


def test_pairs_prepare_default_towers_and_corpus(pairs_frame):
    frame = pairs_frame(30)
    prepared = pairs.prepare(frame, num_buckets=200, hidden=(8, 6), dim=4)
    model = prepared.model
    # Shared by default (the text benchmark's choice), one tower's weights.
    assert isinstance(model.candidate_tower, SharedTower)
    assert model.candidate_tower.tower is model.query_tower
    assert model.query_tower.features[0].max_length == 1024
    assert model.query_tower.feature_names == ["query"]
    assert model.candidate_tower.feature_names == ["doc"]
    assert (model.query_tower.hidden, model.query_tower.output_dim) == ([6], 4)
    assert [f.name for f in prepared.features] == ["query", "doc"]
    assert prepared.candidate_id == "doc" and prepared.query_key is None
    assert sorted(prepared.corpus["doc"]) == sorted(set(frame["doc"]))
    assert (len(prepared.train), len(prepared.test)) == (27, 3)  # 10% held out


def test_pairs_prepare_separate_towers(pairs_frame):
    prepared = pairs.prepare(pairs_frame(20), "query", "doc", "doc_id",
                             num_buckets=200, hidden=(8,), dim=4, shared_towers=False)
    assert isinstance(prepared.model.candidate_tower, Tower)
    assert prepared.model.candidate_tower is not prepared.model.query_tower
    assert prepared.model.candidate_tower.feature_names == ["doc"]


def test_pairs_prepare_shared_towers(pairs_frame):
    prepared = pairs.prepare(pairs_frame(20), "query", "doc", "doc_id",
                             num_buckets=200, hidden=(8,), dim=4, shared_towers=True)
    query_tower = prepared.model.query_tower
    candidate_tower = prepared.model.candidate_tower
    assert isinstance(candidate_tower, SharedTower)
    assert candidate_tower.tower is query_tower
    assert candidate_tower.feature_names == ["doc"]
    texts = tf.constant(["same words", "Café 北京"])
    np.testing.assert_allclose(query_tower({"query": texts}),
                               candidate_tower({"doc": texts}), atol=1e-6)
    assert prepared.candidate_id == "doc_id"
    assert list(prepared.corpus.columns) == ["doc_id", "doc"]
    assert len(prepared.corpus) == 10
    assert prepared.info["shared_towers"] is True


def test_pairs_prepare_missing_text_becomes_empty(pairs_frame):
    frame = pairs_frame(12)
    frame.loc[3, "query"] = None
    frame.loc[5, "doc"] = np.nan
    prepared = pairs.prepare(frame, num_buckets=200, hidden=(8,), dim=4,
                             test_fraction=0)
    assert len(prepared.train) == 12
    assert "" in set(prepared.train["query"]) and "" in set(prepared.corpus["doc"])


def test_pairs_prepare_categorical_dtype_with_missing_cell(pairs_frame):
    frame = pairs_frame(20).astype("category")
    frame.loc[2, "query"] = None
    prepared = pairs.prepare(frame, num_buckets=50, hidden=(4,), dim=2)
    rows = pd.concat([prepared.train, prepared.test])
    assert len(rows) == 20 and (rows["query"] == "").sum() == 1


def test_pairs_prepare_rejects_clashing_candidate_ids():
    frame = pd.DataFrame({"query": ["a", "b"], "doc": ["one", "two"], "id": ["X", "X"]})
    with pytest.raises(DataError, match=r"candidate id 'X' in column 'id'"):
        pairs.prepare(frame, candidate_id_column="id", num_buckets=50, hidden=(4,),
                      dim=2)


def test_pairs_prepare_header_only():
    with pytest.raises(DataError, match="no rows"):
        pairs.prepare(pd.DataFrame({"query": [], "doc": []}), num_buckets=50,
                      hidden=(4,))


def test_pairs_prepare_same_columns():
    with pytest.raises(ConfigError, match="two different columns"):
        pairs.prepare(pd.DataFrame({"q": ["a"]}), "q", "q")


def test_pairs_prepare_candidate_id_column_equal_to_candidate_column(pairs_frame):
    prepared = pairs.prepare(pairs_frame(20), "query", "doc", "doc",
                             num_buckets=50, hidden=(4,), dim=2)
    assert prepared.candidate_id == "doc"
    assert list(prepared.corpus.columns) == ["doc"] and len(prepared.corpus) == 10


def test_split_frame_tiny_table_evaluates_on_training_rows():
    frame = pd.DataFrame({"x": range(5)})
    with pytest.warns(DataWarning, match="too few rows"):
        train, test = split_frame(frame, 0.2)
    assert train is frame and test is frame


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_frame_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="test_fraction"):
        split_frame(pd.DataFrame({"x": range(20)}), fraction)
