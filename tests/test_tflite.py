"""TFLite query tower: builtins only, parity with the served query signature."""

import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import tfdssm  # noqa: F401
from tfdssm import cli
from tfdssm.export import tflite
from tfdssm.recipes import movielens, pairs
from tfdssm.text.normalize import TextNormalizer
from tfdssm.training import run as train

TOLERANCE = 1e-5


def synthetic_pairs(rows=400, seed=0):
    rng = np.random.default_rng(seed)
    topics = ["flights to paris", "hotels in rome", "москва рестораны", "北京烤鸭 做法",
              "crème brûlée recipe", "ελληνικά νησιά", "🙂 emoji keyboard", "yoga classes"]
    chosen = rng.choice(topics, rows)
    return pd.DataFrame({"query": [t.split()[0] + " " + t.split()[-1] for t in chosen],
                         "doc": [t.title() + " guide" for t in chosen]})


def synthetic_interactions(rows=600, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(1, 40, rows)
    movies = rng.integers(1, 60, rows)
    return pd.DataFrame({
        "user_id": users.astype(str), "age": 18 + users % 40,
        "gender": np.where(users % 2, "M", "F"),
        "occupation": np.array(["student", "engineer", "artist"])[users % 3],
        "zip_prefix": (users % 7).astype(str) + "0",
        "movie_id": movies.astype(str), "title": [f"Movie {m} Ωmega" for m in movies],
        "genres": np.array(["Action|Comedy", "Drama", "Sci-Fi|Action"])[movies % 3],
        "year": (1980 + movies % 20).astype(str),
    })


@pytest.fixture(scope="module")
def pairs_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs")
    prepared = pairs.prepare(synthetic_pairs(), hidden=(32, 16), dim=8,
                             num_buckets=997, max_length=48, word_ngrams=(1, 2))
    train.run(prepared, path, epochs=1, batch_size=64, verbose=0)
    return path, prepared.model


@pytest.fixture(scope="module")
def movielens_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("movielens")
    prepared = movielens.prepare(interactions=synthetic_interactions(), hidden=(16,),
                                 dim=8, num_buckets=499, senet=True)
    train.run(prepared, path, epochs=1, batch_size=128, verbose=0)
    return path, prepared.model


@pytest.mark.parametrize("fixture", ["pairs_export", "movielens_export"])
def test_export_writes_builtins_only_model_with_parity(fixture, request):
    path, model = request.getfixturevalue(fixture)
    info = json.loads((path / "export.json").read_text())["tflite"]
    data = (path / "query_tower.tflite").read_bytes()
    assert info["bytes"] == len(data)
    ops = tflite.op_names(data)
    assert ops == info["ops"]
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    assert info["parity"]["max_abs_diff"] <= TOLERANCE


def test_conversion_refuses_select_ops():
    # The converter is restricted to builtins: a string op must fail to convert.
    @tf.function(input_signature=[tf.TensorSpec([1], tf.string)])
    def hashed(x):
        return tf.strings.to_hash_bucket_fast(x, 10)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [hashed.get_concrete_function()], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with pytest.raises(Exception, match="(?i)flex|not supported|select"):
        converter.convert()


def test_pairs_parity_on_multilingual_set_including_truncation(pairs_export):
    path, model = pairs_export
    queries = [{"query": t} for t in tflite.MULTILINGUAL + ("a" * 47, "b" * 49)]
    result = tflite.parity(path, queries)
    assert result["queries"] == len(queries)
    assert result["max_abs_diff"] <= TOLERANCE
    # Over-long text really is truncated identically: only the first 48 code
    # points matter on both sides.
    lite = tflite.TFLiteQueryTower(path / "query_tower.tflite")
    spec = lite.spec["inputs"]
    long_a = lite(tflite.encode_query({"query": "z" * 48 + " tail"}, spec, {}))
    long_b = lite(tflite.encode_query({"query": "z" * 48 + " other"}, spec, {}))
    np.testing.assert_array_equal(long_a, long_b)
    served = tf.saved_model.load(str(path / "towers" / "1")).signatures["query"]
    a = served(query=tf.constant(["z" * 48 + " tail"]))["embedding"].numpy()
    np.testing.assert_allclose(a, long_a, atol=TOLERANCE)


def test_movielens_parity_with_known_and_unknown_users(movielens_export):
    path, model = movielens_export
    queries = tflite.sample_queries(model.query_tower, 8)
    assert queries[-1]["user_id"] not in model.query_tower.features[0].vocabulary
    result = tflite.parity(path, queries)
    assert result["max_abs_diff"] <= TOLERANCE
    spec = json.loads((path / "query_tower.json").read_text())
    kinds = {s["name"]: s["kind"] for s in spec["inputs"]}
    assert kinds == {"user_id": "categorical", "age": "numeric",
                     "gender": "categorical", "occupation": "categorical",
                     "zip_prefix": "categorical"}
    vocab = (path / "query_tower_vocab" / "user_id.txt").read_text().splitlines()
    assert vocab == list(model.query_tower.features[0].vocabulary)


def test_reference_encoder_matches_in_graph_code_points():
    normalizer = TextNormalizer()
    spec = [{"name": "q", "kind": "text", "shape": [1, 40]}]
    for text in tflite.MULTILINGUAL:
        encoded = tflite.encode_query({"q": text}, spec, {})["q"]
        in_graph = normalizer(tf.constant([text]), 40).numpy()
        np.testing.assert_array_equal(encoded, in_graph)


def test_multi_valued_feature_in_tflite(tmp_path):
    from tfdssm.features import MultiValuedFeature, NumericFeature
    from tfdssm.model.towers import Tower

    tower = Tower([MultiValuedFeature("tags", ("a", "b", "c"), 4),
                   NumericFeature("x", 1.0, 2.0)], hidden=(4,), output_dim=3)
    tower({"tags": tf.constant(["a|c"]), "x": tf.constant([1.0])})
    lite = tflite.TFLiteQueryTower(tflite.convert(tower), {"inputs": tflite.input_spec(tower)})
    for tags, x in [("a|c", 3.0), ("", 0.0), ("b|zzz", -1.0), ("a|b|c", 10.0)]:
        encoded = tflite.encode_query({"tags": tags, "x": x}, lite.spec["inputs"],
                                      {"tags": ["a", "b", "c"]})
        want = tower({"tags": tf.constant([tags]), "x": tf.constant([x])}).numpy()
        np.testing.assert_allclose(lite(encoded), want, atol=TOLERANCE)


@pytest.mark.parametrize("mode", ["dynamic", "float16"])
def test_quantized_variants_are_smaller_and_agree(pairs_export, mode):
    path, model = pairs_export
    float_spec = (path / "query_tower.json").read_text()
    written = tflite.write_tflite(model.query_tower, path, mode)
    full = (path / "query_tower.tflite").stat().st_size
    assert written["bytes"] < full
    # The float model's spec is left alone; the variant has its own, naming
    # the ops of the variant (quantised models add DEQUANTIZE).
    assert (path / "query_tower.json").read_text() == float_spec
    spec = json.loads((path / f"query_tower.{mode}.json").read_text())
    assert spec["ops"] == written["ops"] != json.loads(float_spec)["ops"]
    assert spec["inputs"] == json.loads(float_spec)["inputs"]
    result = tflite.parity(path, [{"query": t} for t in tflite.MULTILINGUAL],
                           written["path"])
    assert result["min_cosine"] > 0.99


def test_rebuild_from_export_and_cli(pairs_export, capsys):
    path, model = pairs_export
    tower = tflite.load_query_tower(path)
    x = {"query": tf.constant(["Crème Brûlée", "北京"])}
    np.testing.assert_allclose(tower(x), model.query_tower(x), atol=1e-6)
    assert cli.main(["tflite", "--export-dir", str(path)]) == 0
    out = capsys.readouterr().out
    assert "query_tower.tflite" in out and "max |diff|" in out
    diff = float(out.split("max |diff| ")[1].split(",")[0])
    assert diff <= TOLERANCE


def test_cli_tflite_on_a_non_export(tmp_path, capsys):
    assert cli.main(["tflite", "--export-dir", str(tmp_path)]) == 2
    assert "not a tfdssm export" in capsys.readouterr().err


def test_native_log_lines_follow_tf_cpp_min_log_level():
    lines = {
        "I": "I0000 00:00:1796051369.261591 548 mlir_graph_optimization_pass.cc:437]"
             " MLIR V1 optimization pass is not enabled",
        "W": "W0000 00:00:1796051369.256220     548 tf_tfl_flatbuffer_helpers.cc:364]"
             " Ignored output_format.",
        "absl": "WARNING: All log messages before absl::InitializeLog() is called are "
                "written to STDERR",
        "xnnpack": "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
        "E": "E0000 00:00:1796051369.2 1 x.cc:1] failed",
        "ours": "tfdssm: wrote query_tower.tflite",
    }
    hidden = {level: sorted(k for k, v in lines.items() if tflite._hidden(v, level))
              for level in (0, 1, 2, 3)}
    assert hidden == {0: [], 1: ["I", "xnnpack"], 2: ["I", "W", "absl", "xnnpack"],
                      3: ["E", "I", "W", "absl", "xnnpack"]}
