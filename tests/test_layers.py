"""Tests for tfdssm.features.layers (feature layers) and tfdssm.features (specs)."""

from __future__ import annotations

import json

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pytest
import tensorflow as tf

from tfdssm import features as F
from tfdssm.errors import ConfigError
from tfdssm.features import layers
from tfdssm.text.hashing import BOUNDARY, trigram_hash_py, trigram_ids_py
from tfdssm.text.normalize import normalize_code_points_py


def _reference_text(layer: layers.TextEmbedding, text: str) -> np.ndarray:
    """numpy twin of TextEmbedding from the layer's own embedding matrix."""
    points = normalize_code_points_py(text)[: layer.max_length]
    ids = trigram_ids_py(points, layer.num_buckets)
    matrix = layer.embeddings.numpy()
    total = matrix[ids].sum(axis=0) if ids else np.zeros([layer.output_dim])
    count = max(len(ids), 1)
    if layer.combiner == "mean":
        return total / count
    if layer.combiner == "sqrtn":
        return total / np.sqrt(count)
    return total


TEXTS = [
    "good",
    "GOOD",
    "Straße ÉCOLE",
    "  many   spaces\tand\nlines ",
    "a",
    "e\u0301cole ﬁx",
    "ｆｕｌｌｗｉｄｔｈ 😀",
    "",
    "   ",
]


# --------------------------------------------------------------------------- #
# TextEmbedding
# --------------------------------------------------------------------------- #


def test_text_embedding_shape_and_dtype():
    layer = layers.TextEmbedding(num_buckets=100, output_dim=6, max_length=16)
    out = layer(tf.constant(["good", "", "hello world"]))
    assert out.shape == (3, 6)
    assert out.dtype == tf.float32
    assert layer.embeddings.shape == (100, 6)


def test_text_embedding_accepts_column_shaped_input():
    layer = layers.TextEmbedding(num_buckets=100, output_dim=3)
    flat = layer(tf.constant(["good", "bad"]))
    column = layer(tf.constant([["good"], ["bad"]]))
    assert column.shape == (2, 3)
    np.testing.assert_allclose(column.numpy(), flat.numpy())


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_text_embedding_empty_text_is_zero(combiner):
    layer = layers.TextEmbedding(num_buckets=50, output_dim=4, combiner=combiner)
    out = layer(tf.constant(["", "   ", "\t\n", "good"])).numpy()
    np.testing.assert_array_equal(out[:3], np.zeros([3, 4], np.float32))
    assert np.abs(out[3]).sum() > 0


