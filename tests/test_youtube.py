"""Tests for tfdssm.model.youtube (the YoutubeDNN preset, example age) and the
history-aware MovieLens pipeline end to end: train -> export -> serve -> query."""

from __future__ import annotations

import json

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfdssm import cli, export
from tfdssm.data.movielens import GENRES
from tfdssm.errors import ConfigError
from tfdssm.export import warmup
from tfdssm.features import CategoricalFeature, NumericFeature, feature_from_config
from tfdssm.features.example_age import example_ages
from tfdssm.model.youtube import (
    ExampleAgeFeature,
    ItemEmbeddingTower,
    model_features,
    youtube_dnn,
)
from tfdssm.retrieve import LocalRetriever, tower_features
from tfdssm.training import run as train

T0 = 881250949
QUERY_COLUMNS = ["history", "age", "gender", "occupation", "zip_prefix"]


def with_timestamps(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(timestamp=T0 + np.arange(len(frame)) * 3600)


def test_example_age_feature_and_ages():
    assert example_ages([T0, T0 + 86400], T0 + 2 * 86400).tolist() == [2.0, 1.0]
    spec = ExampleAgeFeature("example_age", mean=3.0, std=2.0)
    assert feature_from_config(spec.to_config()) == spec
    layer = spec.make_layer()
    assert layer.read_columns({"example_age": tf.constant([5.0])}).numpy().tolist() == [
        [1.0]]
    # Absent column: the serving value (0), standardised.
    assert layer.read_columns({"other": tf.constant(["a", "b"])}).numpy().tolist() == [
        [-1.5], [-1.5]]
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert clone.get_config() == layer.get_config()
    with pytest.raises(ConfigError, match="std must be positive"):
        ExampleAgeFeature(std=0)


def test_item_embedding_tower_is_the_embedding():
    item = CategoricalFeature("item", ("a", "b"), 4)
    tower = ItemEmbeddingTower([item], normalize=False)
    out = tower({"item": tf.constant(["a", "b", "zz"])}).numpy()
    np.testing.assert_allclose(
        out, tower.feature_layers[0](tf.constant(["a", "b", "zz"])))
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(tower))
    assert clone.get_config() == tower.get_config()
    with pytest.raises(ConfigError, match="exactly one CategoricalFeature"):
        ItemEmbeddingTower([item, CategoricalFeature("x", ("c",), 4)])
    with pytest.raises(ConfigError, match="no MLP"):
        ItemEmbeddingTower([item], hidden=(8,))


def test_preset_shares_the_item_embedding_and_samples_negatives():
    item = CategoricalFeature("item", tuple("abcdefgh"), 8)
    model = youtube_dnn(item, user_features=[NumericFeature("age", 30.0, 10.0)],
                        example_age=ExampleAgeFeature(), hidden=(16,),
                        num_sampled_negatives=4, item_counts={"a": 10.0, "b": 1.0})
    history_layer = model.query_tower.feature_layers[0]
    assert history_layer.items is model.candidate_tower.feature_layers[0]
    assert model.query_tower.feature_names == ["history", "age"]
    assert [f.name for f in model_features(model)] == [
        "history", "age", "example_age", "item"]
    batch = {"history": tf.constant(["a|b", "", "c"]),
             "age": tf.constant([20.0, 30.0, 40.0]),
             "example_age": tf.constant([1.0, 2.0, 3.0]),
             "item": tf.constant(list("cde"))}
    assert np.isfinite(float(model.compute_loss(batch, training=True)))
    assert model.negative_sampler.distribution == "popularity"
    rebuilt = type(model).from_config(model.get_config())
    assert rebuilt.query_tower.feature_layers[0].items is (
        rebuilt.candidate_tower.feature_layers[0])


@pytest.fixture(scope="module")
def youtube_export(tmp_path_factory, movielens_frame):
    from tfdssm.recipes import movielens

    prepared = movielens.prepare(interactions=with_timestamps(movielens_frame(80)),
                                 user_tower="youtube", hidden=(16,), dim=8,
                                 num_buckets=300, verbose=False)
    export_dir = tmp_path_factory.mktemp("youtube_export")
    result = train.run(prepared, None, epochs=1, batch_size=16, verbose=0)
    info = export.export_model(prepared.model, export_dir, corpus=prepared.corpus,
                               max_k=5)  # with query_tower.tflite (or why not)
    return export_dir, prepared, result, info


def query_batch(prepared) -> dict[str, tf.Tensor]:
    rows = prepared.test.head(5)
    return {"history": tf.constant(rows["history"].tolist()),
            "age": tf.constant(rows["age"].to_numpy(np.float32)),
            **{c: tf.constant(rows[c].astype(str).tolist())
               for c in ("gender", "occupation", "zip_prefix")}}


def test_query_signature_fixes_example_age_to_zero(youtube_export):
    export_dir, prepared, _, _ = youtube_export
    signature = export.load_towers(export_dir).signatures["query"]
    assert sorted(signature.structured_input_signature[1]) == sorted(QUERY_COLUMNS)
    batch = query_batch(prepared)
    served = signature(**batch)["embedding"].numpy()
    tower = prepared.model.query_tower
    at_zero = tower({**batch, "example_age": tf.zeros([5])}).numpy()
    np.testing.assert_allclose(served, at_zero, atol=1e-6)
    old = tower({**batch, "example_age": tf.fill([5], 60.0)}).numpy()
    assert np.abs(old - served).max() > 1e-3  # the age matters; serving pins it
    with pytest.raises(TypeError):
        signature(**batch, example_age=tf.zeros([5]))


