"""``tfdssm index`` (tfdssm.indexing, Apache Beam) and the sharded front
(tfdssm.serving.front), on the tiny pairs export, loopback only.

The pipeline runs on Beam's DirectRunner engine in-process (``in_memory``,
one worker: the two-process default takes ~30 s to start its workers here,
see ``test_local_default_runs_two_processes_without_prism`` for the options).
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import io
import json
import pathlib
import shutil
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
import scann  # noqa: F401 - registers ScaNN's ops for loading `retrieval`
import tensorflow as tf
from serving_helpers import running_server

from tfdssm import cli
from tfdssm.client import Client
from tfdssm.errors import DataError, ServingError
from tfdssm.export import candidates, serving_config
from tfdssm.indexing import build, corpus, pipeline, reindex
from tfdssm.serving.front import FrontServer

IN_PROCESS = ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]
QUERIES = ["apple recipe 1", "kiwi recipe 3", "grape recipe 0", "new fruit salad"]
# Scores of two index builds agree to float32 rounding, not bit for bit: the
# candidate tower's matmuls round differently for different batch shapes (train
# embeds the corpus in one batch, RunInference in the batches Beam forms);
# measured here: at most 1.5e-7.
SCORE_ATOL = 1e-6


def _changed_corpus() -> pd.DataFrame:
    """The 10 training documents minus D3 and D7, plus 16 new ones (24)."""
    from conftest import TOPICS

    rows = [{"doc_id": f"D{i}", "doc": f"all about {TOPICS[i]}"}
            for i in range(10) if i not in (3, 7)]
    rows += [{"doc_id": f"N{i}", "doc": f"fresh {TOPICS[i % 10]} salad {i}"}
             for i in range(16)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def export_dir(pairs_export, tmp_path_factory):
    """A private copy of the session's pairs export (this module adds versions)."""
    target = tmp_path_factory.mktemp("beam_index") / "export"
    shutil.copytree(pairs_export[0], target)
    return target


@pytest.fixture(scope="module")
def single_server(export_dir):
    """A server of ``export_dir`` (its single index), started by the re-index test
    and reused as the sharded front's reference (one server start less)."""
    with running_server(export_dir, rest_port=None, poll_seconds=0.2) as server:
        yield server


def _top_k(loaded, k: int, exclude=None):
    features = {"query": tf.constant(QUERIES)}
    ks = tf.constant([k] * len(QUERIES), tf.int32)
    if exclude is None:
        out = loaded.signatures["top_k"](**features, k=ks)
    else:
        out = loaded.signatures["top_k_exclude"](
            **features, k=ks, exclude=tf.constant([exclude] * len(QUERIES)))
    return ([[b.decode() for b in row] for row in out["ids"].numpy()],
            out["scores"].numpy())


def _pins(export_dir) -> dict:
    return serving_config.pinned_versions(export_dir)


def test_corpus_readers_agree_on_csv_parquet_and_tfrecord(tmp_path):
    frame = pd.DataFrame({"doc_id": ["a", "b", ""], "doc": ["x y", "", "z"],
                          "year": ["1990", "2000", "2010"]})
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet", index=False)
    with tf.io.TFRecordWriter(str(tmp_path / "c.tfrecord")) as writer:
        for _, row in frame.iterrows():
            example = tf.train.Example()
            for name in ("doc_id", "doc"):
                example.features.feature[name].bytes_list.value.append(
                    row[name].encode())
            example.features.feature["year"].float_list.value.append(float(row["year"]))
            writer.write(example.SerializeToString())
    columns = {"doc": "string", "year": "float"}
    got = {suffix: list(corpus.read_rows(str(tmp_path / f"c.{suffix}"), columns,
                                         "doc_id"))
           for suffix in ("csv", "parquet", "tfrecord")}
    want = [{"doc_id": "a", "doc": "x y", "year": 1990.0},
            {"doc_id": "b", "doc": "", "year": 2000.0}]  # the row without id is skipped
    assert got == {"csv": want, "parquet": want, "tfrecord": want}
    with pytest.raises(DataError, match=r"no column\(s\) \['title'\]"):
        list(corpus.read_rows(str(tmp_path / "c.csv"), {"title": "string"}, "doc_id"))
    with pytest.raises(DataError, match="matches no file"):
        corpus.expand([str(tmp_path / "nothing-*.csv")])