def test_text_embedding_good_is_sum_of_its_four_trigram_rows():
    layer = layers.TextEmbedding(num_buckets=1000, output_dim=5, combiner="sum")
    g, o, d = ord("g"), ord("o"), ord("d")
    # #go goo ood od# -- the paper's example, spelled out with the hash directly.
    ids = [
        trigram_hash_py(BOUNDARY, g, o, 1000),
        trigram_hash_py(g, o, o, 1000),
        trigram_hash_py(o, o, d, 1000),
        trigram_hash_py(o, d, BOUNDARY, 1000),
    ]
    assert ids == trigram_ids_py(normalize_code_points_py("good"), 1000)
    matrix = layer.embeddings.numpy()
    want = matrix[ids].sum(axis=0)
    got = layer(tf.constant(["good"])).numpy()[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # mean over the same four rows
    mean_layer = layers.TextEmbedding(num_buckets=1000, output_dim=5, combiner="mean")
    got_mean = mean_layer(tf.constant(["good"])).numpy()[0]
    np.testing.assert_allclose(
        got_mean, mean_layer.embeddings.numpy()[ids].mean(axis=0), atol=1e-6
    )


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_text_embedding_matches_numpy_reference(combiner):
    layer = layers.TextEmbedding(
        num_buckets=97, output_dim=5, max_length=24, combiner=combiner
    )
    got = layer(tf.constant(TEXTS)).numpy()
    for text, row in zip(TEXTS, got, strict=True):
        np.testing.assert_allclose(
            row, _reference_text(layer, text), atol=1e-5, err_msg=repr(text)
        )


def test_text_embedding_combiners_scale_the_same_bag():
    tf.keras.utils.set_random_seed(3)
    base = layers.TextEmbedding(num_buckets=64, output_dim=4, combiner="sum")
    texts = tf.constant(["good", "hello world"])
    total = base(texts).numpy()
    counts = np.array([4.0, 10.0])[:, None]  # letters = trigrams
    for combiner, scale in (("mean", counts), ("sqrtn", np.sqrt(counts))):
        other = layers.TextEmbedding(num_buckets=64, output_dim=4, combiner=combiner)
        other.set_weights(base.get_weights())
        np.testing.assert_allclose(other(texts).numpy(), total / scale, atol=1e-6)


def test_text_embedding_is_case_and_normalisation_insensitive():
    layer = layers.TextEmbedding(num_buckets=500, output_dim=4)
    out = layer(tf.constant(["GoOd", "good", "ÉCOLE", "e\u0301cole"])).numpy()
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    np.testing.assert_allclose(out[2], out[3], atol=1e-6)


def test_text_embedding_truncates_at_max_length():
    layer = layers.TextEmbedding(num_buckets=500, output_dim=4, max_length=4)
    out = layer(tf.constant(["goodbye", "good"])).numpy()
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    longer = layers.TextEmbedding(num_buckets=500, output_dim=4, max_length=8)
    longer.set_weights(layer.get_weights())
    out = longer(tf.constant(["goodbye", "good"])).numpy()
    assert not np.allclose(out[0], out[1], atol=1e-4)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_embed_code_points_dense_equals_sparse(combiner):
    layer = layers.TextEmbedding(
        num_buckets=211, output_dim=7, max_length=32, combiner=combiner
    )
    rng = np.random.default_rng(0)
    alphabet = list("abcdefgh  éßΣ")
    texts = ["".join(rng.choice(alphabet, rng.integers(0, 40))) for _ in range(16)]
    texts += ["", "good"]
    points = layer.normalizer(tf.constant(texts), layer.max_length)
    sparse = layer.embed_code_points(points, dense=False).numpy()
    dense = layer.embed_code_points(points, dense=True).numpy()
    assert dense.shape == (len(texts), 7)
    np.testing.assert_allclose(dense, sparse, atol=1e-6)
    np.testing.assert_allclose(sparse, layer(tf.constant(texts)).numpy(), atol=1e-6)


def test_text_embedding_gradient_has_one_row_per_distinct_trigram():
    # The training path gathers each distinct id once, so the optimizer scatters
    # one row per distinct bucket; the gradient must still equal the dense path's.
    layer = layers.TextEmbedding(num_buckets=53, output_dim=3, max_length=32)
    texts = ["good good good", "goodness", "", "xyz good"]
    points = layer.normalizer(tf.constant(texts), layer.max_length)
    weights = tf.constant(np.random.default_rng(1).normal(size=[len(texts), 3]),
                          tf.float32)
    grads = []
    for dense in (False, True):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer.embed_code_points(points, dense=dense) * weights)
        grads.append(tape.gradient(loss, layer.embeddings))
    sparse, dense = grads
    assert isinstance(sparse, tf.IndexedSlices)
    ids = {i for t in texts
           for i in trigram_ids_py(normalize_code_points_py(t)[:32], 53)}
    assert sorted(sparse.indices.numpy().tolist()) == sorted(ids)
    np.testing.assert_allclose(tf.convert_to_tensor(sparse).numpy(),
                               tf.convert_to_tensor(dense).numpy(), atol=1e-5)


def test_text_embedding_never_gathers_from_the_variable():
    # A ResourceGather switches the table to copy-on-read for good, after which
    # every dense Adam update copies the whole table first (+23 ms a step for
    # the paper preset): the bag must gather from the table's value instead.
    layer = layers.TextEmbedding(num_buckets=53, output_dim=3, max_length=32)
    texts = tf.constant(["good", "goodness"])

    @tf.function
    def train(ids: tf.RaggedTensor, strings: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids)) + tf.reduce_sum(layer(strings))
        return tf.convert_to_tensor(tape.gradient(loss, layer.embeddings))

    graph = train.get_concrete_function(layer.hash_ids(texts), texts).graph
    ops = {op.type for op in graph.get_operations()}
    ops |= {op.type for f in graph._functions.values()
            for op in getattr(f, "graph", graph).get_operations()}
    assert "GatherV2" in ops
    assert "ResourceGather" not in ops


