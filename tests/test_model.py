"""Tests for tfdssm.model.DSSM: training, losses, configuration and weights."""

from __future__ import annotations

import json

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pytest
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.features import CategoricalFeature, NumericFeature, TextFeature
from tfdssm.model import runner
from tfdssm.model.dssm import DSSM
from tfdssm.model.sampling import NegativeSampler
from tfdssm.model.towers import SharedTower, Tower, paper_tower
from tfdssm.training import metrics as evaluate

# --------------------------------------------------------------------------- #
# A tiny learnable retrieval task.
#
# 100 items; each is described by 3 of 100 "concepts". An item's title spells
# its concepts with words over the letters a-m, a query spells 2 of them with
# *different* words over n-z. Queries and titles share no letter trigram, so an
# untrained model is at chance and only training can link the two vocabularies.
# --------------------------------------------------------------------------- #

NUM_ITEMS = 100
NUM_CONCEPTS = 100


class Task:
    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)

        def word(letters: str) -> str:
            return "".join(rng.choice(list(letters), 5))

        item_words = [word("abcdefghijklm") for _ in range(NUM_CONCEPTS)]
        query_words = [word("nopqrstuvwxyz") for _ in range(NUM_CONCEPTS)]
        concepts = np.stack(
            [rng.choice(NUM_CONCEPTS, 3, replace=False) for _ in range(NUM_ITEMS)]
        )
        self.titles = np.array([" ".join(item_words[c] for c in cs) for cs in concepts],
                               dtype=object)
        self.ids = np.array([f"item{i}" for i in range(NUM_ITEMS)], dtype=object)

        def queries(n: int) -> tuple[np.ndarray, np.ndarray]:
            items = rng.integers(0, NUM_ITEMS, n)
            texts = [" ".join(query_words[c] for c in rng.permutation(concepts[i])[:2])
                     for i in items]
            return items, np.array(texts, dtype=object)

        items, texts = queries(600)
        self.train = {"query": texts, "title": self.titles[items],
                      "item_id": self.ids[items]}
        self.test_items, self.test_queries = queries(300)

    def dataset(self, batch_size: int = 100) -> tf.data.Dataset:
        return (tf.data.Dataset.from_tensor_slices(self.train)
                .shuffle(len(self.train["query"]), seed=0).batch(batch_size))

    def recall_at_10(self, model: DSSM) -> float:
        queries = runner.embed(model.query_tower, {"query": self.test_queries})
        candidates = runner.embed(model.candidate_tower, {"title": self.titles})
        metrics = evaluate.rank_metrics(
            queries, self.test_items, candidates, ks=[10], auc_negatives=0
        )
        assert metrics["num_candidates"] == NUM_ITEMS
        return metrics["recall@10"]

    def mean_loss(self, model: DSSM) -> float:
        batches = tf.data.Dataset.from_tensor_slices(self.train).take(300).batch(100)
        return float(np.mean([model.compute_loss(b).numpy() for b in batches]))


@pytest.fixture(scope="module")
def task() -> Task:
    return Task()


CHANCE = 10 / NUM_ITEMS


def _text_towers(dim: int = 32) -> tuple[Tower, Tower]:
    query = Tower([TextFeature("query", num_buckets=1000, embedding_dim=dim)],
                  hidden=(), output_dim=dim, name="query_tower")
    candidate = Tower([TextFeature("title", num_buckets=1000, embedding_dim=dim)],
                      hidden=(), output_dim=dim, name="candidate_tower")
    return query, candidate