def test_export_load_same_outputs_and_shared_variable(youtube_export):
    export_dir, prepared, result, info = youtube_export
    model = prepared.model
    assert model.query_tower.feature_layers[0].items is (
        model.candidate_tower.feature_layers[0])
    towers = export.load_towers(export_dir)
    batch = query_batch(prepared)
    np.testing.assert_allclose(towers.signatures["query"](**batch)["embedding"],
                               model.query_tower(batch), atol=1e-6)
    movies = {"movie_id": tf.constant(prepared.corpus["movie_id"].tolist())}
    np.testing.assert_allclose(towers.signatures["candidate"](**movies)["embedding"],
                               model.candidate_tower(movies), atol=1e-6)
    assert sorted(towers.signatures["candidate"].structured_input_signature[1]) == [
        "movie_id"]
    assert info["query"]["features"][-1]["kind"] == "example_age"
    assert [f.name for f in tower_features(info, "query")] == QUERY_COLUMNS
    assert result["metrics"]["num_candidates"] == len(prepared.corpus)
    # Warm-up requests match the signature (no example_age, empty history).
    row = warmup.example_row(model.query_tower)
    assert sorted(row) == sorted(QUERY_COLUMNS) and row["history"] == ""


def test_tflite_is_skipped_with_a_note(youtube_export, capsys):
    export_dir, _, _, info = youtube_export
    assert "history" in info["tflite"]["skipped"]
    assert not (export_dir / "query_tower.tflite").exists()
    written = json.loads((export_dir / "export.json").read_text())
    assert written["tflite"] == info["tflite"]
    assert cli.main(["tflite", "--export-dir", str(export_dir)]) == 2
    assert "no TFLite query tower" in capsys.readouterr().err


def test_local_retriever_answers_history_queries(youtube_export):
    export_dir, prepared, _, _ = youtube_export
    retriever = LocalRetriever(export_dir)
    assert retriever.query_names == QUERY_COLUMNS
    query = {"history": ["1|2|3", ""], "age": [30.0, 40.0], "gender": ["M", "F"],
             "occupation": ["student", "doctor"], "zip_prefix": ["10", "11"]}
    ids, scores = retriever.top_k(query, k=3, exclude=[["1"], []])
    assert ids.shape == (2, 3) and "1" not in ids[0]
    assert (np.diff(scores, axis=1) <= 1e-6).all()


# --------------------------------------------------------------------------- #
# The "done when": tfdssm train --pipeline movielens --user-tower
# history trains, exports, serves and answers queries.
# --------------------------------------------------------------------------- #


def write_grouplens(directory, users: int = 20, movies: int = 30, rows: int = 400):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    ratings = [f"{rng.integers(1, users + 1)}\t{rng.integers(1, movies + 1)}\t4\t"
               f"{T0 + i * 600}\n" for i in range(rows)]
    ratings += [f"1\t{m}\t3\t{T0 - m}\n" for m in range(1, movies + 1)]  # all movies
    (directory / "u.data").write_text("".join(ratings))
    (directory / "u.user").write_text("".join(
        f"{u}|{20 + u}|{'MF'[u % 2]}|student|{10000 + u}\n"
        for u in range(1, users + 1)))
    (directory / "u.item").write_text("".join(
        f"{m}|Movie {m} (1995)|01-Jan-1995||http://x|"
        + "|".join("1" if g == m % len(GENRES) else "0" for g in range(len(GENRES)))
        + "\n" for m in range(1, movies + 1)))
    (directory / "u.genre").write_text(
        "".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)))


def test_cli_history_tower_trains_exports_serves_and_answers(tmp_path, capsys):
    from serving_helpers import running_server

    from tfdssm.client import Client

    data, export_dir = tmp_path / "ml-100k", tmp_path / "export"
    write_grouplens(data)
    code = cli.main(["train", "--pipeline", "movielens", "--data", str(data),
                     "--user-tower", "history", "--epochs", "1", "--batch-size", "64",
                     "--hidden", "16", "--dim", "8", "--buckets", "200", "--quiet",
                     "--export-dir", str(export_dir)])
    out = capsys.readouterr().out
    assert code == 0 and "recall@100" in out
    info = json.loads((export_dir / "export.json").read_text())
    assert info["training"]["user_tower"] == "history"
    assert "skipped" in info["tflite"]
    names = [f["name"] for f in info["query"]["features"]]
    assert names[-2:] == ["history", "history_timestamps"]
    query = {"user_id": ["3"], "age": [23.0], "gender": ["F"],
             "occupation": ["student"], "zip_prefix": ["10"], "history": ["4|9|2"],
             "history_timestamps": [f"{T0}|{T0 + 60}|{T0 + 7200}"]}
    with running_server(export_dir) as server, Client(
            f"127.0.0.1:{server.grpc_port}") as client:
        ids, scores = client.top_k(query, k=5, exclude=["2"],
                                   model="retrieval_brute_force")
        vector = client.embed(query)
        # The CLI asks the running server (no third load of the export; the
        # local path, LocalRetriever, is checked below).
        features = [f"--feature={k}={v[0]}" for k, v in query.items()]
        code = cli.main(["query", "--server", f"127.0.0.1:{server.grpc_port}",
                         "--k", "3", *features])
        assert code == 0 and capsys.readouterr().out.count("\n") == 4
    local_ids, local_scores = LocalRetriever(export_dir).top_k(query, k=5,
                                                               exclude=[["2"]])
    assert ids.tolist() == local_ids.tolist() and "2" not in ids[0]
    np.testing.assert_allclose(scores, local_scores, rtol=1e-5, atol=1e-6)
    assert vector.shape == (1, 8)
