"""Tests for tf.distribute training (training.distribute, train.run(strategy=...),
``tfdssm train --strategy``) and sharded corpus embedding (tfdssm.export.sharding).

The strategies run in subprocesses: logical CPU devices and multi-worker
collectives must be configured before TensorFlow initialises, which the pytest
process has long done.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfdssm.data import readers as data
from tfdssm.errors import ConfigError, DataError
from tfdssm.export import sharding
from tfdssm.features import TextFeature
from tfdssm.model import runner
from tfdssm.model.towers import paper_tower
from tfdssm.training import distribute
from tfdssm.training import run as train

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 150  # seconds; a stuck collective must never hang the suite
TOPICS = ["apple", "banana", "cherry", "dates", "elder",
          "figs", "grape", "honey", "kiwi", "lemon"]


def _pairs(rows: int) -> pd.DataFrame:
    return pd.DataFrame({
        "query": [f"{TOPICS[i % 10]} recipe {i % 7}" for i in range(rows)],
        "doc": [f"all about {TOPICS[i % 10]}" for i in range(rows)],
        "doc_id": [f"D{i % 10}" for i in range(rows)],
    })


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_all(
    commands: list[list[str]], envs: list[dict[str, str]], logs: list[pathlib.Path],
    cwd: pathlib.Path, timeout: float = TIMEOUT,
) -> list[str]:
    """Runs processes side by side (output to log files, so a full pipe can never
    block them). If one fails, or the deadline passes, the others are killed
    (a worker whose peer died would wait for it forever) and the test fails."""
    procs = []
    for command, env, log in zip(commands, envs, logs, strict=True):
        with log.open("w") as out:
            procs.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=out,
                                          stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    if any(p.returncode != 0 for p in procs):
        report = "\n---\n".join(f"[exit {p.returncode}] {t[-3000:]}"
                                 for p, t in zip(procs, texts, strict=True))
        pytest.fail(f"a process failed or timed out after {timeout}s:\n{report}")
    return texts


# --------------------------------------------------------------------------- #
# tfdssm.training.distribute: TF_CONFIG, chief, strategy names (in process)
# --------------------------------------------------------------------------- #

CLUSTER = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


def _tf_config(cluster, kind, index) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster,
                                     "task": {"type": kind, "index": index}})}


def test_read_tf_config_unset_is_none_and_valid_is_parsed():
    assert distribute.read_tf_config({}) is None
    assert distribute.read_tf_config({"TF_CONFIG": "  "}) is None
    config = distribute.read_tf_config(_tf_config(CLUSTER, "worker", 1))
    assert config == {"cluster": CLUSTER, "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', "needs a 'cluster' and a 'task'"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
     "is not in its cluster"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "is not in its cluster"),
    ('{"cluster": {"worker": ["a:1"], "evaluator": ["b:1"]}, '
     '"task": {"type": "evaluator", "index": 0}}', "not supported"),
])
def test_read_tf_config_rejects_bad_values_with_the_fix(value, message):
    with pytest.raises(ConfigError, match=message) as error:
        distribute.read_tf_config({"TF_CONFIG": value})
    assert "TF_CONFIG" in str(error.value)


def test_chief_is_the_chief_task_else_worker_zero():
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert distribute.is_chief_task("chief", 0, with_chief)
    assert not distribute.is_chief_task("worker", 0, with_chief)
    assert distribute.is_chief_task("worker", 0, CLUSTER)
    assert not distribute.is_chief_task("worker", 1, CLUSTER)
    assert distribute.is_chief_task(None, None, {})
    assert distribute.is_chief()  # no strategy: this process writes


def test_worker_shard_counts_chief_and_workers():
    assert distribute.worker_shard({}) == (1, 0)
    assert distribute.worker_shard(_tf_config(CLUSTER, "worker", 1)) == (2, 1)
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert distribute.worker_shard(_tf_config(with_chief, "chief", 0)) == (3, 0)
    assert distribute.worker_shard(_tf_config(with_chief, "worker", 0)) == (3, 1)


def test_make_strategy_names(monkeypatch):
    assert distribute.make_strategy("default") is tf.distribute.get_strategy()
    with pytest.raises(ConfigError, match="strategy must be one of"):
        distribute.make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG") as error:
        distribute.make_strategy("multi_worker")
    assert "--strategy mirrored" in str(error.value)


def test_write_dir_is_the_target_outside_multi_worker(tmp_path):
    with distribute.write_dir(tmp_path / "export") as target:
        assert target == tmp_path / "export"


def test_shard_by_data_sets_the_auto_shard_policy():
    dataset = distribute.shard_by_data(tf.data.Dataset.range(4))
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA


def test_run_rejects_a_model_built_outside_the_strategy_scope():
    from tfdssm.recipes import pairs

    prepared = pairs.prepare(_pairs(30), num_buckets=100, hidden=(4,), dim=4)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with pytest.raises(ConfigError, match=r"strategy.scope\(\)"):
        train.run(prepared, None, epochs=1, batch_size=8, verbose=0,
                  strategy=strategy)
    with strategy.scope():
        inside = pairs.prepare(_pairs(30), num_buckets=100, hidden=(4,), dim=4)
    with pytest.raises(ConfigError, match="built under MirroredStrategy"):
        train.run(inside, None, epochs=1, batch_size=8, verbose=0)  # no strategy


def test_train_parser_accepts_the_strategies():
    from tfdssm.cli import build_parser

    parser = build_parser()
    base = ["train", "--pipeline", "pairs", "--export-dir", "x"]
    assert parser.parse_args(base).strategy == "default"
    for name in distribute.STRATEGIES:
        assert parser.parse_args([*base, "--strategy", name]).strategy == name
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--strategy", "tpu"])


# --------------------------------------------------------------------------- #
# MirroredStrategy over 2 logical CPUs: loss scaling (subprocess)
# --------------------------------------------------------------------------- #

MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tfdssm
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import pandas as pd
    from tfdssm.training import run as train
    from tfdssm.training.distribute import make_strategy
    from tfdssm.errors import ConfigError
    from tfdssm.features import CategoricalFeature
    from tfdssm.model.dssm import DSSM
    from tfdssm.model.towers import Tower

    strategy = make_strategy("mirrored", ["/cpu:0", "/cpu:1"])
    names = [f"q{i}" for i in range(6)]
    docs = [f"d{i}" for i in range(6)]
    rows = {"query": np.array(names[:4], object), "doc": np.array(docs[:4], object)}
    halves = [{k: tf.constant(v[:2]) for k, v in rows.items()},
              {k: tf.constant(v[2:]) for k, v in rows.items()}]

    def build(loss):
        tf.keras.utils.set_random_seed(1)
        query = Tower([CategoricalFeature("query", tuple(names), 8)], hidden=(8,),
                      output_dim=4, normalize=False)
        doc = Tower([CategoricalFeature("doc", tuple(docs), 8)], hidden=(8,),
                    output_dim=4, normalize=False)
        model = DSSM(query, doc, loss=loss.replace("_l2", ""))
        model({k: tf.constant(v) for k, v in rows.items()})
        if loss.endswith("_l2"):  # a regularization loss on the query kernel
            kernel = model.query_tower.output_layer.kernel
            model.add_loss(lambda: 0.1 * tf.reduce_sum(kernel**2))
        return model

    def max_diff(a, b):
        return max(float(np.abs(x - y).max())
                   for x, y in zip(a.get_weights(), b.get_weights()))

    out = {"replicas": strategy.num_replicas_in_sync}
    for loss in ("in_batch", "paper", "in_batch_l2"):
        reference = build(loss)
        with strategy.scope():
            mirrored = build(loss)
            mirrored.compile(optimizer=tf.keras.optimizers.SGD(0.1))
        mirrored.set_weights(reference.get_weights())
        # One device, same split: replica r gets rows [2r, 2r + 2). In-batch
        # (SUM) losses add up over replicas; the paper loss (a mean) averages;
        # a regularization loss counts once.
        with tf.GradientTape() as tape:
            parts = [reference.compute_loss(h, training=True) for h in halves]
            task = tf.add_n(parts) / (2.0 if loss == "paper" else 1.0)
            total = task + tf.add_n(reference.losses or [tf.constant(0.0)])
        grads = tape.gradient(total, reference.trainable_variables)
        tf.keras.optimizers.SGD(0.1).apply_gradients(
            zip(grads, reference.trainable_variables))
        history = mirrored.fit(tf.data.Dataset.from_tensor_slices(rows).batch(4),
                               epochs=1, verbose=0)
        out[loss] = {
            "expected": float(task), "reported": history.history["loss"][0],
            "expected_total": float(total),
            "reported_total": history.history["total_loss"][0],
            "weight_diff": max_diff(reference, mirrored),
            "weight_change": max_diff(reference, build(loss)),
        }

    # train.run end to end: global batch 8 over 2 replicas, partial batch dropped.
    frame = pd.DataFrame({"query": [names[i % 6] for i in range(30)],
                          "doc": [docs[i % 6] for i in range(30)]})
    with strategy.scope():
        model = DSSM(Tower([CategoricalFeature("query", tuple(names), 8)], (8,), 4),
                     Tower([CategoricalFeature("doc", tuple(docs), 8)], (8,), 4),
                     candidate_id="doc", temperature=0.2)
    features = [CategoricalFeature("query", tuple(names)),
                CategoricalFeature("doc", tuple(docs))]
    prepared = train.Prepared(model, features, frame, frame,
                              frame[["doc"]].drop_duplicates(), "doc")
    result = train.run(prepared, None, epochs=4, batch_size=8, learning_rate=0.05,
                       verbose=0, strategy=strategy)
    out["run"] = {"loss": result["history"]["loss"],
                  "recall@10": result["metrics"]["recall@10"]}
    try:
        train.run(prepared, None, epochs=1, batch_size=64, verbose=0,
                  strategy=strategy)
    except ConfigError as error:
        out["too_big"] = str(error)
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def mirrored_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirrored")
    script = root / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    (log,) = _run_all([[sys.executable, str(script)]], [_env()], [root / "log.txt"],
                      root)
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    assert lines, log[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_mirrored_runs_two_replicas(mirrored_result):
    assert mirrored_result["replicas"] == 2


@pytest.mark.parametrize("loss", ["in_batch", "paper", "in_batch_l2"])
def test_mirrored_loss_and_gradients_match_one_device(mirrored_result, loss):
    """The reported loss is the global batch's (sum of the replicas' in-batch
    SUM losses; mean of the paper losses; regularization once) and one SGD step
    moves the weights exactly as on one device: no replica-count factor in the
    gradients."""
    got = mirrored_result[loss]
    assert got["reported"] == pytest.approx(got["expected"], rel=1e-5)
    assert got["reported_total"] == pytest.approx(got["expected_total"], rel=1e-5)
    if loss.endswith("_l2"):
        assert got["expected_total"] > got["expected"] + 1e-3
    assert got["weight_change"] > 1e-3  # the step did something
    assert got["weight_diff"] < 1e-5


def test_mirrored_train_run_learns_and_checks_the_batch(mirrored_result):
    losses = mirrored_result["run"]["loss"]
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0]
    assert mirrored_result["run"]["recall@10"] == 1.0  # 6 candidates
    assert "at most the 30 training rows" in mirrored_result["too_big"]


# --------------------------------------------------------------------------- #
# MultiWorkerMirroredStrategy: two workers on loopback via `tfdssm train`
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_worker")
    csv = root / "pairs.csv"
    _pairs(96).to_csv(csv, index=False)
    export_dir = root / "export"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    commands, envs, scratch = [], [], []
    for index in range(2):
        tmp = root / f"tmp{index}"
        tmp.mkdir()
        scratch.append(tmp)
        command = [sys.executable, "-m", "tfdssm.cli", "train", "--pipeline", "pairs",
                   "--data", str(csv), "--candidate-id-column", "doc_id",
                   "--strategy", "multi_worker", "--epochs", "3", "--batch-size", "16",
                   "--hidden", "16,16", "--dim", "8", "--buckets", "500",
                   # Distribution only: early stopping and the hybrid export are
                   # the chief's and every worker's extra minute on 2 cores.
                   "--patience", "0", "--no-hybrid",
                   "--export-dir", str(export_dir)]
        commands.append(command)
        envs.append(_env(TMPDIR=str(tmp), TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})))
    logs = _run_all(commands, envs, [root / "worker0.log", root / "worker1.log"], root)
    return {"export_dir": export_dir, "logs": logs, "scratch": scratch}


def _epoch_losses(log: str) -> list[float]:
    return [float(line.split(" loss: ")[1].split()[0])
            for line in log.splitlines() if " loss: " in line]


def test_two_workers_train_in_sync_and_the_loss_falls(two_workers):
    chief, other = (_epoch_losses(log) for log in two_workers["logs"])
    assert len(chief) == 3
    assert chief == other  # one global loss, all-reduced over both workers
    info = json.loads((two_workers["export_dir"] / "export.json").read_text())
    training = info["training"]
    assert (training["replicas"], training["workers"]) == (2, 2)
    history = training["loss_history"]
    # The logs print the loss to 4 decimals (Keras): a small loss such as 0.0393
    # is off by up to half its last digit, more than rel 1e-3 of it.
    assert history == pytest.approx(chief, rel=1e-3, abs=5e-5)
    assert history[-1] < 0.6 * history[0]


def test_only_the_chief_exports(two_workers):
    chief_log, other_log = two_workers["logs"]
    assert "exported to" in chief_log
    assert "not the chief worker" in other_log and "exported to" not in other_log
    export_dir = two_workers["export_dir"]
    assert sorted(p.name for p in (export_dir / "towers").iterdir()) == ["1"]
    assert (export_dir / "query_tower.tflite").is_file()
    for scratch in two_workers["scratch"]:  # the non-chief cleaned its scratch export
        assert not list(scratch.glob("tfdssm-worker-*"))


def test_the_chief_export_loads_and_serves(two_workers):
    from tfdssm.retrieve import LocalRetriever

    export_dir = two_workers["export_dir"]
    towers = tf.saved_model.load(str(export_dir / "towers" / "1"))
    out = towers.signatures["query"](query=tf.constant(["apple recipe 0", "kiwi"]))
    embedding = out["embedding"].numpy()
    assert embedding.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    ids, scores = LocalRetriever(export_dir).top_k(
        {"query": ["apple recipe 0", "lemon recipe 2"]}, k=3)
    assert ids.shape == scores.shape == (2, 3)
    assert "D0" in ids[0] and "D9" in ids[1]


# --------------------------------------------------------------------------- #
# tfdssm.export.sharding: the corpus embedded shard by shard
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def corpus_tower():
    corpus = pd.DataFrame({"doc_id": [f"D{i}" for i in range(25)],
                           "doc": [f"document number {i} about {TOPICS[i % 10]}"
                                   for i in range(25)]})
    tower = paper_tower("doc", num_buckets=200, hidden=(8,), output_dim=4)
    features = [TextFeature("doc"), TextFeature("doc_id")]
    dataset = data.make_dataset(corpus, features, batch_size=4, shuffle=False)
    full = runner.embed(tower, data.to_feature_arrays(corpus, features))
    return tower, dataset, corpus, full


def test_sharded_embeddings_concatenate_to_the_unsharded_ones(corpus_tower, tmp_path):
    tower, dataset, corpus, full = corpus_tower
    written = [sharding.write_embedding_shard(tower, dataset, tmp_path, num_shards=3,
                                              index=i, id_column="doc_id",
                                              batch_size=5)
               for i in range(3)]
    assert [w["rows"] for w in written] == [9, 8, 8]
    assert {w["dim"] for w in written} == {4}
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    embeddings, ids = sharding.read_embedding_shards(tmp_path)
    assert ids.tolist() == corpus["doc_id"].tolist()
    np.testing.assert_allclose(embeddings, full, atol=1e-6)
    shard = np.load(written[1]["embeddings"])
    np.testing.assert_allclose(shard, full[1::3], atol=1e-6)


def test_embed_sharded_in_memory_takes_every_nth_row(corpus_tower):
    tower, dataset, _, full = corpus_tower
    parts = [sharding.embed_sharded(tower, dataset, 2, i, batch_size=3) for i in (0, 1)]
    np.testing.assert_allclose(parts[0], full[0::2], atol=1e-6)
    np.testing.assert_allclose(parts[1], full[1::2], atol=1e-6)
    rows = dataset.unbatch()  # an unbatched dataset works the same
    np.testing.assert_allclose(sharding.embed_sharded(tower, rows), full, atol=1e-6)


def test_sharding_errors_say_what_is_wrong(corpus_tower, tmp_path):
    tower, dataset, _, _ = corpus_tower
    with pytest.raises(ConfigError, match="index=2, num_shards=2"):
        sharding.embed_sharded(tower, dataset, 2, 2)
    with pytest.raises(DataError, match="found shard counts none"):
        sharding.read_embedding_shards(tmp_path)
    sharding.write_embedding_shard(tower, dataset, tmp_path, num_shards=3, index=0)
    with pytest.raises(DataError, match=r"shard\(s\) \[1, 2\] of 3 are missing"):
        sharding.read_embedding_shards(tmp_path)
    with pytest.raises(DataError, match="id column 'nope'"):
        sharding.write_embedding_shard(tower, dataset, tmp_path / "b", id_column="nope")


def test_sharded_embedding_of_the_served_signature(corpus_tower, tmp_path):
    """The SavedModel ``candidate`` signature shards the same way (what a worker
    indexing an export uses)."""
    tower, dataset, _, full = corpus_tower

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.tower = tower

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="doc")])
        def candidate(self, doc):
            return {"embedding": self.tower({"doc": doc})}

    module = Module()
    tf.saved_model.save(module, str(tmp_path / "sm"),
                        signatures={"candidate": module.candidate})
    signature = tf.saved_model.load(str(tmp_path / "sm")).signatures["candidate"]
    got = sharding.embed_sharded(signature, dataset, 2, 1)
    np.testing.assert_allclose(got, full[1::2], atol=1e-5)


# --------------------------------------------------------------------------- #
# MultiWorkerMirroredStrategy over files: each worker reads only its files
# --------------------------------------------------------------------------- #

FILES_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    import tfdssm
    from tfdssm.training.distribute import make_strategy
    strategy = make_strategy("multi_worker")  # first, before any TF op
    import tensorflow as tf
    from tfdssm.recipes import pairs
    from tfdssm.training import run as train

    logging.basicConfig(level=logging.INFO)
    with strategy.scope():
        prepared = pairs.prepare(sys.argv[1], candidate_id_column="doc_id",
                                 num_buckets=1000, hidden=(8,), dim=8)
    steps = []
    epochs = []  # the query of every row each training step received

    def record(queries):
        epochs[-1].extend(q.decode() for q in queries.numpy())
        steps.append(len(queries.numpy()))
        return 0

    fit_step = prepared.model.train_step

    def train_step(batch):
        tf.py_function(record, [batch["query"]], tf.int32)
        return fit_step(batch)

    prepared.model.train_step = train_step

    class Epochs(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs.append([])

    result = train.run(prepared, None, epochs=2, batch_size=16, verbose=2,
                       strategy=strategy, callbacks=[Epochs()])
    print("RESULT " + json.dumps({
        "epochs": epochs, "rows": prepared.train_files.num_rows,
        "test": prepared.test["query"].tolist(), "loss": result["history"]["loss"],
        "recall@10": result["metrics"]["recall@10"], "steps": steps}))
""")