def test_in_batch_model_learns_the_task(task):
    tf.keras.utils.set_random_seed(0)
    model = DSSM(*_text_towers(), candidate_id="item_id", remove_accidental_hits=True)
    before_recall, before_loss = task.recall_at_10(model), task.mean_loss(model)
    assert before_recall < 3 * CHANCE  # untrained: no shared trigrams
    model.compile(optimizer=tf.keras.optimizers.Adam(0.03))
    history = model.fit(task.dataset(), epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after_recall, after_loss = task.recall_at_10(model), task.mean_loss(model)
    assert after_recall >= 5 * CHANCE, (before_recall, after_recall)
    assert after_loss < 0.6 * before_loss, (before_loss, after_loss)


def test_paper_loss_model_learns_the_task(task):
    tf.keras.utils.set_random_seed(0)
    query = paper_tower("query", num_buckets=1000, hidden=(32,), output_dim=32)
    candidate = paper_tower("title", num_buckets=1000, hidden=(32,), output_dim=32)
    model = DSSM(query, candidate, loss="paper")
    before_recall, before_loss = task.recall_at_10(model), task.mean_loss(model)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.03))
    history = model.fit(task.dataset(), epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after_recall, after_loss = task.recall_at_10(model), task.mean_loss(model)
    assert after_recall >= 5 * CHANCE, (before_recall, after_recall)
    assert after_loss < 0.6 * before_loss, (before_loss, after_loss)


def test_mixed_negatives_logq_hits_and_hard_negatives_train(task):
    tf.keras.utils.set_random_seed(0)
    counts = {i: 0 for i in task.ids}
    for item in task.train["item_id"]:
        counts[item] += 1
    total = sum(counts.values())
    probabilities = {k: max(v, 1) / total for k, v in counts.items()}
    sampler = NegativeSampler(
        {"item_id": task.ids, "title": task.titles}, 32, distribution="popularity",
        counts=np.array([counts[i] for i in task.ids]), seed=0,
    )
    model = DSSM(
        *_text_towers(16), candidate_id="item_id", remove_accidental_hits=True,
        candidate_probabilities=probabilities, negative_sampler=sampler,
        num_hard_negatives=20,
    )
    state = sampler._generator.state.numpy().copy()
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    small = {k: v[:300] for k, v in task.train.items()}
    history = model.fit(
        tf.data.Dataset.from_tensor_slices(small).batch(100), epochs=2, verbose=0
    )
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    # The sampler was used by the training step (its generator advanced).
    assert not np.array_equal(sampler._generator.state.numpy(), state)
    batch = {k: tf.constant(v[:50]) for k, v in task.train.items()}
    assert np.isfinite(model.compute_loss(batch, training=True).numpy())
    assert np.isfinite(model.compute_loss(batch, training=False).numpy())


# --------------------------------------------------------------------------- #
# The in-batch loss against numpy.
# --------------------------------------------------------------------------- #


def _small_towers(normalize: bool = True) -> tuple[Tower, Tower]:
    query = Tower([TextFeature("query", num_buckets=50, embedding_dim=6)],
                  hidden=(), output_dim=4, normalize=normalize)
    candidate = Tower([TextFeature("title", num_buckets=50, embedding_dim=6)],
                      hidden=(), output_dim=4, normalize=normalize)
    return query, candidate


BATCH = {
    "query": tf.constant(["red shoe", "blue hat", "red hat", "green sock", "shoe"]),
    "title": tf.constant(["shoe red", "hat blue", "hat blue", "sock", "shoe red"]),
    "item_id": tf.constant(["s", "h", "h", "k", "s"]),
}


def _sum_ce(logits: np.ndarray, positive: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float((lse - logits[np.arange(len(logits)), positive]).sum())


def _embeddings(model: DSSM, batch=BATCH) -> tuple[np.ndarray, np.ndarray]:
    return (model.query_tower(batch).numpy().astype(np.float64),
            model.candidate_tower(batch).numpy().astype(np.float64))


def _duplicates(ids: list[str], num_queries: int) -> np.ndarray:
    ids = np.asarray(ids)
    mask = ids[:num_queries, None] == ids[None, :]
    mask[np.arange(num_queries), np.arange(num_queries)] = False
    return mask


def test_in_batch_loss_matches_numpy():
    model = DSSM(*_small_towers(), temperature=0.2)
    q, c = _embeddings(model)
    want = _sum_ce(q @ c.T / 0.2, np.arange(5))
    got = float(model.compute_loss(BATCH))
    assert got == pytest.approx(want, rel=1e-4)


def test_remove_accidental_hits_matches_numpy():
    model = DSSM(*_small_towers(), candidate_id="item_id",
                 remove_accidental_hits=True, temperature=0.1)
    q, c = _embeddings(model)
    scores = q @ c.T / 0.1
    plain = _sum_ce(scores, np.arange(5))
    scores[_duplicates(["s", "h", "h", "k", "s"], 5)] = -1e30
    want = _sum_ce(scores, np.arange(5))
    got = float(model.compute_loss(BATCH))
    assert got == pytest.approx(want, rel=1e-4)
    assert abs(want - plain) > 1e-3  # the batch does contain accidental hits


def test_logq_correction_matches_numpy():
    probabilities = {"s": 0.1, "h": 0.02, "k": 0.15}  # batch * p stays below 1
    model = DSSM(*_small_towers(), candidate_id="item_id", temperature=0.1,
                 candidate_probabilities=probabilities)
    q, c = _embeddings(model)
    p = np.array([probabilities[i] for i in ["s", "h", "h", "k", "s"]])
    want = _sum_ce(q @ c.T / 0.1 - np.log(5 * p)[None, :], np.arange(5))
    got = float(model.compute_loss(BATCH))
    assert got == pytest.approx(want, rel=1e-4)
    # Uniform probabilities shift every logit equally: the same loss as none.
    uniform = DSSM(model.query_tower, model.candidate_tower, candidate_id="item_id",
                   temperature=0.1, candidate_probabilities={"s": 0.1, "h": 0.1})
    none = DSSM(model.query_tower, model.candidate_tower, temperature=0.1)
    assert float(uniform.compute_loss(BATCH)) == pytest.approx(
        float(none.compute_loss(BATCH)), rel=1e-5)
    assert abs(got - float(none.compute_loss(BATCH))) > 1e-3


def test_logq_correction_for_popular_candidates_matches_numpy():
    probabilities = {"s": 0.6, "h": 0.3, "k": 0.1}  # 5 * p > 1 for s and h
    model = DSSM(*_small_towers(), candidate_id="item_id", temperature=0.1,
                 candidate_probabilities=probabilities)
    q, c = _embeddings(model)
    p = np.array([probabilities[i] for i in ["s", "h", "h", "k", "s"]])
    want = _sum_ce(q @ c.T / 0.1 - np.log(p)[None, :], np.arange(5))
    assert float(model.compute_loss(BATCH)) == pytest.approx(want, rel=1e-4)


def test_hard_negatives_match_numpy():
    model = DSSM(*_small_towers(), num_hard_negatives=2, temperature=0.5)
    q, c = _embeddings(model)
    scores = q @ c.T / 0.5
    kept = []
    for i, row in enumerate(scores):
        negatives = np.sort(np.delete(row, i))[::-1][:2]
        kept.append(np.concatenate([[row[i]], negatives]))
    want = _sum_ce(np.array(kept), np.zeros(5, int))
    assert float(model.compute_loss(BATCH)) == pytest.approx(want, rel=1e-4)


def test_mixed_negatives_loss_matches_numpy(monkeypatch):
    extra = {"title": tf.constant(["sock", "scarf", "hat blue"]),
             "item_id": tf.constant(["k", "f", "h"])}
    sampler = NegativeSampler({k: v.numpy() for k, v in extra.items()}, 3)
    drawn = tf.constant([0.05, 0.1, 0.2])
    monkeypatch.setattr(sampler, "sample", lambda: (extra, drawn))
    probabilities = {"s": 0.1, "h": 0.02, "k": 0.15, "f": 0.01}
    model = DSSM(*_small_towers(), candidate_id="item_id", temperature=0.1,
                 remove_accidental_hits=True, candidate_probabilities=probabilities,
                 negative_sampler=sampler)
    q, c = _embeddings(model)
    c_extra = model.candidate_tower(extra).numpy().astype(np.float64)
    ids = ["s", "h", "h", "k", "s", "k", "f", "h"]
    expected = np.concatenate([5 * np.array([probabilities[i] for i in ids[:5]]),
                               3 * drawn.numpy()])
    scores = q @ np.concatenate([c, c_extra]).T / 0.1 - np.log(expected)[None, :]
    scores[_duplicates(ids, 5)] = -1e30
    want = _sum_ce(scores, np.arange(5))
    assert float(model.compute_loss(BATCH, training=True)) == pytest.approx(
        want, rel=1e-4)
    # Evaluation (training=False) uses in-batch negatives only.
    scores = q @ c.T / 0.1 - np.log(expected[:5])[None, :]
    scores[_duplicates(ids[:5], 5)] = -1e30
    assert float(model.compute_loss(BATCH, training=False)) == pytest.approx(
        _sum_ce(scores, np.arange(5)), rel=1e-4)


# --------------------------------------------------------------------------- #
# The paper loss.
# --------------------------------------------------------------------------- #


def _paper_reference(q, d, shifts, gamma) -> float:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    n = len(q)
    losses = []
    for i in range(n):
        docs = [d[i]] + [d[(i + s) % n] for s in shifts]
        logits = gamma * np.array([q[i] @ doc for doc in docs])
        logits -= logits.max()
        losses.append(-logits[0] + np.log(np.exp(logits).sum()))
    return float(np.mean(losses))


def test_paper_loss_batch_of_two_matches_numpy():
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    for negatives in (1, 4):  # with two rows the only possible shift is 1
        model = DSSM(*_small_towers(), loss="paper", gamma=7.0,
                     num_paper_negatives=negatives)
        got = float(model._paper_loss(tf.constant(q, tf.float32),
                                      tf.constant(d, tf.float32)))
        want = _paper_reference(q, d, [1] * negatives, 7.0)
        assert got == pytest.approx(want, rel=1e-5)
    # num_paper_negatives=1 by hand: CE of softmax(gamma * [cos(q_i, d_i),
    # cos(q_i, d_{i+1 mod 2})]) at index 0.
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    by_hand = np.mean([
        np.log1p(np.exp(7.0 * (cos(q[i], d[1 - i]) - cos(q[i], d[i]))))
        for i in range(2)
    ])
    model = DSSM(*_small_towers(), loss="paper", gamma=7.0, num_paper_negatives=1)
    got = float(model._paper_loss(tf.constant(q, tf.float32),
                                  tf.constant(d, tf.float32)))
    assert got == pytest.approx(by_hand, rel=1e-5)


def test_paper_loss_with_fixed_shifts_matches_numpy(monkeypatch):
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    calls = []
    uniform = tf.random.uniform

    def fixed(shape, minval=0, maxval=None, dtype=tf.float32, **kwargs):
        calls.append((list(shape), int(minval), int(maxval), dtype))
        return tf.constant([1, 3, 4], tf.int32)

    monkeypatch.setattr(tf.random, "uniform", fixed)
    model = DSSM(*_small_towers(), loss="paper", gamma=10.0, num_paper_negatives=3)
    got = float(model._paper_loss(tf.constant(q, tf.float32),
                                  tf.constant(d, tf.float32)))
    monkeypatch.setattr(tf.random, "uniform", uniform)
    # shifts are drawn from [1, batch): never the positive itself
    assert calls == [([3], 1, 5, tf.int32)]
    assert got == pytest.approx(_paper_reference(q, d, [1, 3, 4], 10.0), rel=1e-5)


def test_paper_compute_loss_uses_the_towers():
    tf.keras.utils.set_random_seed(0)
    model = DSSM(*_small_towers(), loss="paper", num_paper_negatives=1)
    batch = {k: v[:2] for k, v in BATCH.items()}
    q, c = _embeddings(model, batch)
    want = _paper_reference(q, c, [1], model.gamma)
    assert float(model.compute_loss(batch)) == pytest.approx(want, rel=1e-5)
    assert model.gamma == 10.0 and DSSM(*_small_towers()).num_paper_negatives == 4


# --------------------------------------------------------------------------- #
# Configuration.
# --------------------------------------------------------------------------- #


def test_temperature_defaults():
    assert DSSM(*_small_towers(normalize=True)).temperature == 0.05
    assert DSSM(*_small_towers(normalize=False)).temperature == 1.0
    model = DSSM(*_small_towers(), temperature=0.3)
    assert model.temperature == 0.3
    assert model.task._temperature == 0.3
    query = paper_tower("q", num_buckets=10, hidden=(4,), output_dim=2)
    assert DSSM(query, SharedTower(query, {"q": "d"})).temperature == 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="softmax"), "loss must be one of"),
        (dict(loss="paper", num_hard_negatives=3), "paper"),
        (dict(remove_accidental_hits=True), "candidate_id"),
        (dict(candidate_probabilities={"a": 0.5}), "candidate_id"),
        (dict(candidate_id="item_id", candidate_probabilities={"a": 0.5, "b": 0.0}),
         "> 0"),
        (dict(candidate_id="item_id", candidate_probabilities={"a": -0.1}), "> 0"),
    ],
)
def test_invalid_configurations(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DSSM(*_small_towers(), **kwargs)


def test_paper_loss_with_negative_sampler_is_rejected():
    sampler = NegativeSampler({"title": np.array(["a", "b"])}, 2)
    with pytest.raises(ConfigError, match="paper"):
        DSSM(*_small_towers(), loss="paper", negative_sampler=sampler)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=0.0), dict(temperature=-1.0),
     dict(loss="paper", num_paper_negatives=0)],
    ids=["temperature_0", "temperature_negative", "paper_negatives_0"],
)
def test_out_of_range_loss_parameters_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        DSSM(*_small_towers(), **kwargs)


