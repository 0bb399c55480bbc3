"""Tests for tfdssm.export.index and the retrieval part of the export.

The exported corpus is ~2000 synthetic MovieLens-like movies (serving_helpers);
the ScaNN tree is also checked on 20,000 clustered vectors, where it prunes.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import scann  # noqa: F401 - registers ScaNN's ops for loading `retrieval`
import tensorflow as tf
from google.protobuf import text_format
from serving_helpers import trained_export, user_features
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.config import model_server_config_pb2

from tfdssm import export
from tfdssm.errors import DataWarning, ExportError
from tfdssm.export import candidates, index, warmup

RETRIEVAL_MODELS = ("retrieval", "retrieval_brute_force")


@pytest.fixture(scope="module")
def exported():
    export_dir, prepared, result = trained_export()
    return pathlib.Path(export_dir), prepared, result


@pytest.fixture(scope="module")
def loaded(exported):
    export_dir = exported[0]
    return {name: tf.saved_model.load(str(export_dir / name / "1"))
            for name in (*RETRIEVAL_MODELS, "towers")}


def _feed(features: dict) -> dict[str, tf.Tensor]:
    return {k: tf.constant(v, tf.float32 if k == "age" else tf.string)
            for k, v in features.items()}


def _ids(tensor: tf.Tensor) -> list[list[str]]:
    return [[b.decode() for b in row] for row in tensor.numpy()]


def _exact_top(export_dir: pathlib.Path, towers, features: dict, k: int):
    embeddings, ids = candidates.read_candidates(export_dir)
    queries = towers.signatures["query"](**_feed(features))["embedding"].numpy()
    scores = queries @ embeddings.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.asarray(ids)[order], np.take_along_axis(scores, order, axis=1)


# --------------------------------------------------------------------------- #
# Index parameters and recall
# --------------------------------------------------------------------------- #


def test_scann_options_scale_with_corpus_size():
    assert index.scann_options(999) == {"mode": "brute_force"}
    small = index.scann_options(2000, max_k=50)
    assert small["mode"] == "tree_ah" and small["num_leaves"] == 20
    assert small["num_leaves_to_search"] == 20  # <= 5000 candidates: every leaf
    assert small["reorder"] == 200
    mid = index.scann_options(100_000)
    assert (mid["num_leaves"], mid["num_leaves_to_search"]) == (316, 79)  # 25 % of the leaves
    big = index.scann_options(1_000_000)
    assert (big["num_leaves"], big["num_leaves_to_search"]) == (1000, 250)
    assert big["reorder"] == 500 and big["training_sample_size"] == 100_000
    assert index.scann_options(1_000_000, max_k=300)["reorder"] == 600


def test_scann_top10_agrees_with_brute_force_on_exported_corpus(exported, loaded):
    export_dir, prepared, result = exported
    assert result["export"]["retrieval"]["num_candidates"] == 2000
    assert result["export"]["retrieval"]["scann"]["mode"] == "tree_ah"
    features = _feed(user_features(prepared, 300))
    scann_out = loaded["retrieval"].signatures["serving_default"](**features)
    brute = loaded["retrieval_brute_force"].signatures["serving_default"]
    brute_out = brute(**features)
    assert scann_out["ids"].shape == brute_out["ids"].shape == (300, 50)
    approx, exact = _ids(scann_out["ids"]), _ids(brute_out["ids"])
    recall = np.mean([len(set(a[:10]) & set(e[:10])) / 10
                      for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.95, recall
    # Brute force is exact: the top-10 of candidates.npy x the query tower.
    ids, scores = _exact_top(export_dir, loaded["towers"],
                             user_features(prepared, 300), 10)
    np.testing.assert_allclose(brute_out["scores"].numpy()[:, :10], scores, atol=1e-5)
    same = [set(a[:10]) == set(e) for a, e in zip(exact, ids.tolist(), strict=True)]
    assert np.mean(same) > 0.98
    # ScaNN re-scores its candidates exactly: same score for the same id.
    brute_scores = dict(zip(exact[0], brute_out["scores"].numpy()[0], strict=True))
    for cid, score in zip(approx[0], scann_out["scores"].numpy()[0], strict=True):
        if cid in brute_scores:
            assert score == pytest.approx(brute_scores[cid], abs=1e-5)


def _stacked_encoder(dim: int):
    spec = {f"x{i}": tf.TensorSpec([None], tf.float32, name=f"x{i}")
            for i in range(dim)}
    return (lambda f: tf.stack([f[f"x{i}"] for i in range(dim)], axis=1)), spec


def test_scann_tree_prunes_and_keeps_recall_on_20000_clustered_vectors():
    rng = np.random.default_rng(0)
    dim, n = 16, 20_000
    centres = rng.normal(size=(200, dim))
    corpus = centres[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, dim))
    queries = centres[rng.integers(0, 200, 200)] + 0.5 * rng.normal(size=(200, dim))
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    encoder, spec = _stacked_encoder(dim)
    ids = [f"v{i}" for i in range(n)]
    module = index.ScannRetrieval(encoder, spec, corpus.astype(np.float32), ids,
                                  max_k=10)
    options = module.options
    assert options["num_leaves_to_search"] < options["num_leaves"]  # really prunes
    out = module.signatures()["serving_default"](
        {f"x{i}": tf.constant(queries[:, i], tf.float32) for i in range(dim)})
    exact = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    approx = [[int(b.decode()[1:]) for b in row] for row in out["ids"].numpy()]
    recall = np.mean([len(set(a) & set(e)) / 10
                      for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.95, recall


# --------------------------------------------------------------------------- #
# The signature contract: per-request k, exclusions, errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("model", RETRIEVAL_MODELS)
def test_per_request_k_and_padding(exported, loaded, model):
    _, prepared, _ = exported
    features = _feed(user_features(prepared, 3))
    signatures = loaded[model].signatures
    full = signatures["serving_default"](**features)
    out = signatures["top_k"](**features, k=tf.constant([1, 7, 3]))
    ids, scores = _ids(out["ids"]), out["scores"].numpy()
    assert out["ids"].shape == (3, 7) and out["scores"].dtype == tf.float32
    for row, k in enumerate([1, 7, 3]):
        assert ids[row][:k] == _ids(full["ids"])[row][:k]
        np.testing.assert_allclose(scores[row, :k], full["scores"].numpy()[row, :k],
                                   atol=1e-6)
        assert ids[row][k:] == [""] * (7 - k)  # padding: "" and -inf
        assert np.all(np.isneginf(scores[row, k:]))
        assert list(scores[row, :k]) == sorted(scores[row, :k], reverse=True)


@pytest.mark.parametrize("model", RETRIEVAL_MODELS)
def test_exclusions_per_row(exported, loaded, model):
    _, prepared, _ = exported
    features = _feed(user_features(prepared, 2))
    signatures = loaded[model].signatures
    full = _ids(signatures["serving_default"](**features)["ids"])
    excluded = [full[0][:3] + ["no-such-id"], [full[1][1], "", "", ""]]
    out = signatures["top_k_exclude"](**features, k=tf.constant([10, 5]),
                                      exclude=tf.constant(excluded))
    ids = _ids(out["ids"])
    assert ids[0] == [i for i in full[0] if i not in excluded[0]][:10]
    assert ids[1] == [i for i in full[1] if i != full[1][1]][:5] + [""] * 5
    assert not set(ids[0]) & set(excluded[0])
    # Excluding nothing (all padding) equals top_k.
    plain = signatures["top_k"](**features, k=tf.constant([10, 10]))
    padded = signatures["top_k_exclude"](**features, k=tf.constant([10, 10]),
                                         exclude=tf.constant([[""], [""]]))
    assert _ids(padded["ids"]) == _ids(plain["ids"])


@pytest.mark.parametrize("model", RETRIEVAL_MODELS)
def test_k_and_batch_errors_are_invalid_argument(exported, loaded, model):
    _, prepared, _ = exported
    features = _feed(user_features(prepared, 2))
    top_k = loaded[model].signatures["top_k"]
    for k, message in [([1, 51], r"between 1 and max_k=50.*received k =\] \[1 51\]"),
                       ([0, 3], r"between 1 and max_k=50.*received k =\] \[0 3\]"),
                       ([3], r"k needs one value per query row")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            top_k(**features, k=tf.constant(k))
    empty = {k: v[:0] for k, v in features.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        top_k(**empty, k=tf.constant([], tf.int32))
    assert top_k(**features, k=tf.constant([50, 1]))["ids"].shape == (2, 50)


def test_exhausted_corpus_pads_rows():
    encoder, spec = _stacked_encoder(2)
    corpus = np.array([[1, 0], [0, 1], [0.7, 0.7]], np.float32)
    for cls in (index.BruteForceRetrieval, index.ScannRetrieval):
        module = cls(encoder, spec, corpus, ["a", "b", "c"], max_k=100)
        assert module.max_k == 3  # capped at the corpus size
        out = module.signatures()["top_k_exclude"](
            {"x0": tf.constant([1.0]), "x1": tf.constant([0.0])}, tf.constant([3]),
            tf.constant([["a", "c"]]))
        assert _ids(out["ids"]) == [["b", "", ""]], cls
        assert out["scores"].numpy()[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_bad_corpora_are_export_errors():
    encoder, spec = _stacked_encoder(2)
    vectors = np.eye(2, dtype=np.float32)
    with pytest.raises(ExportError, match="'a' appears twice"):
        index.BruteForceRetrieval(encoder, spec, vectors, ["a", "a"])
    with pytest.raises(ExportError, match="empty string"):
        index.BruteForceRetrieval(encoder, spec, vectors, ["a", ""])
    with pytest.raises(ExportError, match="2 candidate ids for 3 embeddings"):
        index.BruteForceRetrieval(encoder, spec, np.eye(3, 2, dtype=np.float32),
                                  ["a", "b"])
    clash = {"k": tf.TensorSpec([None], tf.float32, name="k")}
    with pytest.raises(ExportError, match=r"\['k'\] clash"):
        index.BruteForceRetrieval(lambda f: tf.stack([f["k"], f["k"]], 1), clash,
                                  vectors, ["a", "b"])


# --------------------------------------------------------------------------- #
# Export layout: configs, warm-up, candidate files, export.json
# --------------------------------------------------------------------------- #


def _parse_config(path: pathlib.Path) -> dict[str, str]:
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(path.read_text(), config)
    return {c.name: c.base_path for c in config.model_config_list.config
            if c.model_platform == "tensorflow"}


def test_model_configs(exported):
    export_dir = exported[0]
    assert _parse_config(export_dir / "models.config") == {
        "towers": "/models/towers", "retrieval": "/models/retrieval",
        "retrieval_brute_force": "/models/retrieval_brute_force"}
    assert _parse_config(export_dir / "models.stock.config") == {
        "towers": "/models/towers",
        "retrieval_brute_force": "/models/retrieval_brute_force"}


def _ops(version_dir: pathlib.Path) -> set[str]:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    return {n.op for f in graph.library.function for n in f.node_def} | {
        n.op for n in graph.node}


def test_scann_ops_only_in_the_scann_model(exported):
    export_dir = exported[0]
    assert any(op.startswith("Scann>") for op in _ops(export_dir / "retrieval" / "1"))
    for name in ("towers", "retrieval_brute_force"):
        assert not [op for op in _ops(export_dir / name / "1") if ">" in op], name


def test_every_savedmodel_has_warmup_requests(exported):
    export_dir = exported[0]
    retrieval = ["serving_default", "top_k", "top_k_exclude", "top_k_filter"]
    expected = {"towers": ["query", "candidate", "serving_default"],
                "retrieval": retrieval, "retrieval_brute_force": retrieval}
    for name, signatures in expected.items():
        path = export_dir / name / "1" / "assets.extra" / "tf_serving_warmup_requests"
        assert path.is_file(), path
        requests = warmup.read_warmup(export_dir / name / "1")
        assert [r.model_spec.signature_name for r in requests] == signatures
        assert {r.model_spec.name for r in requests} == {name}
        for request in requests:  # typed as the signatures want
            if "age" in request.inputs:
                assert request.inputs["age"].dtype == tf.float32.as_datatype_enum
            if "k" in request.inputs:
                assert request.inputs["k"].dtype == tf.int32.as_datatype_enum


def test_candidate_files_match_corpus_and_towers(exported, loaded):
    export_dir, prepared, result = exported
    embeddings, ids = candidates.read_candidates(export_dir)
    assert embeddings.dtype == np.float32 and embeddings.shape == (2000, 16)
    assert ids == prepared.corpus["movie_id"].astype(str).tolist()
    lines = (export_dir / "candidate_ids.txt").read_text().splitlines()
    assert lines == ids
    head = prepared.corpus.head(5)
    feed = {c: tf.constant(head[c].astype(str).tolist()) for c in
            ("movie_id", "title", "genres", "year")}
    direct = loaded["towers"].signatures["candidate"](**feed)["embedding"].numpy()
    np.testing.assert_allclose(embeddings[:5], direct, atol=1e-5)
    info = result["export"]
    assert info["candidate_embeddings"]["count"] == 2000
    assert info["candidate_embeddings"]["dim"] == 16
    assert info["retrieval"]["max_k"] == info["retrieval_brute_force"]["max_k"] == 50
    assert info["retrieval"]["path"] == "retrieval/1"
    assert info["model_config"]["stock_models"] == ["towers", "retrieval_brute_force"]
    on_disk = json.loads((export_dir / "export.json").read_text())
    assert on_disk["retrieval_brute_force"]["index"] == "brute_force"
    assert on_disk["towers"] == {"version": 1, "path": "towers/1"}  # old keys stay


def test_candidate_ids_escaping_round_trips(tmp_path):
    ids = ["plain", "tab\there", "line\nbreak", "back\\slash", "cr\r", "日本"]
    candidates.write_candidates(tmp_path, np.zeros([6, 2], np.float32), ids)
    assert candidates.read_candidates(tmp_path)[1] == ids
    assert len((tmp_path / "candidate_ids.txt").read_text().split("\n")) == 7
    with pytest.raises(ExportError, match="not found"):
        candidates.read_candidates(tmp_path / "missing")


def test_export_without_corpus_has_towers_only(exported, tmp_path):
    _, prepared, _ = exported
    info = export.export_model(prepared.model, tmp_path)
    assert "retrieval" not in info and info["model_config"]["models"] == ["towers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "export.json", "keras_towers", "models.config", "models.stock.config",
        "query_tower.json", "query_tower.tflite", "query_tower_vocab", "towers"]


def test_export_with_custom_max_k_and_scann_options(exported, tmp_path):
    _, prepared, _ = exported
    corpus = prepared.corpus.head(1500)
    options = {"mode": "tree_ah", "num_leaves": 15, "num_leaves_to_search": 5,
               "training_sample_size": 1500, "dimensions_per_block": 2,
               "anisotropic_quantization_threshold": 0.2, "reorder": 100}
    info = export.export_model(prepared.model, tmp_path, corpus=corpus, max_k=5,
                               scann_options=options)
    assert info["retrieval"]["scann"] == options
    assert info["retrieval"]["max_k"] == 5 and info["num_candidates"] == 1500
    loaded = tf.saved_model.load(str(tmp_path / "retrieval" / "1"))
    out = loaded.signatures["serving_default"](**_feed(user_features(prepared, 2)))
    assert out["ids"].shape == (2, 5)


# --------------------------------------------------------------------------- #
# Towers and brute force load in a process that imports only TensorFlow
# --------------------------------------------------------------------------- #

_BARE_TF = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    spec = json.load(open(sys.argv[1]))
    out = {}
    for name, path in spec["paths"].items():
        loaded = tf.saved_model.load(path)
        for signature, inputs in spec["calls"][name].items():
            function = loaded.signatures[signature]
            types = function.structured_input_signature[1]
            result = function(**{k: tf.constant(v, types[k].dtype)
                                 for k, v in inputs.items()})
            out[f"{name}/{signature}"] = {
                k: [[x.decode() if isinstance(x, bytes) else float(x) for x in row]
                    for row in v.numpy().tolist()] for k, v in result.items()}
    out["modules"] = sorted(m for m in ("tfdssm", "scann", "tensorflow_text",
                                        "tensorflow_recommenders") if m in sys.modules)
    json.dump(out, open(sys.argv[2], "w"))
""")


