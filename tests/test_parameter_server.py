"""Tests for tfdssm.training.parameter_server (``--strategy parameter_server``).

CI runs a parameter-server cluster in one subprocess (chief, 2 workers and
2 ps as in-process ``tf.distribute.Server`` s on loopback ports: one
TensorFlow start-up instead of five). ``make bench`` also runs the full
cluster as 5 processes, each running ``tfdssm train`` as a user would, and
compares its steps/s with a single-process run on the same data.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import json
import re
import resource
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
from test_distribute import _env, _free_ports, _pairs, _run_all

from tfdssm.errors import ConfigError
from tfdssm.features import TextFeature
from tfdssm.training import STRATEGIES, distribute, parameter_server
from tfdssm.training import run as train

CLUSTER = {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3"],
           "ps": ["127.0.0.1:4", "127.0.0.1:5"]}
# A model whose trigram table (8,192 x 16 float32 = 512 KiB) is split in two
# 256 KiB shards while its dense layers stay whole.
MODEL = {"num_buckets": 8192, "hidden": (16,), "dim": 8}


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _config(kind: str, index: int, cluster=CLUSTER) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster,
                                     "task": {"type": kind, "index": index}})}


def test_the_strategy_is_an_option():
    assert "parameter_server" in STRATEGIES


def test_tf_config_of_a_parameter_server_cluster():
    assert distribute.read_tf_config(_config("ps", 1))["task"] == {
        "type": "ps", "index": 1}
    assert parameter_server.is_server_task(_config("ps", 0))
    assert parameter_server.is_server_task(_config("worker", 1))
    assert not parameter_server.is_server_task(_config("chief", 0))
    no_ps = {"chief": ["c:1"], "worker": ["w:1"]}
    with pytest.raises(ConfigError, match=r"'ps': 0\}") as error:
        parameter_server.is_server_task(_config("worker", 0, no_ps))
    assert '"ps": ["host3:2222"' in str(error.value)  # an example to copy
    with pytest.raises(ConfigError, match="not set"):
        parameter_server.is_server_task({})


def test_make_strategy_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.make_strategy("parameter_server")
    monkeypatch.setenv("TF_CONFIG", _config("worker", 0)["TF_CONFIG"])
    with pytest.raises(ConfigError, match="serves the chief"):
        distribute.make_strategy("parameter_server")
    with pytest.raises(ConfigError, match="--strategy parameter_server"):
        distribute.make_strategy("multi_worker")  # a cluster with ps tasks
    with pytest.raises(ConfigError, match="is the chief"):
        parameter_server.run_server(_config("chief", 0))


def test_partitioner_splits_big_tables_only():
    split = parameter_server.partitioner(num_ps=2)
    table = split(tf.TensorShape([8192, 16]), tf.float32)
    dense = split(tf.TensorShape([16, 8]), tf.float32)
    assert (table, dense) == ([2, 1], [1, 1])
    assert split(tf.TensorShape([100_000, 64]), tf.float32) == [2, 1]  # <= num_ps
    with pytest.raises(ConfigError, match="min_shard_bytes"):
        parameter_server.partitioner(2, 0)


def test_parameter_server_input_steps_from_the_rows():
    frame = _pairs(50)
    creator, steps = train.parameter_server_input(
        frame, [TextFeature("query"), TextFeature("doc")], batch_size=16, seed=0)
    assert steps == 3  # 50 // 16
    assert isinstance(creator, tf.keras.utils.experimental.DatasetCreator)
    with pytest.raises(ConfigError, match="fill no batch of 64"):
        train.parameter_server_input(frame, [TextFeature("query")], 64, 0)


# --------------------------------------------------------------------------- #
# A loopback cluster (in-process servers) in one subprocess
# --------------------------------------------------------------------------- #

CLUSTER_SCRIPT = textwrap.dedent("""
    import json, sys
    import tfdssm
    import tensorflow as tf
    import pandas as pd
    from tfdssm.errors import ConfigError
    from tfdssm.recipes import pairs
    from tfdssm.training import parameter_server, run as train

    spec = json.loads(sys.argv[1])
    cluster = tf.train.ClusterSpec(spec)
    # In one process the servers share its threads: give them enough.
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=4)
    servers = [tf.distribute.Server(cluster, job_name=kind, task_index=i,
                                    config=config)
               for kind in ("worker", "ps") for i in range(len(spec[kind]))]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster, task_type="chief", task_id=0, rpc_layer="grpc")
    strategy = parameter_server.make_strategy(resolver)
    frame = pd.read_csv(sys.argv[2], dtype=str)
    with strategy.scope():
        prepared = pairs.prepare(frame, candidate_id_column="doc_id",
                                 **json.loads(sys.argv[4]))
    out = {}
    try:
        train.run(prepared, None, epochs=1, batch_size=16, verbose=0,
                  strategy=strategy, hard_negatives="bm25")
    except ConfigError as error:
        out["hard_negatives"] = str(error)
    result = train.run(prepared, sys.argv[3], epochs=2, batch_size=16,
                       learning_rate=0.01, verbose=2, strategy=strategy,
                       patience=1)
    model = prepared.model  # the trained, sharded model
    queries = ["apple recipe 0", "kiwi recipe 3", "lemon"]
    out.update(
        sharded=parameter_server.sharded_variables(model),
        devices={v.name: v.device for v in model.variables},
        embedding=model.query_tower({"query": tf.constant(queries)}).numpy().tolist(),
        queries=queries, training=result["export"]["training"],
        metrics=result["metrics"])
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("parameter_server")
    csv = root / "pairs.csv"
    _pairs(96).to_csv(csv, index=False)
    ports = _free_ports(5)
    spec = {"chief": [f"127.0.0.1:{ports[0]}"],
            "worker": [f"127.0.0.1:{p}" for p in ports[1:3]],
            "ps": [f"127.0.0.1:{p}" for p in ports[3:]]}
    script = root / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    start, cpu = time.monotonic(), _children_cpu()
    (log,) = _run_all(
        [[sys.executable, str(script), json.dumps(spec), str(csv),
          str(root / "export"), json.dumps(MODEL)]],
        [_env()], [root / "cluster.log"], root, timeout=300)
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    assert lines, log[-3000:]
    return {"result": json.loads(lines[-1][len("RESULT "):]), "log": log,
            "export_dir": root / "export", "seconds": time.monotonic() - start,
            "cpu": _children_cpu() - cpu}


