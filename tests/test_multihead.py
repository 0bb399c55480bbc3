"""Tests for tfdssm.model.multihead: K query vectors per user, max over heads."""

from __future__ import annotations

import json
import pathlib

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pytest
import tensorflow as tf

from tfdssm import export
from tfdssm.errors import ConfigError
from tfdssm.export import candidates as candidate_files
from tfdssm.features import CategoricalFeature, NumericFeature
from tfdssm.model import multihead
from tfdssm.model.dssm import DSSM
from tfdssm.model.multihead import MultiHeadTower
from tfdssm.model.towers import Tower
from tfdssm.retrieve import LocalRetriever
from tfdssm.training import metrics as evaluate
from tfdssm.training import run as train

USERS = tuple(f"u{i}" for i in range(6))


def user_tower(num_heads: int = 3) -> MultiHeadTower:
    return MultiHeadTower([CategoricalFeature("user", USERS, 4), NumericFeature("age")],
                          num_heads=num_heads, hidden=(8,), output_dim=5,
                          name="user_tower")


def reference_top_k(queries, candidates, k, exclude=None):
    """Brute force: every candidate scored by its best head, sorted."""
    scores = np.einsum("bhd,nd->bhn", queries, candidates).max(axis=1)
    if exclude is not None:
        for row, drop in enumerate(exclude):
            scores[row, list(drop)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_tower_shape_per_head_normalisation_and_config_round_trip():
    tower = user_tower()
    inputs = {"user": tf.constant(["u1", "u2"]), "age": tf.constant([20.0, 30.0])}
    out = tower(inputs).numpy()
    assert out.shape == (2, 3, 5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(out[:, 0], out[:, 1])  # the heads differ
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(tower))
    assert isinstance(clone, MultiHeadTower) and clone.num_heads == 3
    assert clone.get_config() == tower.get_config()
    clone(inputs)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(inputs), out, atol=1e-6)
    plain = Tower([CategoricalFeature("user", USERS, 4)], hidden=(8,), output_dim=5)
    assert MultiHeadTower.from_tower(plain, 2)({"user": tf.constant(["u0"])}).shape == (
        1, 2, 5)
    with pytest.raises(ConfigError, match="num_heads must be >= 1"):
        user_tower(0)
    head = tower.output_layer
    assert isinstance(head, multihead.HeadProjection)
    assert multihead.HeadProjection.from_config(head.get_config()).get_config() == (
        head.get_config())