def test_towers_and_brute_force_load_with_only_tensorflow(exported, loaded, tmp_path):
    export_dir, prepared, _ = exported
    users = user_features(prepared, 3)
    movies = {c: prepared.corpus[c].astype(str).head(3).tolist()
              for c in ("movie_id", "title", "genres", "year")}
    calls = {"towers": {"query": users, "candidate": movies},
             "retrieval_brute_force": {
                 "serving_default": users,
                 "top_k_exclude": {**users, "k": [3, 1, 2],
                                   "exclude": [["1"], [""], ["2"]]},
                 "top_k_filter": {**users, "k": [3, 4, 2],
                                  "exclude": [["1"], [""], [""]],
                                  "allow": [["genres=Drama", "genres=Comedy"],
                                            ["year=1995", ""], ["genres=None", ""]],
                                  "deny": [["genres=Horror"], [""], [""]]}}}
    spec = {"paths": {n: str(export_dir / n / "1") for n in calls}, "calls": calls}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "bare.py").write_text(_BARE_TF)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "bare.py", "spec.json", "out.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out.pop("modules") == []
    for key, outputs in out.items():
        name, signature = key.split("/")
        inputs = calls[name][signature]
        function = loaded[name].signatures[signature]
        types = function.structured_input_signature[1]
        expected = function(**{k: tf.constant(v, types[k].dtype)
                               for k, v in inputs.items()})
        for output, values in outputs.items():
            want = expected[output].numpy()
            if want.dtype == object:
                assert values == [[b.decode() for b in r] for r in want], key
            else:
                np.testing.assert_array_equal(np.array(values, np.float32), want,
                                              err_msg=key)
    assert out["retrieval_brute_force/top_k_exclude"]["ids"][1][1:] == ["", ""]
    assert out["retrieval_brute_force/top_k_filter"]["ids"][2] == [""] * 4