def test_local_default_runs_two_processes_without_prism():
    options = pipeline.pipeline_options(["--job_name", "x"])
    all_options = options.get_all_options()
    assert all_options["runner"] == "DirectRunner"
    assert all_options["direct_running_mode"] == "multi_processing"
    assert all_options["direct_num_workers"] == 2
    assert type(pipeline._runner(options)).__name__ == "FnApiRunner"  # not Prism
    flink = pipeline.pipeline_options(["--runner", "FlinkRunner",
                                       "--flink_master", "host:8081"])
    assert pipeline._runner(flink) == "FlinkRunner"
    assert flink.get_all_options()["flink_master"] == "host:8081"


def test_index_same_corpus_equals_the_trained_index(export_dir, pairs_export):
    before = tf.saved_model.load(str(export_dir / "retrieval_brute_force" / "1"))
    corpus_file = export_dir.parent / "same.csv"
    pd.read_parquet(export_dir / "corpus.parquet").to_csv(corpus_file, index=False)
    # Through the CLI: the Beam options it does not know go to Beam.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["index", "--export-dir", str(export_dir), "--corpus",
                         str(corpus_file), *IN_PROCESS])
    assert code == 0, err.getvalue()
    assert "10 candidates; retrieval version 2, retrieval_brute_force version 2 " \
        "(committed)" in out.getvalue()
    assert "pipeline finished" in err.getvalue()  # progress on stderr
    info = json.loads((export_dir / "export.json").read_text())
    assert info["retrieval_brute_force"]["version"] == 2 == info["retrieval"]["version"]
    assert _pins(export_dir) == {"towers": 1, "retrieval": 2,
                                 "retrieval_brute_force": 2}
    assert info["num_candidates"] == 10 and info["indexed"]["runner"] == "DirectRunner"
    assert info["indexed"]["id_column"] == "doc_id"
    serving_config.check_committed(export_dir, info)  # digests match the files
    after = tf.saved_model.load(str(export_dir / "retrieval_brute_force" / "2"))
    for k, exclude in ((10, None), (3, None), (5, ["D0", "D4"])):
        ids_b, scores_b = _top_k(before, k, exclude)
        ids_a, scores_a = _top_k(after, k, exclude)
        assert ids_a == ids_b
        np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=SCORE_ATOL)
    scann_ids, _ = _top_k(tf.saved_model.load(str(export_dir / "retrieval" / "2")), 10)
    assert scann_ids == _top_k(before, 10)[0]
    assert not list(export_dir.glob(".tfdssm-index-*"))  # work dir removed


def test_reindex_serves_new_items_and_a_killed_run_changes_nothing(
        export_dir, single_server, monkeypatch):
    corpus_file = export_dir.parent / "changed.parquet"
    _changed_corpus().to_parquet(corpus_file, index=False)
    server = single_server
    with Client(f"127.0.0.1:{server.grpc_port}") as client:
        served = client.top_k({"query": QUERIES}, k=10, model="retrieval_brute_force")
        pins = _pins(export_dir)

        class Killed(Exception):
            pass

        def kill(step):
            if step == "retrieval":  # brute force version renamed in, not committed
                raise Killed(step)

        monkeypatch.setattr(build, "_hook", kill)
        with pytest.raises(Killed):
            reindex.index_corpus(export_dir, [str(corpus_file)], beam_args=IN_PROCESS)
        monkeypatch.undo()
        assert (export_dir / "retrieval_brute_force" / str(
            pins["retrieval_brute_force"] + 1)).is_dir()
        assert _pins(export_dir) == pins
        time.sleep(0.6)  # a few polls: the uncommitted version must not load
        again = client.top_k({"query": QUERIES}, k=10, model="retrieval_brute_force")
        assert again[0].tolist() == served[0].tolist()
        assert not {i for row in served[0] for i in row} & {"N0", "N1", "N13"}

        reindex.index_corpus(export_dir, [str(corpus_file)], beam_args=IN_PROCESS)
        new_pins = _pins(export_dir)
        assert new_pins["retrieval_brute_force"] == pins["retrieval_brute_force"] + 2
        deadline = time.monotonic() + 30
        while server.manager.served()["retrieval_brute_force"] != new_pins[
                "retrieval_brute_force"] and time.monotonic() < deadline:
            time.sleep(0.2)
        ids, _ = client.top_k({"query": QUERIES}, k=24, model="retrieval_brute_force")
    everything = set(ids[0])
    assert everything == set(_changed_corpus()["doc_id"])  # D3, D7 gone, N* served
    info = json.loads((export_dir / "export.json").read_text())
    assert info["num_candidates"] == 24 and info["retrieval"]["max_k"] == 24


