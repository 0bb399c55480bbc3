"""Tests for tfdssm.export: the towers SavedModel contract and export.json."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tfdssm import export
from tfdssm.errors import ExportError
from tfdssm.text import hashing, unicode_table

QUERY_TEXTS = ["apple recipe 3", "Café 北京", "", "LEMON   lemon!", "x" * 400]
DOC_TEXTS = ["all about kiwi", "ünïcödé ß", "", "all about figs", "doc"]


def _signature_defs(version_dir: pathlib.Path) -> dict:
    """The SignatureDefs as TF Serving sees them (parsed from saved_model.pb)."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return dict(proto.meta_graphs[0].signature_def)


def _dims(shape) -> list[int]:
    return [d.size for d in shape.dim]


def _tower_outputs(model, side: str, inputs: dict) -> np.ndarray:
    tower = model.query_tower if side == "query" else model.candidate_tower
    return tower({k: tf.constant(v) for k, v in inputs.items()}).numpy()


# --------------------------------------------------------------------------- #
# Signatures
# --------------------------------------------------------------------------- #


def test_towers_signature_defs(pairs_export):
    export_dir, _, result = pairs_export
    version_dir = export_dir / "towers" / "1"
    assert result["export"]["towers"] == {"version": 1, "path": "towers/1"}
    defs = _signature_defs(version_dir)
    assert {"query", "candidate", "serving_default"} <= set(defs)
    for name, column in [("query", "query"), ("candidate", "doc"),
                         ("serving_default", "query")]:
        signature = defs[name]
        assert list(signature.inputs) == [column]
        assert signature.inputs[column].dtype == tf.string.as_datatype_enum
        assert _dims(signature.inputs[column].tensor_shape) == [-1]
        assert list(signature.outputs) == ["embedding"]
        assert signature.outputs["embedding"].dtype == tf.float32.as_datatype_enum
        assert _dims(signature.outputs["embedding"].tensor_shape) == [-1, 8]


def test_signatures_equal_towers_in_process(pairs_export):
    export_dir, prepared, _ = pairs_export
    loaded = export.load_towers(export_dir)
    query = loaded.signatures["query"](query=tf.constant(QUERY_TEXTS))["embedding"]
    candidate = loaded.signatures["candidate"](doc=tf.constant(DOC_TEXTS))["embedding"]
    default = loaded.signatures["serving_default"](query=tf.constant(QUERY_TEXTS))
    assert query.dtype == tf.float32 and query.shape == (5, 8)
    expected_q = _tower_outputs(prepared.model, "query", {"query": QUERY_TEXTS})
    expected_c = _tower_outputs(prepared.model, "candidate", {"doc": DOC_TEXTS})
    np.testing.assert_allclose(query.numpy(), expected_q, atol=1e-6)
    np.testing.assert_allclose(candidate.numpy(), expected_c, atol=1e-6)
    np.testing.assert_allclose(default["embedding"].numpy(), expected_q, atol=1e-6)
    # Cosine towers: unit rows, except the empty text (no trigrams) is still finite.
    assert np.isfinite(query.numpy()).all()
    np.testing.assert_allclose(np.linalg.norm(expected_q[:2], axis=1), 1.0, atol=1e-5)


def test_signature_rejects_wrong_input_name(pairs_export):
    export_dir, _, _ = pairs_export
    loaded = export.load_towers(export_dir, version=1)
    with pytest.raises(TypeError):
        loaded.signatures["query"](doc=tf.constant(["a"]))


# --------------------------------------------------------------------------- #
# Versions and atomicity
# --------------------------------------------------------------------------- #