def test_empty_candidate_probabilities_raise_config_error():
    with pytest.raises(ConfigError):
        DSSM(*_small_towers(), candidate_id="item_id", candidate_probabilities={})


def test_call_returns_query_and_candidate_embeddings():
    model = DSSM(*_small_towers())
    out = model(BATCH)
    assert set(out) == {"query", "candidate"}
    assert out["query"].shape == (5, 4) and out["candidate"].shape == (5, 4)
    np.testing.assert_allclose(out["query"].numpy(),
                               model.query_tower(BATCH).numpy(), atol=1e-6)
    only_query = model({"query": BATCH["query"]})
    assert set(only_query) == {"query"}
    only_candidate = model({"title": BATCH["title"]})
    assert set(only_candidate) == {"candidate"}


def _strip_build(config):
    if isinstance(config, dict):
        return {k: _strip_build(v) for k, v in config.items() if k != "build_config"}
    return config


def test_config_round_trip():
    query = Tower([CategoricalFeature("user", ("u1", "u2"), 4),
                   NumericFeature("age", 30.0, 10.0)], hidden=(8,), output_dim=4,
                  senet=True, name="user_tower")
    candidate = Tower([TextFeature("title", num_buckets=50, embedding_dim=6)],
                      hidden=(), output_dim=4, name="item_tower")
    model = DSSM(query, candidate, candidate_id="item_id", loss="in_batch",
                 temperature=0.2, remove_accidental_hits=True, num_hard_negatives=3,
                 gamma=5.0, num_paper_negatives=2)
    config = model.get_config()
    assert json.loads(json.dumps(config))["candidate_id"] == "item_id"
    clone = DSSM.from_config(config)
    assert isinstance(clone.query_tower, Tower)
    assert isinstance(clone.candidate_tower, Tower)
    assert clone.query_tower.name == "user_tower"
    assert clone.query_tower.use_senet
    assert clone.candidate_tower.feature_names == ["title"]
    assert (clone.temperature, clone.remove_accidental_hits, clone.num_hard_negatives,
            clone.gamma, clone.num_paper_negatives) == (0.2, True, 3, 5.0, 2)
    assert _strip_build(clone.get_config()) == _strip_build(config)


