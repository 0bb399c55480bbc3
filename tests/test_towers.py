"""Tests for tfdssm.model.towers: Tower, SENet, paper_tower and SharedTower."""

from __future__ import annotations

import json

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pytest
import tensorflow as tf

from tfdssm.errors import ConfigError, DataError
from tfdssm.features import (
    CategoricalFeature,
    MultiValuedFeature,
    NumericFeature,
    TextFeature,
    layers,
)
from tfdssm.model.towers import SENet, SharedTower, Tower, paper_tower

TEXTS = tf.constant(["hello world", "good", "", "a b c d e"])


def _three_fields(**kwargs) -> Tower:
    return Tower(
        [
            TextFeature("title", num_buckets=64, embedding_dim=6),
            CategoricalFeature("user", ("u1", "u2", "u3"), embedding_dim=4),
            NumericFeature("age", mean=30.0, std=10.0),
        ],
        hidden=(8,),
        output_dim=5,
        **kwargs,
    )


BATCH = {
    "title": tf.constant(["hello world", "good", "", "a b"]),
    "user": tf.constant(["u1", "u2", "u3", "nobody"]),
    "age": tf.constant([20.0, 30.0, 45.0, 61.0]),
}


def _norms(x) -> np.ndarray:
    return np.linalg.norm(np.asarray(x), axis=1)


# --------------------------------------------------------------------------- #
# paper_tower
# --------------------------------------------------------------------------- #


def test_paper_tower_default_architecture():
    tower = paper_tower("query")
    out = tower({"query": TEXTS})
    assert out.shape == (4, 128)
    assert out.dtype == tf.float32
    shapes = sorted(tuple(w.shape.as_list()) for w in tower.trainable_weights)
    assert shapes == sorted([
        (30000, 300),  # trigram bag: the 30k -> 300 layer
        (300,),  # its bias (input_activation)
        (300, 300), (300,),  # hidden dense
        (300, 128), (128,),  # output layer
    ])
    (text_layer,) = tower.feature_layers
    assert isinstance(text_layer, layers.TextEmbedding)
    assert text_layer.embeddings.shape == (30000, 300)
    assert text_layer.combiner == "sum"  # raw trigram counts as in the paper
    assert tower.input_bias is not None and tower.input_bias.shape == (300,)
    assert [d.units for d in tower.dense_layers] == [300]
    assert tower.output_layer.units == 128
    assert tower.dense_layers[0].activation is tf.keras.activations.tanh
    assert tower.output_layer.activation is tf.keras.activations.tanh
    assert tower.normalize
    # "" (row 2) has an empty bag; with the zero-initialised biases it maps to the
    # zero vector, which l2_normalize leaves at zero.
    np.testing.assert_allclose(_norms(out)[[0, 1, 3]], 1.0, atol=1e-5)


def test_paper_tower_custom_sizes_and_errors():
    tower = paper_tower("q", num_buckets=50, hidden=(8, 6, 4), output_dim=3)
    out = tower({"q": TEXTS})
    assert out.shape == (4, 3)
    shapes = [tuple(w.shape.as_list()) for w in tower.trainable_weights]
    for shape in [(50, 8), (8,), (8, 6), (6, 4), (4, 3)]:
        assert shape in shapes
    assert tower.hidden == [6, 4]
    with pytest.raises(ConfigError, match="hidden"):
        paper_tower("q", hidden=())


def test_paper_tower_input_activation_is_tanh_of_bag_plus_bias():
    tower = paper_tower("q", num_buckets=40, hidden=(5,), output_dim=3)
    tower({"q": TEXTS})
    tower.input_bias.assign(np.linspace(-1, 1, 5).astype(np.float32))
    bag = tower.feature_layers[0](TEXTS)
    x = np.tanh(bag.numpy() + tower.input_bias.numpy())
    kernel, bias = tower.output_layer.get_weights()
    y = np.tanh(x @ kernel + bias)
    want = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(tower({"q": TEXTS}).numpy(), want, atol=1e-5)


# --------------------------------------------------------------------------- #
# Tower
# --------------------------------------------------------------------------- #