def _snapshot(directory: pathlib.Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _leftovers(directory: pathlib.Path) -> list[str]:
    return [str(p) for p in directory.rglob("*") if ".tmp" in p.name]


def test_second_export_adds_a_version_and_leaves_the_first(pairs_export, tmp_path):
    export_dir, prepared, _ = pairs_export
    shutil.copytree(export_dir, tmp_path, dirs_exist_ok=True)  # copy2 keeps mtimes
    before = _snapshot(tmp_path / "towers" / "1")
    assert "saved_model.pb" in before
    second = export.export_model(prepared.model, tmp_path, corpus=prepared.corpus,
                                 metrics={"recall@10": 0.75})
    assert second["towers"] == {"version": 2, "path": "towers/2"}
    assert export.versions(tmp_path / "towers") == [1, 2]
    assert sorted(os.listdir(tmp_path / "towers")) == ["1", "2"]
    assert _snapshot(tmp_path / "towers" / "1") == before  # same bytes and mtimes
    assert (tmp_path / "towers" / "2" / "saved_model.pb").is_file()
    assert export.read_export(tmp_path)["metrics"] == {"recall@10": 0.75}
    assert _leftovers(tmp_path) == []
    # load_towers defaults to the version export.json records (the newest
    # here); both load.
    newest = export.load_towers(tmp_path)
    oldest = export.load_towers(tmp_path, version=1)
    text = tf.constant(["apple"])
    np.testing.assert_allclose(newest.signatures["query"](query=text)["embedding"],
                               oldest.signatures["query"](query=text)["embedding"],
                               atol=1e-6)


def test_no_temporary_directories_remain(pairs_export):
    export_dir, _, _ = pairs_export
    assert _leftovers(export_dir) == []
    assert sorted(p.name for p in (export_dir / "towers").iterdir()) == ["1"]
    assert {"corpus.parquet", "export.json", "towers"} <= {
        p.name for p in export_dir.iterdir()}


def test_failed_save_leaves_no_version_and_no_temporary(tmp_path):
    def broken_save(directory):
        (directory / "partial.pb").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export._atomic_save(tmp_path / "towers", broken_save)
    assert list((tmp_path / "towers").iterdir()) == []


def test_next_version_ignores_non_integer_entries(tmp_path):
    base = tmp_path / "towers"
    assert export.versions(base) == [] and export.next_version(base) == 1
    for name in ["1", "3", "10", ".tmp-abc", "latest"]:
        (base / name).mkdir(parents=True)
    (base / "7").write_text("a file, not a version")
    assert export.versions(base) == [1, 3, 10]
    assert export.next_version(base) == 11


# --------------------------------------------------------------------------- #
# export.json and read_export
# --------------------------------------------------------------------------- #


def test_export_json_contents(pairs_export):
    export_dir, prepared, result = pairs_export
    info = json.loads((export_dir / "export.json").read_text())
    assert info == result["export"]
    assert info["format_version"] == export.FORMAT_VERSION
    assert info["hashing"]["version"] == hashing.HASHING_VERSION == 1
    assert info["hashing"]["multiplier"] == hashing.MULTIPLIER == 1_000_000_007
    assert info["hashing"]["modulus"] == hashing.MODULUS == 2_147_483_647
    assert info["hashing"]["boundary"] == hashing.BOUNDARY
    assert info["hashing"]["unicode_table"] == unicode_table.TABLE_FILE
    assert info["hashing"]["unicode_version"] == unicode_table.UNICODE_VERSION
    assert info["candidate_id"] == "doc_id"
    assert [f["name"] for f in info["query"]["features"]] == ["query"]
    assert [f["name"] for f in info["candidate"]["features"]] == ["doc"]
    text = info["query"]["features"][0]
    assert (text["kind"], text["num_buckets"]) == ("text", 500)
    assert text["embedding_dim"] == 16
    assert info["query"]["output_dim"] == info["candidate"]["output_dim"] == 8
    assert info["candidate"]["shared_with_query"] is False
    assert set(info["metrics"]) >= {"recall@10", "ndcg@10", "mrr@10", "auc"}
    assert info["metrics"] == pytest.approx(result["metrics"])
    assert info["training"]["epochs"] == 1 and info["training"]["pipeline"] == "pairs"
    assert info["corpus"] == "corpus.parquet"
    assert info["num_candidates"] == len(prepared.corpus) == 10
    assert export.read_export(export_dir) == info


def test_read_export_on_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(ExportError, match="is not a tfdssm export.*export.json"):
        export.read_export(tmp_path)
    with pytest.raises(ExportError, match="not a tfdssm export"):
        export.read_export(tmp_path / "does-not-exist")


def test_read_export_invalid_json(tmp_path):
    (tmp_path / "export.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        export.read_export(tmp_path)


def test_load_towers_errors(tmp_path, pairs_export):
    with pytest.raises(ExportError, match="no towers/<version>"):
        export.load_towers(tmp_path)
    export_dir, _, _ = pairs_export
    with pytest.raises(ExportError, match=r"version 9 not found; have \[1\]"):
        export.load_towers(export_dir, version=9)


def test_export_dir_that_is_a_file(pairs_export, tmp_path):
    _, prepared, _ = pairs_export
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export.export_model(prepared.model, target)


# --------------------------------------------------------------------------- #
# A process that imports only TensorFlow loads the towers
# --------------------------------------------------------------------------- #

_BARE_TF_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import tensorflow as tf

    jobs = json.load(open(sys.argv[1]))
    out = {}
    for job, spec in jobs.items():
        loaded = tf.saved_model.load(spec["path"])
        result = out[job] = {"outputs": {}, "dtypes": {}}
        for name, inputs in spec["inputs"].items():
            function = loaded.signatures[name]
            specs = function.structured_input_signature[1]
            result["dtypes"][name] = {k: s.dtype.name for k, s in specs.items()}
            feed = {k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()}
            result["outputs"][name] = function(**feed)["embedding"].numpy().tolist()
    assert "tensorflow_text" not in sys.modules, "towers need tensorflow_text"
    assert "tfdssm" not in sys.modules, "towers need tfdssm"
    out["modules"] = {m: m in sys.modules for m in
                      ("tfdssm", "tensorflow_text", "tensorflow_recommenders", "scann")}
    out["legacy_keras"] = os.environ.get("TF_USE_LEGACY_KERAS")
    json.dump(out, open(sys.argv[2], "w"))
""")

PAIRS_INPUTS = {"query": {"query": QUERY_TEXTS}, "candidate": {"doc": DOC_TEXTS}}
USERS = {"user_id": ["1", "5", "unknown-user"], "age": [18.0, 38.0, 99.5],
         "gender": ["M", "F", "M"], "occupation": ["student", "doctor", "?"],
         "zip_prefix": ["10", "13", "00"]}
MOVIES = {"movie_id": ["1", "4", "999"], "title": ["Café Movie 0 北京", "Unseen", ""],
          "genres": ["Action|Comedy", "Drama|War|Unknown", ""],
          "year": ["1990", "1993", "2050"]}


@pytest.fixture(scope="module")
def bare_tensorflow(pairs_export, movielens_export, tmp_path_factory):
    """Loads both exports' towers/1 in one fresh process importing only TensorFlow."""
    work = tmp_path_factory.mktemp("bare_tf")
    script, jobs_file = work / "bare_tf.py", work / "jobs.json"
    out_file = work / "out.json"
    script.write_text(_BARE_TF_SCRIPT)
    jobs_file.write_text(json.dumps({
        "pairs": {"path": str(pairs_export[0] / "towers" / "1"),
                  "inputs": PAIRS_INPUTS},
        "movielens": {"path": str(movielens_export[0] / "towers" / "1"),
                      "inputs": {"query": USERS, "candidate": MOVIES}},
    }))
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run(
        [sys.executable, str(script), str(jobs_file), str(out_file)],
        cwd=work, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out_file.read_text())


def test_bare_tensorflow_process_imports_nothing_else(bare_tensorflow):
    assert bare_tensorflow["modules"] == {"tfdssm": False, "tensorflow_text": False,
                                          "tensorflow_recommenders": False,
                                          "scann": False}
    assert bare_tensorflow["legacy_keras"] is None


def test_bare_tensorflow_process_loads_pairs_towers(pairs_export, bare_tensorflow):
    _, prepared, _ = pairs_export
    result = bare_tensorflow["pairs"]
    assert result["dtypes"] == {"query": {"query": "string"},
                                "candidate": {"doc": "string"}}
    for side, feed in PAIRS_INPUTS.items():
        expected = _tower_outputs(prepared.model, side, feed)
        np.testing.assert_allclose(np.array(result["outputs"][side]), expected,
                                   atol=1e-6, err_msg=side)


def test_movielens_export_signatures(movielens_export):
    export_dir, prepared, result = movielens_export
    defs = _signature_defs(export_dir / "towers" / "1")
    query_inputs = {k: v.dtype for k, v in defs["query"].inputs.items()}
    assert query_inputs == {
        "user_id": tf.string.as_datatype_enum, "age": tf.float32.as_datatype_enum,
        "gender": tf.string.as_datatype_enum, "occupation": tf.string.as_datatype_enum,
        "zip_prefix": tf.string.as_datatype_enum}
    assert set(defs["candidate"].inputs) == {"movie_id", "title", "genres", "year"}
    assert all(_dims(v.tensor_shape) == [-1] for v in defs["candidate"].inputs.values())
    assert _dims(defs["candidate"].outputs["embedding"].tensor_shape) == [-1, 8]
    kinds = {f["name"]: f["kind"] for f in result["export"]["candidate"]["features"]}
    assert kinds == {"movie_id": "categorical", "title": "text",
                     "genres": "multi_valued", "year": "categorical"}


def test_bare_tensorflow_process_loads_movielens_towers(movielens_export,
                                                        bare_tensorflow):
    _, prepared, _ = movielens_export
    result = bare_tensorflow["movielens"]
    assert result["dtypes"]["query"]["age"] == "float32"
    assert result["dtypes"]["query"]["user_id"] == "string"
    assert result["dtypes"]["candidate"]["genres"] == "string"
    expected_users = prepared.model.query_tower(
        {k: tf.constant(v, tf.float32 if k == "age" else tf.string)
         for k, v in USERS.items()}).numpy()
    expected_movies = _tower_outputs(prepared.model, "candidate", MOVIES)
    np.testing.assert_allclose(np.array(result["outputs"]["query"]), expected_users,
                               atol=1e-6)
    np.testing.assert_allclose(np.array(result["outputs"]["candidate"]),
                               expected_movies, atol=1e-6)
