"""Every tfdssm layer and model survives ``serialize`` -> ``deserialize``.

As keras-rs does: the config round-trips unchanged, and the rebuilt object,
given the original's weights, computes the same outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported
from tfdssm.features import (
    CategoricalFeature,
    ExampleAgeFeature,
    MultiValuedFeature,
    NumericFeature,
    TextFeature,
    history_features,
)
from tfdssm.features.example_age import ExampleAgeInput
from tfdssm.features.history import ContextColumn, HistoryEmbedding
from tfdssm.features.layers import (
    CategoricalEmbedding,
    MultiValuedEmbedding,
    NumericInput,
    TextEmbedding,
)
from tfdssm.model.dssm import DSSM
from tfdssm.model.item_tower import ItemEmbeddingTower
from tfdssm.model.multihead import HeadProjection, MultiHeadTower
from tfdssm.model.sampling import NegativeSampler
from tfdssm.model.towers import SENet, SharedTower, Tower, paper_tower

MOVIES = ("1", "2", "3")
BATCH = {
    "query": tf.constant(["red shoes", ""]),
    "doc": tf.constant(["shoes", "a red hat"]),
    "user": tf.constant(["a", "zz"]),
    "genres": tf.constant(["x|y", ""]),
    "age": tf.constant([30.0, 41.0]),
    "history": tf.constant(["1|2", ""]),
    "history_ts": tf.constant(["10|20", ""]),
    "movie": tf.constant(["3", "1"]),
}


def _user_features():
    return [TextFeature("query", num_buckets=50, embedding_dim=4),
            CategoricalFeature("user", ("a", "b"), 3),
            MultiValuedFeature("genres", ("x", "y"), 2),
            NumericFeature("age", 35.0, 5.0)]


LAYERS = {
    "TextEmbedding": (lambda: TextEmbedding(50, 4, 16, "sum", (1, 2)), "query"),
    "CategoricalEmbedding": (lambda: CategoricalEmbedding(["a", "b"], 3), "user"),
    "MultiValuedEmbedding": (lambda: MultiValuedEmbedding(["x", "y"], 2), "genres"),
    "NumericInput": (lambda: NumericInput(35.0, 5.0), "age"),
    "ExampleAgeInput": (lambda: ExampleAgeInput(1.0, 2.0, 0.5, "age"), "age"),
    "ContextColumn": (lambda: ContextColumn(), "age"),
    "HistoryEmbedding": (lambda: HistoryEmbedding(
        list(MOVIES), 4, 5, "|", "time_decay", 3600.0,
        {"ids": "history", "timestamps": "history_ts"}),
        {"ids": "history", "timestamps": "history_ts"}),
    "SENet": (lambda: SENet(2), None),
    "HeadProjection": (lambda: HeadProjection(2, 3), None),
    "Tower": (lambda: Tower(_user_features(), hidden=(8,), output_dim=5,
                            senet=True), BATCH),
    "paper_tower": (lambda: paper_tower("query", num_buckets=50, hidden=(6, 4),
                                        output_dim=3), BATCH),
    "MultiHeadTower": (lambda: MultiHeadTower(_user_features(), num_heads=2,
                                              hidden=(8,), output_dim=3), BATCH),
    "ItemEmbeddingTower": (lambda: ItemEmbeddingTower(
        [CategoricalFeature("movie", MOVIES, 4)]), BATCH),
    "history Tower": (lambda: Tower(
        [*history_features("history", timestamps="history_ts", pooling="time_decay",
                           vocabulary=MOVIES, embedding_dim=4),
         ExampleAgeFeature("age")], hidden=(4,), output_dim=3), BATCH),
    "SharedTower": (lambda: SharedTower(
        paper_tower("query", num_buckets=50, hidden=(6,), output_dim=3),
        {"query": "doc"}), BATCH),
}


def _inputs(layer, spec):
    if spec is None:  # list-of-fields layers
        fields = [tf.random.stateless_normal([2, 4], seed=[1, i]) for i in range(3)]
        return fields if isinstance(layer, SENet) else fields[0]
    if isinstance(spec, str):
        return BATCH[spec]
    if isinstance(spec, dict) and all(isinstance(v, str) for v in spec.values()):
        return {role: BATCH[column] for role, column in spec.items()}
    return spec


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trips(name):
    make, spec = LAYERS[name]
    layer = make()
    inputs = _inputs(layer, spec)
    want = layer(inputs)
    config = tf.keras.layers.serialize(layer)
    copy = tf.keras.layers.deserialize(config)
    assert type(copy) is type(layer)
    assert tf.keras.layers.serialize(copy) == config
    copy(inputs)  # creates the variables
    copy.set_weights(layer.get_weights())
    got = copy(inputs)
    for w, g in zip(tf.nest.flatten(want), tf.nest.flatten(got), strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-6, atol=1e-6)


def test_shared_tower_serialises_the_tower_it_wraps():
    inner = paper_tower("query", num_buckets=50, hidden=(6,), output_dim=3)
    shared = SharedTower(inner, {"query": "doc"})
    config = shared.get_config()
    assert config["tower"]["class_name"].endswith("Tower")
    assert [f.name for f in shared.features] == ["doc"] == shared.feature_names
    assert shared.output_dim == 3 and shared.normalize
    again = shared.sharing(inner)
    assert again.tower is inner and again.rename == {"query": "doc"}


def _models():
    user = Tower(_user_features(), hidden=(8,), output_dim=4)
    movie = Tower([CategoricalFeature("movie", MOVIES, 4)], hidden=(), output_dim=4)
    query = paper_tower("query", num_buckets=50, hidden=(6,), output_dim=3)
    return {
        "plain": DSSM(user, movie, candidate_id="movie", loss="triplet", margin=0.3),
        "logQ + sampler": DSSM(
            Tower(_user_features(), hidden=(8,), output_dim=4),
            Tower([CategoricalFeature("movie", MOVIES, 4)], output_dim=4),
            candidate_id="movie", remove_accidental_hits=True, temperature=0.1,
            candidate_probabilities={"1": 0.5, "2": 0.3, "3": 0.2},
            negative_sampler=NegativeSampler(
                {"movie": np.array(MOVIES, object)}, 2, "popularity",
                np.array([3.0, 2.0, 1.0])),
            num_hard_negatives=2),
        "shared towers": DSSM(query, SharedTower(query, {"query": "doc"}),
                              loss="paper", gamma=5.0, num_paper_negatives=2),
    }


@pytest.mark.parametrize("name", ["plain", "logQ + sampler", "shared towers"])
def test_dssm_config_round_trips_every_argument(name):
    model = _models()[name]
    want = model(BATCH)
    config = model.get_config()
    copy = DSSM.from_config(config)
    copy(BATCH)  # builds every layer, as the original was
    assert copy.get_config() == config
    if name == "shared towers":
        assert copy.candidate_tower.tower is copy.query_tower
    if name == "logQ + sampler":
        assert copy.candidate_probabilities == {"1": 0.5, "2": 0.3, "3": 0.2}
        assert copy.negative_sampler.get_config() == model.negative_sampler.get_config()
    copy.set_weights(model.get_weights())
    got = copy(BATCH)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-6)


def test_negative_sampler_config_rebuilds_it():
    sampler = NegativeSampler({"doc": np.array(["a", "b", "c"], object)}, 4,
                              "popularity", np.array([1.0, 2.0, 3.0]), alpha=0.5,
                              seed=7)
    config = sampler.get_config()
    again = NegativeSampler(**config)
    assert again.get_config() == config
    a, pa = sampler.sample()
    b, pb = again.sample()
    np.testing.assert_array_equal(a["doc"].numpy(), b["doc"].numpy())
    np.testing.assert_allclose(pa.numpy(), pb.numpy())