def test_tower_output_is_l2_normalised_by_default():
    tower = _three_fields()
    out = tower(BATCH)
    assert out.shape == (4, 5)
    np.testing.assert_allclose(_norms(out), 1.0, atol=1e-5)


def test_tower_normalize_false_is_not_normalised():
    tf.keras.utils.set_random_seed(0)
    tower = _three_fields(normalize=False)
    out = tower(BATCH).numpy()
    assert out.shape == (4, 5)
    assert not np.allclose(_norms(out), 1.0, atol=1e-2)
    # Same weights, normalize=True: the same direction, unit length.
    normed = _three_fields(normalize=True)
    normed(BATCH)
    normed.set_weights(tower.get_weights())
    np.testing.assert_allclose(
        normed(BATCH).numpy(), out / _norms(out)[:, None], atol=1e-5
    )


def test_tower_input_bias_width_counts_numeric_as_one():
    tower = _three_fields(input_activation=True)
    tower(BATCH)
    assert tower.input_bias.shape == (6 + 4 + 1,)
    assert tower.dense_layers[0].kernel.shape == (11, 8)


def test_tower_ignores_extra_keys():
    tower = _three_fields()
    base = tower(BATCH).numpy()
    extra = dict(BATCH, something_else=tf.constant([1, 2, 3, 4]))
    np.testing.assert_allclose(tower(extra).numpy(), base, atol=1e-6)


def test_tower_missing_feature_raises_data_error_naming_it():
    tower = _three_fields()
    with pytest.raises(DataError, match=r"\['user'\]") as info:
        tower({"title": BATCH["title"], "age": BATCH["age"]})
    assert "age" not in str(info.value).split("needs features")[1].split("]")[0]


def test_tower_rejects_duplicate_names_and_empty_features():
    with pytest.raises(ConfigError, match="unique"):
        Tower([TextFeature("x"), CategoricalFeature("x", ("a",))])
    with pytest.raises(ConfigError, match="at least one feature"):
        Tower([])


def test_tower_accepts_feature_configs():
    specs = [TextFeature("t", num_buckets=20, embedding_dim=3),
             MultiValuedFeature("g", ("a", "b"), embedding_dim=2)]
    tower = Tower([s.to_config() for s in specs], hidden=(), output_dim=4)
    assert tower.features == specs
    assert tower.feature_names == ["t", "g"]
    out = tower({"t": tf.constant(["x y", ""]), "g": tf.constant(["a|b", ""])})
    assert out.shape == (2, 4)


def test_tower_config_round_trip():
    tower = _three_fields(
        activation="tanh", output_activation="tanh", input_activation=True,
        normalize=False, senet=True, name="user_tower",
    )
    want = tower(BATCH).numpy()
    config = tower.get_config()
    json.dumps(config)
    clone = Tower.from_config(config)
    assert clone.get_config() == config
    assert clone.name == "user_tower"
    assert clone.features == tower.features
    clone(BATCH)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(BATCH).numpy(), want, atol=1e-6)
    # Through the Keras registry too.
    restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(tower))
    assert isinstance(restored, Tower)
    assert restored.get_config() == config


# --------------------------------------------------------------------------- #
# SENet
# --------------------------------------------------------------------------- #


def test_senet_reweights_fields():
    tf.keras.utils.set_random_seed(1)
    with_senet = _three_fields(senet=True)
    plain = _three_fields(senet=False)
    out_senet = with_senet(BATCH).numpy()
    plain(BATCH)
    for a, b in zip(plain.feature_layers, with_senet.feature_layers, strict=True):
        a.set_weights(b.get_weights())
    for a, b in zip(plain.dense_layers + [plain.output_layer],
                    with_senet.dense_layers + [with_senet.output_layer], strict=True):
        a.set_weights(b.get_weights())
    out_plain = plain(BATCH).numpy()
    assert np.abs(out_senet - out_plain).max() > 1e-4
    # The SENet tower is exactly the plain tower applied to reweighted fields.
    fields = [layer(BATCH[f.name]) for f, layer in
              zip(with_senet.features, with_senet.feature_layers, strict=True)]
    reweighted = with_senet.senet(fields)
    np.testing.assert_allclose(plain.combine(reweighted).numpy(), out_senet, atol=1e-5)
    # Each field is scaled by one weight in (0, 2) per row (2 * sigmoid).
    for field, scaled in zip(fields, reweighted, strict=True):
        field, scaled = field.numpy(), scaled.numpy()
        for row in range(field.shape[0]):
            mask = np.abs(field[row]) > 1e-4
            if not mask.any():
                np.testing.assert_array_equal(scaled[row], 0.0)
                continue
            ratio = scaled[row][mask] / field[row][mask]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
            assert 0.0 < ratio[0] < 2.0