BOUNDS = [0, 24, 48, 80, 96]  # the rows of each file


@pytest.fixture(scope="module")
def file_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("file_workers")
    frame = _pairs(96)
    frame["query"] = [f"{q} row {i}" for i, q in enumerate(frame["query"])]
    # 4 files of uneven size: worker 0 reads 56 rows (files 0, 2), worker 1 40.
    for part, (start, stop) in enumerate(zip(BOUNDS, BOUNDS[1:], strict=False)):
        frame.iloc[start:stop].to_csv(root / f"part-{part}.csv", index=False)
    script = root / "files.py"
    script.write_text(FILES_SCRIPT)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    logs = _run_all(
        [[sys.executable, str(script), str(root / "part-*.csv")]] * 2,
        [_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {
            "type": "worker", "index": index}})) for index in range(2)],
        [root / "worker0.log", root / "worker1.log"], root)
    results = []
    for log in logs:
        lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
        assert lines, log[-3000:]
        results.append(json.loads(lines[-1][len("RESULT "):]))
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"frame": frame, "logs": logs, "results": results,
            "seconds": time.monotonic() - start,
            "cpu": (used.ru_utime + used.ru_stime) - (cpu.ru_utime + cpu.ru_stime)}


def test_two_workers_read_every_file_row_once_per_epoch(file_workers):
    """Worker 0 reads files 0 and 2, worker 1 files 1 and 3; per epoch every
    training row reaches a training step exactly once across both, although
    worker 1 has fewer rows (it gets empty batches while worker 0 finishes)."""
    first, second = file_workers["results"]
    held_out = set(first["test"])
    assert held_out and held_out == set(second["test"])
    training = set(file_workers["frame"]["query"]) - held_out
    assert first["rows"] == len(training)
    for epoch in range(2):
        reads = [result["epochs"][epoch] for result in (first, second)]
        assert sorted(reads[0] + reads[1]) == sorted(training)  # once, all of them
        parts = [{int(np.searchsorted(BOUNDS, int(q.split(" row ")[1]), "right")) - 1
                  for q in read} for read in reads]
        assert parts == [{0, 2}, {1, 3}]
        assert len(reads[0]) > len(reads[1])
    for index, log in enumerate(file_workers["logs"]):
        assert f"worker {index} of 2 reads 2 of 4 file(s)" in log
    # The same steps on both (8 rows a worker for the larger one, the global
    # batch being 16; fewer for the other), none of them empty.
    assert len(first["steps"]) == len(second["steps"])
    assert max(first["steps"]) == 8 and min(first["steps"] + second["steps"]) >= 1
    losses = first["loss"]
    assert losses == second["loss"] and np.isfinite(losses).all()
    print(f"\n2 file-sharded workers on loopback: {file_workers['seconds']:.1f}s "
          f"wall, {file_workers['cpu']:.1f}s CPU")