def test_union_of_head_top_k_equals_brute_force():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=[40, 4, 8]).astype(np.float32)
    candidates = rng.normal(size=[300, 8]).astype(np.float32)
    exclude = [rng.choice(300, 5, replace=False).tolist() for _ in range(40)]
    for k, drop in ((10, None), (25, exclude), (300, None)):
        top, scores = multihead.union_top_k(queries, candidates, k, drop)
        want_top, want_scores = reference_top_k(queries, candidates, k, drop)
        np.testing.assert_array_equal(top, want_top)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    # Excluding all but 3 candidates pads the rest with -1 / -inf.
    top, scores = multihead.union_top_k(queries[:1], candidates, 5,
                                        [list(range(3, 300))])
    assert top[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    with pytest.raises(ConfigError, match="k must be between 1"):
        multihead.union_top_k(queries, candidates, 301)


def test_search_heads_dedupes_candidates_found_by_several_heads():
    candidates = tf.constant(np.eye(4, dtype=np.float32))

    def search(queries, n):
        best = tf.math.top_k(tf.matmul(queries, candidates, transpose_b=True), n)
        return best.values, best.indices

    # Both heads find candidate 0; head 1 scores it higher.
    queries = tf.constant([[[0.5, 0.4, 0.0, 0.0], [0.9, 0.0, 0.3, 0.0]]])
    scores, indices = multihead.search_heads(search, queries, tf.constant(2))
    kept = {int(i): float(s) for i, s in zip(indices[0], scores[0], strict=True)
            if not np.isnan(s)}
    assert kept == pytest.approx({0: 0.9, 1: 0.4, 2: 0.3})
    flat_scores, _ = multihead.search_heads(search, queries[:, 0], tf.constant(2))
    assert flat_scores.shape == (1, 2)


def test_rank_metrics_score_by_the_best_head():
    queries = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    candidates = np.array([[0.2, 0.1], [0.0, 0.9], [0.8, 0.0]], np.float32)
    metrics = evaluate.rank_metrics(queries, np.array([2]), candidates, ks=[1, 2],
                                    auc_negatives=0)
    assert metrics["recall@1"] == 0.0 and metrics["recall@2"] == 1.0  # 0.9 > 0.8
    # The positive wins only through head 1 (0.8 vs 0.5 and 0.6): AUC 1; head 0
    # alone would give 0, the mean of the heads 0.5.
    candidates = np.array([[0.5, 0.5], [0.6, 0.0], [0.0, 0.8]], np.float32)
    metrics = evaluate.rank_metrics(queries, np.array([2]), candidates, ks=[1],
                                    auc_negatives=10)
    assert metrics["recall@1"] == 1.0 and metrics["auc"] == 1.0


def test_training_loss_is_max_over_heads():
    """DSSM's in-batch loss on [B, K, d] queries scores by the best head."""
    tower = user_tower(2)
    items = Tower([CategoricalFeature("item", USERS, 4)], hidden=(), output_dim=5)
    model = DSSM(tower, items, temperature=0.5)
    batch = {"user": tf.constant(["u0", "u1", "u2"]), "age": tf.constant([1., 2., 3.]),
             "item": tf.constant(["u3", "u4", "u5"])}
    q, c = tower(batch).numpy(), items(batch).numpy()
    scores = np.einsum("bhd,nd->bhn", q, c).max(axis=1) / 0.5
    want = sum(np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(scores))
    assert float(model.compute_loss(batch)) == pytest.approx(want, rel=1e-5)
    for loss in ("paper", "triplet"):
        value = DSSM(tower, items, loss=loss).compute_loss(batch)
        assert np.isfinite(float(value))


@pytest.fixture(scope="module")
def multihead_export(tmp_path_factory, movielens_frame):
    from tfdssm.recipes import movielens

    prepared = movielens.prepare(interactions=movielens_frame(80), hidden=(16,), dim=8,
                                 num_buckets=300, num_heads=3, verbose=False)
    export_dir = tmp_path_factory.mktemp("multihead_export")
    result = train.run(prepared, None, epochs=1, batch_size=16, verbose=0, max_k=5)
    info = export.export_model(prepared.model, export_dir, corpus=prepared.corpus,
                               max_k=5)  # with query_tower.tflite (or why not)
    return export_dir, prepared, result, info


def queries_of(prepared, rows: int = 6) -> dict[str, np.ndarray]:
    test = prepared.test.head(rows)
    return {"user_id": test["user_id"].astype(str).to_numpy(object),
            "age": test["age"].to_numpy(np.float32),
            "gender": test["gender"].astype(str).to_numpy(object),
            "occupation": test["occupation"].astype(str).to_numpy(object),
            "zip_prefix": test["zip_prefix"].astype(str).to_numpy(object)}


def test_export_load_same_outputs(multihead_export):
    export_dir, prepared, result, info = multihead_export
    assert info["num_heads"] == 3 and info["training"] == {}
    assert json.loads((export_dir / "export.json").read_text())["num_heads"] == 3
    assert "recall@10" in result["metrics"]
    towers = export.load_towers(export_dir)
    queries = queries_of(prepared)
    got = towers.signatures["query"](**{k: tf.constant(v) for k, v in queries.items()})
    want = prepared.model.query_tower({k: tf.constant(v) for k, v in queries.items()})
    assert got["embedding"].shape == (6, 3, 8)
    np.testing.assert_allclose(got["embedding"], want, atol=1e-6)


def test_retrieval_models_and_local_retriever_match_brute_force(multihead_export):
    export_dir, prepared, _, _ = multihead_export
    candidates, ids = candidate_files.read_candidates(export_dir)
    queries = queries_of(prepared)
    embedded = prepared.model.query_tower(
        {k: tf.constant(v) for k, v in queries.items()}).numpy()
    want_top, want_scores = reference_top_k(embedded, candidates, 5)
    want_ids = np.asarray(ids, dtype=object)[want_top]
    for name in ("retrieval_brute_force", "retrieval"):
        if name == "retrieval":
            import scann  # noqa: F401  - registers ScaNN's ops
        model = tf.saved_model.load(str(next((export_dir / name).iterdir())))
        out = model.signatures["top_k"](
            **{k: tf.constant(v) for k, v in queries.items()},
            k=tf.fill([len(embedded)], 5))
        got = np.vectorize(lambda b: b.decode())(out["ids"].numpy())
        np.testing.assert_array_equal(got, want_ids)
        np.testing.assert_allclose(out["scores"], want_scores, rtol=1e-5, atol=1e-6)
    retriever = LocalRetriever(export_dir)
    got_ids, got_scores = retriever.top_k({k: list(v) for k, v in queries.items()}, k=5)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
    # Exclusion drops the best id and shifts the rest up.
    first = [[str(row[0])] for row in want_ids]
    excluded, _ = retriever.top_k({k: list(v) for k, v in queries.items()}, k=4,
                                  exclude=first)
    np.testing.assert_array_equal(excluded, want_ids[:, 1:5])


def test_tflite_multi_head_parity(multihead_export):
    export_dir, _, _, info = multihead_export
    assert info["tflite"]["parity"]["max_abs_diff"] <= 1e-5
    spec = json.loads((pathlib.Path(export_dir) / "query_tower.json").read_text())
    assert spec["output"]["shape"] == [1, 3, 8]