def test_read_candidates_frame_matches_corpus_parquet(exported):
    export_dir = exported[0]
    corpus = pd.read_parquet(export_dir / "corpus.parquet")
    _, ids = candidates.read_candidates(export_dir)
    assert corpus["movie_id"].astype(str).tolist() == ids


def test_signature_encoder_rebuilds_retrieval_from_an_export(exported, loaded,
                                                             tmp_path):
    export_dir, prepared, _ = exported
    encoder = index.SignatureEncoder(export.load_towers(export_dir))
    embeddings, ids = candidates.read_candidates(export_dir)
    module = index.BruteForceRetrieval(encoder, encoder.input_spec, embeddings, ids,
                                       max_k=20)
    module.save(tmp_path / "rebuilt")
    rebuilt = tf.saved_model.load(str(tmp_path / "rebuilt"))
    features = _feed(user_features(prepared, 4))
    got = rebuilt.signatures["top_k"](**features, k=tf.constant([20, 5, 1, 20]))
    want = loaded["retrieval_brute_force"].signatures["top_k"](
        **features, k=tf.constant([20, 5, 1, 20]))
    assert _ids(got["ids"]) == _ids(want["ids"])
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), atol=1e-6)


def test_candidates_without_an_id_are_left_out(exported, tmp_path):
    _, prepared, _ = exported
    corpus = prepared.corpus.head(30).copy()
    corpus.loc[[3, 7], "movie_id"] = ""
    with pytest.warns(DataWarning, match=r"2 candidate\(s\) with an empty 'movie_id'"):
        info = export.export_model(prepared.model, tmp_path, corpus=corpus,
                                   tflite=False)
    assert info["retrieval_brute_force"]["num_candidates"] == 28
    assert "" not in candidates.read_candidates(tmp_path)[1]