def test_text_embedding_all_empty_batch_is_zero_with_zero_gradient():
    layer = layers.TextEmbedding(num_buckets=53, output_dim=3)
    with tf.GradientTape() as tape:
        out = layer(tf.constant(["", "  "]))
        loss = tf.reduce_sum(out)
    np.testing.assert_array_equal(out.numpy(), np.zeros([2, 3]))
    gradient = tf.convert_to_tensor(tape.gradient(loss, layer.embeddings))
    np.testing.assert_array_equal(gradient.numpy(), np.zeros([53, 3]))


# --------------------------------------------------------------------------- #
# CategoricalEmbedding
# --------------------------------------------------------------------------- #


def test_categorical_shape_dtype_and_rows():
    layer = layers.CategoricalEmbedding(["a", "b", "c"], output_dim=3)
    out = layer(tf.constant(["a", "b", "c", "zzz", "", "A"]))
    assert out.shape == (6, 3)
    assert out.dtype == tf.float32
    matrix = layer.embedding.embeddings.numpy()
    assert matrix.shape == (4, 3)  # one OOV row + three values
    out = out.numpy()
    # StringLookup with one OOV index: OOV -> row 0, vocabulary[i] -> row i + 1.
    np.testing.assert_allclose(out[:3], matrix[1:4])
    for row in out[3:]:  # unknown, empty and wrong-case values are all OOV
        np.testing.assert_allclose(row, matrix[0])


def test_categorical_accepts_non_string_vocabulary_values():
    layer = layers.CategoricalEmbedding([1995, 2001], output_dim=2)
    assert layer.vocabulary == ["1995", "2001"]
    out = layer(tf.constant(["2001", "1995"])).numpy()
    matrix = layer.embedding.embeddings.numpy()
    np.testing.assert_allclose(out, matrix[[2, 1]])


# --------------------------------------------------------------------------- #
# MultiValuedEmbedding
# --------------------------------------------------------------------------- #


def test_multi_valued_mean_empty_and_oov():
    layer = layers.MultiValuedEmbedding(["a", "b", "c"], output_dim=4)
    assert layer.combiner == "mean"
    out = layer(tf.constant(["", "a|b", "a", "b|a", "a||b|", "zz", "c|zz"]))
    assert out.shape == (7, 4)
    assert out.dtype == tf.float32
    out = out.numpy()
    m = layer.embedding.embeddings.numpy()
    np.testing.assert_array_equal(out[0], np.zeros(4, np.float32))
    np.testing.assert_allclose(out[1], (m[1] + m[2]) / 2, atol=1e-6)
    np.testing.assert_allclose(out[2], m[1], atol=1e-6)
    np.testing.assert_allclose(out[3], out[1], atol=1e-6)
    np.testing.assert_allclose(out[4], out[1], atol=1e-6)  # empty tokens ignored
    np.testing.assert_allclose(out[5], m[0], atol=1e-6)  # OOV token -> OOV row
    np.testing.assert_allclose(out[6], (m[3] + m[0]) / 2, atol=1e-6)


@pytest.mark.parametrize(
    "combiner, scale", [("sum", 1.0), ("mean", 3.0), ("sqrtn", np.sqrt(3.0))]
)
def test_multi_valued_combiners(combiner, scale):
    layer = layers.MultiValuedEmbedding(["x", "y"], 3, combiner=combiner)
    out = layer(tf.constant(["x;y;y", ""])).numpy()  # ";" is not the separator
    m = layer.embedding.embeddings.numpy()
    np.testing.assert_allclose(out[0], m[0], atol=1e-6)  # one OOV token
    out = layer(tf.constant(["x|y|y", ""])).numpy()
    np.testing.assert_allclose(out[0], (m[1] + 2 * m[2]) / scale, atol=1e-6)
    np.testing.assert_array_equal(out[1], np.zeros(3, np.float32))


def test_multi_valued_custom_separator():
    layer = layers.MultiValuedEmbedding(["x", "y"], 3, separator=", ")
    out = layer(tf.constant(["x, y", "x|y"])).numpy()
    m = layer.embedding.embeddings.numpy()
    np.testing.assert_allclose(out[0], (m[1] + m[2]) / 2, atol=1e-6)
    np.testing.assert_allclose(out[1], m[0], atol=1e-6)  # "x|y" is one OOV token