def test_senet_is_serialisable():
    tower = _three_fields(senet=True)
    tower(BATCH)
    assert isinstance(tower.senet, SENet)
    config = tower.get_config()
    assert config["senet"] is True
    clone = Tower.from_config(config)
    assert isinstance(clone.senet, SENet)
    clone(BATCH)
    assert len(clone.trainable_weights) == len(tower.trainable_weights)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(BATCH).numpy(), tower(BATCH).numpy(), atol=1e-6)
    senet = SENet(reduction=3, name="se")
    again = tf.keras.layers.deserialize(tf.keras.layers.serialize(senet))
    assert isinstance(again, SENet) and again.reduction == 3
    assert again.get_config() == senet.get_config()


def test_senet_needs_two_features():
    with pytest.raises(ConfigError, match="two features"):
        Tower([TextFeature("t", num_buckets=10)], senet=True)


# --------------------------------------------------------------------------- #
# SharedTower
# --------------------------------------------------------------------------- #


def _query_tower() -> Tower:
    return paper_tower("query", num_buckets=64, hidden=(8,), output_dim=4)


def test_shared_tower_shares_weights():
    query = _query_tower()
    shared = SharedTower(query, {"query": "doc"})
    assert shared.feature_names == ["doc"]
    assert shared.normalize is True
    out_doc = shared({"doc": TEXTS}).numpy()
    out_query = query({"query": TEXTS}).numpy()
    np.testing.assert_allclose(out_doc, out_query, atol=1e-6)
    query_vars = {id(v) for v in query.trainable_weights}
    assert len(shared.trainable_weights) == len(query.trainable_weights)
    assert {id(v) for v in shared.trainable_weights} == query_vars
    # Changing the query tower's weights changes the shared tower's output.
    query.input_bias.assign_add(tf.ones_like(query.input_bias))
    np.testing.assert_allclose(
        shared({"doc": TEXTS}).numpy(), query({"query": TEXTS}).numpy(), atol=1e-6
    )
    assert np.abs(shared({"doc": TEXTS}).numpy() - out_doc).max() > 1e-4


def test_shared_tower_keeps_unrenamed_features():
    tower = _three_fields()
    shared = SharedTower(tower, {"title": "doc_title"})
    assert shared.feature_names == ["doc_title", "user", "age"]
    batch = dict(BATCH)
    batch["doc_title"] = batch.pop("title")
    np.testing.assert_allclose(shared(batch).numpy(), tower(BATCH).numpy(), atol=1e-6)


def test_shared_tower_unknown_rename_key():
    with pytest.raises(ConfigError, match="does not read"):
        SharedTower(_query_tower(), {"title": "doc"})


def test_shared_tower_config_records_rename():
    shared = SharedTower(_query_tower(), {"query": "doc"}, name="candidate_tower")
    config = shared.get_config()
    assert config["rename"] == {"query": "doc"}
    assert config["name"] == "candidate_tower"
    # Keras' own serialiser copes with the tracked dict.
    serialized = tf.keras.layers.serialize(shared)
    assert json.loads(json.dumps(serialized))["config"]["rename"] == {"query": "doc"}


def test_shared_tower_get_config_is_plain_json():
    shared = SharedTower(_query_tower(), {"query": "doc"})
    assert json.loads(json.dumps(shared.get_config()))["rename"] == {"query": "doc"}