def test_config_round_trip_with_shared_tower():
    query = paper_tower("query", num_buckets=40, hidden=(6,), output_dim=4)
    model = DSSM(query, SharedTower(query, {"query": "doc"}), loss="paper")
    config = model.get_config()
    assert config["candidate_tower"]["class_name"] == "SharedTower"
    clone = DSSM.from_config(config)
    assert clone.loss_name == "paper"
    assert isinstance(clone.candidate_tower, SharedTower)
    assert clone.candidate_tower.tower is clone.query_tower
    assert clone.candidate_tower.tower is not query
    assert clone.candidate_tower.feature_names == ["doc"]
    texts = tf.constant(["good day", "bad"])
    out = clone({"query": texts, "doc": texts})
    np.testing.assert_allclose(out["query"].numpy(), out["candidate"].numpy(),
                               atol=1e-6)
    # One set of variables for both towers.
    clone.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    assert len(clone.trainable_variables) == len(clone.query_tower.trainable_variables)


def test_save_and_load_weights(tmp_path, task):
    tf.keras.utils.set_random_seed(0)
    model = DSSM(*_text_towers(8), candidate_id="item_id")
    batch = {k: tf.constant(v[:7]) for k, v in task.train.items()}
    want = model(batch)
    path = str(tmp_path / "weights" / "ckpt")
    model.save_weights(path)

    fresh = DSSM.from_config(model.get_config())
    before = fresh(batch)
    assert not np.allclose(before["query"].numpy(), want["query"].numpy(), atol=1e-3)
    fresh.load_weights(path).expect_partial()
    got = fresh(batch)
    for key in ("query", "candidate"):
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())

    # A fresh, not yet built model restores on first call (deferred restore).
    lazy = DSSM.from_config(model.get_config())
    lazy.load_weights(path).expect_partial()
    np.testing.assert_array_equal(lazy(batch)["candidate"].numpy(),
                                  want["candidate"].numpy())