# --------------------------------------------------------------------------- #
# NumericInput
# --------------------------------------------------------------------------- #


def test_numeric_input_standardises():
    layer = layers.NumericInput(mean=10.0, std=2.0)
    out = layer(tf.constant([12.0, 10.0, 4.0]))
    assert out.shape == (3, 1)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [[1.0], [0.0], [-3.0]])
    ints = layer(tf.constant([14, 8], tf.int64))
    assert ints.dtype == tf.float32
    np.testing.assert_allclose(ints.numpy(), [[2.0], [-1.0]])


# --------------------------------------------------------------------------- #
# Serialisation: config round trip and SavedModel round trip
# --------------------------------------------------------------------------- #


LAYER_IDS = ["text", "categorical", "multi", "numeric"]


def _make_layers():
    return [
        layers.TextEmbedding(
            num_buckets=64, output_dim=4, max_length=16, combiner="mean", name="t"
        ),
        layers.CategoricalEmbedding(["a", "b", "good"], output_dim=3, name="c"),
        layers.MultiValuedEmbedding(
            ["a", "b"], output_dim=3, separator="|", combiner="sqrtn", name="m"
        ),
        layers.NumericInput(mean=1.5, std=2.5, name="n"),
    ]


@pytest.mark.parametrize("index", range(4), ids=LAYER_IDS)
def test_layer_config_round_trip(index):
    layer = _make_layers()[index]
    config = layer.get_config()
    json.dumps(config)  # plain JSON
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    # Through the Keras registry as well (registered under package "tfdssm").
    restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == config


@pytest.mark.parametrize("index", range(4), ids=LAYER_IDS)
def test_layer_saved_model_round_trip(index, tmp_path):
    layer = _make_layers()[index]
    numeric = isinstance(layer, layers.NumericInput)
    dtype = tf.float32 if numeric else tf.string
    batch = (tf.constant([0.0, 1.5, 7.0]) if numeric
             else tf.constant(["a|b", "good", "", "zzz unknown"]))
    if isinstance(layer, layers.TextEmbedding):
        # A tf.Module with one signature (saving a Keras Model traces the text
        # layer's normaliser several times, which is slow).
        root = tf.Module()
        root.layer = layer
        root.serve = tf.function(
            lambda x: {"output": layer(x)},
            input_signature=[tf.TensorSpec([None], dtype)],
        )
        want = root.serve(batch)["output"].numpy()
        tf.saved_model.save(root, str(tmp_path / "sm"),
                            signatures={"serving_default": root.serve})
        loaded = tf.saved_model.load(str(tmp_path / "sm"))
        got = loaded.serve(batch)["output"].numpy()
    else:
        inputs = tf.keras.Input(shape=(), dtype=dtype)
        model = tf.keras.Model(inputs, layer(inputs))
        want = model(batch).numpy()
        tf.saved_model.save(model, str(tmp_path / "sm"))
        loaded = tf.saved_model.load(str(tmp_path / "sm"))
        got = loaded(batch).numpy()
    assert want.shape == (len(batch), 1 if numeric else 3 if index else 4)
    assert np.abs(want).sum() > 0
    np.testing.assert_allclose(got, want, atol=1e-6)
    (out,) = loaded.signatures["serving_default"](batch).values()
    np.testing.assert_allclose(out.numpy(), want, atol=1e-6)