def test_the_embedding_table_is_split_across_the_ps_tasks(cluster_run):
    result = cluster_run["result"]
    (table,) = result["sharded"]  # the shared towers' one trigram table
    assert table["shape"] == [8192, 16]
    assert [s["rows"] for s in table["shards"]] == [4096, 4096]
    assert [s["device"] for s in table["shards"]] == [
        "/job:ps/replica:0/task:0/device:CPU:0",
        "/job:ps/replica:0/task:1/device:CPU:0"]
    devices = result["devices"]  # every variable lives on a ps, none on the chief
    assert devices and all("/job:ps/" in d for d in devices.values())
    small = [n for n in devices if "part_" not in n]
    assert small  # the dense layers are whole
    assert result["training"]["parameter_servers"]["sharded_variables"] == [table]
    print(f"\nparameter-server cluster (in-process servers) on loopback: "
          f"{cluster_run['seconds']:.1f}s wall, {cluster_run['cpu']:.1f}s CPU")


def test_training_runs_asynchronous_steps_and_learns(cluster_run):
    training = cluster_run["result"]["training"]
    assert training["strategy"] == "ParameterServerStrategyV2"
    assert training["workers"] == 2
    assert training["parameter_servers"]["steps_per_epoch"] == 86 // 16
    losses = training["loss_history"]
    assert 1 <= len(losses) <= 2 and np.isfinite(losses).all()
    stopping = training["early_stopping"]  # it ran on the chief, every epoch
    assert stopping["epochs_run"] == len(losses) and stopping["epoch_kept"] >= 1
    assert stopping["validation"][0]["recall@10"] > 0
    assert cluster_run["result"]["metrics"]["recall@10"] > 0.5  # 10 candidates


def test_hard_negatives_are_refused_with_the_fix(cluster_run):
    message = cluster_run["result"]["hard_negatives"]
    assert "parameter-server" in message and "--hard-negatives none" in message


def test_the_export_is_the_trained_model_and_answers(cluster_run):
    from tfdssm.retrieve import LocalRetriever

    export_dir, result = cluster_run["export_dir"], cluster_run["result"]
    info = json.loads((export_dir / "export.json").read_text())
    towers = tf.saved_model.load(str(export_dir / "towers" / "1"))
    embedding = towers.signatures["query"](
        query=tf.constant(result["queries"]))["embedding"].numpy()
    np.testing.assert_allclose(embedding, result["embedding"], atol=1e-5)
    ids, scores = LocalRetriever(export_dir).top_k({"query": ["apple recipe 0"]}, k=3)
    assert ids.shape == scores.shape == (1, 3) and ids[0][0] == "D0"
    assert (export_dir / "query_tower.tflite").is_file() and info["tflite"]