def _front_requests(target: str, k: int = 5):
    with Client(target, timeout=20) as client:
        model = "retrieval_brute_force"
        return {
            "top_k": client.top_k({"query": QUERIES}, k=k, model=model),
            "exclude": client.top_k({"query": QUERIES}, k=k, exclude=["N1", "D0", "N5"],
                                    model=model),
            "default": client.predict("retrieval_brute_force", {"query": QUERIES}),
        }


def test_sharded_front_merges_to_the_single_index(export_dir, single_server):
    # After the previous test: the export's single index is over _changed_corpus(),
    # and single_server serves it (the reference the front must equal).
    corpus_file = export_dir.parent / "changed.parquet"
    assert json.loads((export_dir / "export.json").read_text())["num_candidates"] == 24
    whole = single_server
    deadline = time.monotonic() + 30
    while whole.manager.served() != _pins(export_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert whole.manager.served() == _pins(export_dir)
    result = reindex.index_corpus(export_dir, [str(corpus_file)], num_shards=2,
                                  max_k=8, beam_args=IN_PROCESS)
    sizes = [info["num_candidates"] for info in result["export.json"]]
    assert sum(sizes) == 24 and min(sizes) >= 8
    shards = json.loads((export_dir / "shards" / "shards.json").read_text())
    assert [s["num_candidates"] for s in shards["shards"]] == sizes
    for i in range(2):  # every id in the shard it hashes to
        _, ids = candidates.read_candidates(reindex.shard_dir(export_dir, i))
        assert {corpus.shard_of(c, 2) for c in ids} == {i}
    with running_server(reindex.shard_dir(export_dir, 0), rest_port=None) as s0, \
            running_server(reindex.shard_dir(export_dir, 1), rest_port=None) as s1:
        addresses = [f"127.0.0.1:{s0.grpc_port}", f"127.0.0.1:{s1.grpc_port}"]
        want = _front_requests(f"127.0.0.1:{whole.grpc_port}")
        front = FrontServer(addresses, grpc_port=0, rest_port=0).start()
        try:
            got = _front_requests(f"127.0.0.1:{front.grpc_port}")
            for key in ("top_k", "exclude"):
                assert got[key][0].tolist() == want[key][0].tolist(), key
                np.testing.assert_allclose(got[key][1], want[key][1], rtol=0,
                                           atol=SCORE_ATOL)
            assert not {"N1", "D0", "N5"} & set(got["exclude"][0].ravel())
            default = got["default"]
            assert default["ids"].shape == (len(QUERIES), 8)
            assert default["ids"].tolist() == want["default"]["ids"][:, :8].tolist()
            np.testing.assert_allclose(default["scores"],
                                       want["default"]["scores"][:, :8], rtol=0,
                                       atol=SCORE_ATOL)
            with Client(f"127.0.0.1:{front.grpc_port}") as client, \
                    pytest.raises(ServingError, match="k must be between 1 and max_k=8"
                                  ):
                client.top_k({"query": QUERIES}, k=9, model="retrieval_brute_force")
            body = json.dumps({"signature_name": "top_k", "inputs": {
                "query": QUERIES[:1], "k": [3]}}).encode()
            rest = urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{front.rest_port}/v1/models/retrieval:predict",
                body), timeout=20)
            assert len(json.loads(rest.read())["outputs"]["ids"][0]) == 3

            partial = FrontServer(addresses, grpc_port=0, rest_port=None,
                                  timeout_seconds=2, allow_partial=True).start()
            try:
                s1.stop(grace_seconds=0)
                start = time.monotonic()
                with Client(f"127.0.0.1:{front.grpc_port}", timeout=20) as client, \
                        pytest.raises(ServingError) as failed:
                    client.top_k({"query": QUERIES}, k=5, model="retrieval_brute_force")
                assert time.monotonic() - start < 10
                assert failed.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
                assert f"shard 1 ({addresses[1]}) did not answer" in str(failed.value)
                with Client(f"127.0.0.1:{partial.grpc_port}", timeout=20) as client:
                    out = client.predict("retrieval_brute_force", {
                        "query": QUERIES, "k": [5] * len(QUERIES)}, "top_k")
                assert out["shards_answered"].tolist() == [[1, 0]] * len(QUERIES)
                ids0 = {c for row in out["ids"] for c in row.tolist()} - {b""}
                assert {corpus.shard_of(c.decode(), 2) for c in ids0} == {0}
            finally:
                partial.stop(grace_seconds=0)
        finally:
            front.stop(grace_seconds=0)