# --------------------------------------------------------------------------- #
# Bad arguments
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: layers.TextEmbedding(combiner="max"), "combiner"),
        (lambda: layers.TextEmbedding(num_buckets=0), "positive"),
        (lambda: layers.TextEmbedding(num_buckets=10, output_dim=0), "positive"),
        (lambda: layers.TextEmbedding(num_buckets=10, max_length=0), "positive"),
        (lambda: layers.CategoricalEmbedding(["a", "b", "a"], 4), "duplicate"),
        (lambda: layers.CategoricalEmbedding([1, "1"], 4), "duplicate"),
        (lambda: layers.MultiValuedEmbedding(["a"], 4, combiner="max"), "combiner"),
        (lambda: layers.MultiValuedEmbedding(["a"], 4, separator=""), "separator"),
        (lambda: layers.NumericInput(std=0.0), "std"),
        (lambda: layers.NumericInput(std=-1.0), "std"),
        (lambda: layers.NumericInput(std=float("nan")), "std"),
    ],
)
def test_bad_layer_arguments_raise_config_error(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_multi_valued_duplicate_vocabulary_raises_config_error():
    with pytest.raises(ConfigError, match="duplicate"):
        layers.MultiValuedEmbedding(["a", "b", "a"], 4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: layers.CategoricalEmbedding(["a"], 0),
        lambda: layers.MultiValuedEmbedding(["a"], 0),
    ],
    ids=["categorical", "multi"],
)
def test_embedding_output_dim_zero_raises_config_error(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize(
    "cls", [layers.CategoricalEmbedding, layers.MultiValuedEmbedding],
    ids=["categorical", "multi"],
)
def test_empty_vocabulary_is_rejected_or_maps_to_oov(cls):
    # Either is acceptable: a ConfigError at construction, or every value
    # (including "") maps to the single OOV row / zeros.
    try:
        layer = cls([], 3)
    except ConfigError:
        return
    out = layer(tf.constant(["x", "y"])).numpy()
    oov = layer.embedding.embeddings.numpy()[0]
    np.testing.assert_allclose(out, np.stack([oov, oov]), atol=1e-6)


# --------------------------------------------------------------------------- #
# Feature specs (tfdssm.features)
# --------------------------------------------------------------------------- #

SPECS = [
    F.TextFeature("query", num_buckets=123, embedding_dim=7, max_length=9,
                  combiner="mean"),
    F.CategoricalFeature("user", ("u1", "u2"), embedding_dim=5),
    F.MultiValuedFeature("genres", ("Action", "Comedy"), embedding_dim=3,
                         separator=";", combiner="sum"),
    F.NumericFeature("age", mean=33.5, std=12.0),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_feature_config_round_trip(spec):
    config = spec.to_config()
    assert config["kind"] == spec.kind
    assert config["name"] == spec.name
    # through JSON, as export.json records it
    restored = F.feature_from_config(json.loads(json.dumps(config)))
    assert restored == spec
    assert type(restored) is type(spec)
    assert restored.to_config() == config
    assert "kind" in config  # feature_from_config must not mutate its input


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_feature_make_layer(spec):
    layer = spec.make_layer()
    assert layer.name.startswith(spec.name)
    dtype = tf.float32 if spec.kind == "numeric" else tf.string
    assert spec.dtype == dtype
    batch = tf.constant([1.0, 2.0]) if spec.kind == "numeric" else tf.constant(
        ["u1", "Action;Comedy"]
    )
    width = 1 if spec.kind == "numeric" else spec.embedding_dim
    assert layer(batch).shape == (2, width)


def test_text_feature_layer_uses_spec_values():
    layer = SPECS[0].make_layer()
    assert isinstance(layer, layers.TextEmbedding)
    assert (layer.num_buckets, layer.output_dim, layer.max_length, layer.combiner) == (
        123, 7, 9, "mean",
    )
    assert F.TextFeature("q").combiner == "sqrtn"


@pytest.mark.parametrize(
    "config, match",
    [
        ({"kind": "image", "name": "x"}, "unknown feature kind"),
        ({"name": "x"}, "unknown feature kind"),
        ({"kind": "text", "name": "x", "colour": "red"}, "bad text feature"),
        ({"kind": "categorical", "name": "x"}, "bad categorical feature"),
    ],
)
def test_feature_from_config_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        F.feature_from_config(config)


def test_vocabulary_of():
    assert F.vocabulary_of(["b", "a", "b", "c"]) == ("a", "b", "c")
    assert F.vocabulary_of(["b|a", "a", ""], separator="|") == ("a", "b")
    assert F.vocabulary_of(["x||y", "|z|"], separator="|") == ("x", "y", "z")
    assert F.vocabulary_of([3, 1, 2, 1]) == ("1", "2", "3")
    assert F.vocabulary_of(["", ""]) == ()
    assert F.vocabulary_of(["a|b"]) == ("a|b",)  # no separator: kept whole