# --------------------------------------------------------------------------- #
# The full cluster: 5 processes running `tfdssm train` (make bench)
# --------------------------------------------------------------------------- #


def _ms_per_step(log: str) -> float:
    """Keras' ms/step of the epochs after the first (which traces)."""
    values = [float(v) * (1 if unit == "ms" else 1000)
              for v, unit in re.findall(r"- (\d+(?:\.\d+)?)(ms|s)/step", log)]
    assert len(values) >= 2, log[-2000:]
    return float(np.mean(values[1:]))


@pytest.mark.bench
def test_full_parameter_server_cluster_with_the_cli(tmp_path):
    """Chief, 2 workers and 2 ps each run `tfdssm train --strategy
    parameter_server` with their TF_CONFIG, on a glob of CSV files (which the
    workers read); the export loads in a process that imports TensorFlow
    only; steps/s against a single-process run on the same files."""
    frame = _pairs(480)  # 3 files: the workers read them with tf.data
    for part in range(3):
        frame.iloc[part * 160:(part + 1) * 160].to_csv(
            tmp_path / f"part-{part}.csv", index=False)
    ports = _free_ports(5)
    spec = {"chief": [f"127.0.0.1:{ports[0]}"],
            "worker": [f"127.0.0.1:{p}" for p in ports[1:3]],
            "ps": [f"127.0.0.1:{p}" for p in ports[3:]]}
    common = ["--pipeline", "pairs", "--data", str(tmp_path / "part-*.csv"),
              "--candidate-id-column",
              "doc_id", "--epochs", "4", "--batch-size", "16", "--hidden", "16",
              "--dim", "8", "--buckets", "8192", "--patience", "0", "--no-hybrid",
              "--hard-negatives", "none"]
    cli = [sys.executable, "-m", "tfdssm.cli", "train", *common]
    servers = []
    try:
        for kind in ("ps", "worker"):
            for index in range(2):
                log = (tmp_path / f"{kind}{index}.log").open("w")
                servers.append(subprocess.Popen(
                    [*cli, "--strategy", "parameter_server", "--export-dir",
                     str(tmp_path / "unused")], cwd=tmp_path, stdout=log,
                    stderr=subprocess.STDOUT, env=_env(**_config(kind, index, spec))))
        start = time.monotonic()
        (chief,) = _run_all(
            [[*cli, "--strategy", "parameter_server", "--export-dir",
              str(tmp_path / "ps_export")]],
            [_env(**_config("chief", 0, spec))], [tmp_path / "chief.log"], tmp_path,
            timeout=600)
        cluster_seconds = time.monotonic() - start
        assert all(p.poll() is None for p in servers)  # they serve until stopped
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
    for index in range(2):
        assert "serving at" in (tmp_path / f"ps{index}.log").read_text()
    start = time.monotonic()
    (single,) = _run_all([[*cli, "--export-dir", str(tmp_path / "single_export")]],
                         [_env()], [tmp_path / "single.log"], tmp_path, timeout=600)
    single_seconds = time.monotonic() - start
    info = json.loads((tmp_path / "ps_export" / "export.json").read_text())
    assert info["training"]["train_files"] == 3
    assert info["training"]["parameter_servers"]["steps_per_epoch"] == (
        info["training"]["train_rows"] // 16)
    (table,) = info["training"]["parameter_servers"]["sharded_variables"]
    assert [s["device"].split("/")[1] for s in table["shards"]] == ["job:ps"] * 2
    towers = str(tmp_path / "ps_export" / "towers" / "1")
    check = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, tensorflow as tf
            towers = tf.saved_model.load({towers!r})
            out = towers.signatures["query"](query=tf.constant(["kiwi recipe 1"]))
            assert "tfdssm" not in sys.modules
            print(out["embedding"].shape)
        """)], capture_output=True, text=True, timeout=300,
        env=_env(PYTHONPATH=""))
    assert check.returncode == 0 and "(1, 8)" in check.stdout, check.stderr[-2000:]
    ps_ms, single_ms = _ms_per_step(chief), _ms_per_step(single)
    print(f"\nparameter-server cluster (5 processes) {cluster_seconds:.1f}s, "
          f"single process {single_seconds:.1f}s; steady-state {1000 / ps_ms:.1f} "
          f"steps/s vs {1000 / single_ms:.1f} steps/s single-process "
          f"(ratio {single_ms / ps_ms:.2f}), same data and model")