def test_front_needs_reachable_shards():
    with pytest.raises(ServingError, match=r"cannot reach the shard servers: shard 0"):
        FrontServer(["127.0.0.1:1"], grpc_port=0, rest_port=None,
                    timeout_seconds=0.5).start()
    with pytest.raises(Exception, match="HOST:PORT"):
        FrontServer("127.0.0.1", grpc_port=0)


@pytest.mark.bench
def test_cli_default_runs_two_worker_processes_offline(pairs_export, tmp_path):
    """The local default (2 worker processes, ~30 s to start here): `make bench`."""
    import os
    import subprocess
    import sys

    export = tmp_path / "export"
    shutil.copytree(pairs_export[0], export)
    corpus_file = tmp_path / "changed.csv"
    _changed_corpus().to_csv(corpus_file, index=False)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}  # Prism would cache its binary here
    done = subprocess.run(
        [sys.executable, "-m", "tfdssm.cli", "index", "--export-dir", str(export),
         "--corpus", str(corpus_file)], capture_output=True, text=True, env=env,
        timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "multi_processing, 2 worker(s)" in done.stderr
    assert "24 candidates; retrieval version 2" in done.stdout
    assert not (home / ".apache_beam").exists()  # nothing downloaded
    assert "prism" not in done.stderr.lower()


def test_hybrid_exports_get_bm25_rebuilt_over_the_new_corpus(pairs_export):
    info = json.loads((pathlib.Path(pairs_export[0]) / "export.json").read_text())
    info["hybrid"] = {"weight": 0.4}  # as a hybrid export records it
    frame = _changed_corpus()
    fusion = build._hybrid(info, frame)
    assert fusion.lexical.num_documents == len(frame) == 24
    assert fusion.text_column == "query"
    assert float(fusion.weight.numpy()) == pytest.approx(0.4)
    assert build._hybrid({k: v for k, v in info.items() if k != "hybrid"},
                         frame) is None


def test_fewer_shards_than_before_warns_about_the_old_ones(tmp_path, caplog):
    for i in range(4):
        reindex.shard_dir(tmp_path, i).mkdir(parents=True)
    with caplog.at_level("WARNING", logger="tfdssm"):
        assert reindex._warn_stale_shards(tmp_path, 2) == ["2", "3"]
        assert reindex._warn_stale_shards(tmp_path, 4) == []
    assert "shard dir(s) 2, 3 of an earlier index" in caplog.text
