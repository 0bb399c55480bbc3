"""Nothing lost: exports killed mid-way, training killed mid-epoch.

* An export process SIGKILLed at several moments (while each SavedModel is being
  written, between models, at random delays) leaves every integer version
  complete and loadable, ``export.json`` valid, and a running ``tfdssm serve``
  answering throughout; a kill before the commit record (``models.config``)
  never changes the served set, and the server never serves a mix of two
  exports; the next export cleans up, adds a version and replaces the set at
  once. CI runs all of this in one test (one server, five killed exporters);
  ``make bench`` runs every kill point, 12 random moments and a kill before
  every step.
* ``tfdssm train`` SIGKILLed in the middle of epoch 3 resumes with ``--resume``
  at epoch 3 from exactly the checkpoint's weights and optimizer state (not
  from scratch) and ends as good as an uninterrupted run.

Re-running an export adds a version and never rewrites one:
``tests/test_export.py::test_second_export_adds_a_version_and_leaves_the_first``.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import errno
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import scann  # noqa: F401 - registers ScaNN's ops for loading `retrieval` in-process
import tensorflow as tf
from serving_helpers import running_server
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfdssm import cli, export
from tfdssm.errors import ConfigError
from tfdssm.training import checkpoints

MODELS = ("towers", "retrieval_brute_force", "retrieval")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- #
# Exports killed at any moment
# --------------------------------------------------------------------------- #


def _temporaries(base: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in base.iterdir() if p.name.startswith(".tmp-")] if (
        base.is_dir()) else []


def _kill_when(export_dir: pathlib.Path, versions_before: dict) -> dict:
    """Conditions to kill at: a model's SavedModel half-written, or a model just
    renamed into place while the next one is not started."""
    def writing(model):
        return lambda: bool(_temporaries(export_dir / model))

    def renamed(model):
        return lambda: export.versions(export_dir / model)[-1:] != versions_before[
            model][-1:]

    return {
        "writing towers": writing("towers"),
        "writing retrieval_brute_force": writing("retrieval_brute_force"),
        "writing retrieval (ScaNN)": writing("retrieval"),
        "retrieval_brute_force renamed, ScaNN not yet": renamed(
            "retrieval_brute_force"),
        "retrieval renamed, before models.config/export.json": renamed("retrieval"),
    }


def _go(proc) -> None:
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _kill(proc, condition, timeout: float = 120.0) -> bool:
    """SIGKILLs ``proc`` as soon as ``condition()`` holds (polled every ms);
    returns whether it was still exporting then."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return alive


_CHECKED: set[pathlib.Path] = set()


def _check_versions_complete(export_dir: pathlib.Path,
                             load: bool = True) -> dict[str, list[int]]:
    """Every integer version has all its files and (``load``) loads; returns
    them. A version is checked once, when it first appears."""
    found = {}
    for model in MODELS:
        base = export_dir / model
        found[model] = export.versions(base)
        for version in found[model]:
            path = base / str(version)
            if path in _CHECKED:
                continue
            _CHECKED.add(path)
            assert (path / "saved_model.pb").is_file(), path
            assert (path / "variables" / "variables.index").is_file(), path
            assert list((path / "variables").glob("variables.data-*")), path
            assert (path / "assets.extra" / "tf_serving_warmup_requests").is_file()
            if load:
                loaded = tf.saved_model.load(str(path))
                assert "serving_default" in loaded.signatures, path
    info = json.loads((export_dir / export.EXPORT_JSON).read_text())
    for model in MODELS:
        entry = info["towers"] if model == "towers" else info[model]
        assert entry["version"] in found[model], (model, entry, found[model])
    return found


class _Hammer:
    """Threads sending towers and retrieval requests (with ``pause`` seconds
    between them, to leave the exporter CPU) until stopped."""

    def __init__(self, port: int, threads: int = 2, pause: float = 0.02) -> None:
        self.pause = pause
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.stop = threading.Event()
        self.ok, self.errors, self.versions = 0, [], {m: set() for m in MODELS}
        self.threads = [threading.Thread(target=self._run, args=(i,))
                        for i in range(threads)]

    def _request(self, model: str) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "query" if model == "towers" else "top_k"
        request.inputs["query"].CopyFrom(tf.make_tensor_proto(
            np.array(["kiwi recipe", "figs"], object), tf.string))
        if model != "towers":
            request.inputs["k"].CopyFrom(tf.make_tensor_proto([3, 3], tf.int32))
        return request

    def _run(self, offset: int) -> None:
        requests = [(m, self._request(m)) for m in MODELS]
        i = offset
        while not self.stop.is_set():
            model, request = requests[i % len(requests)]
            i += 1
            try:
                response = self.stub.Predict(request, timeout=30)
                self.versions[model].add(response.model_spec.version.value)
                self.ok += 1
            except grpc.RpcError as error:
                self.errors.append((model, error.code().name, error.details()))
            self.stop.wait(self.pause)

    def __enter__(self) -> _Hammer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.channel.close()


@pytest.fixture()
def export_copy(pairs_export, pairs_frame, tmp_path):
    source, _, _ = pairs_export
    target = tmp_path / "export"
    shutil.copytree(source, target)
    csv = tmp_path / "pairs.csv"
    pairs_frame(60).to_csv(csv, index=False)
    return target, csv


def _corpus(export_dir: pathlib.Path) -> pd.DataFrame:
    return pd.read_parquet(export_dir / export.CORPUS_FILE)


# The steps of one export, in order; savedmodel._hook(step) runs before each.
EXPORT_STEPS = ("towers", "retrieval_brute_force", "retrieval", "candidates",
                "export.json", "models.config")


# One server, one export copy, one exporting process per kill: each export is
# SIGKILLed at one moment, by its own hook just before a step (argv[3]; "none":
# no hook) or from outside (while a SavedModel is half-written, at a random
# moment); it prints the versions of every export it committed before dying.
HOOKED_EXPORTER = """
import json, os, signal, sys
import tfdssm
import pandas as pd
from tfdssm.export import savedmodel
from tfdssm.recipes import pairs

def hook(step):
    if step == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)

savedmodel._hook = hook
prepared = pairs.prepare(pd.read_csv(sys.argv[2]), "query", "doc", "doc_id",
                         num_buckets=500, hidden=(16, 16), dim=8)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[4])):
    info = savedmodel.export_model(prepared.model, sys.argv[1], corpus=prepared.corpus)
    print("committed", json.dumps(info["commit"]["versions"]), flush=True)
"""


def _kill_exports_while_serving(export_dir: pathlib.Path, csv: pathlib.Path, model,
                                plan: list[str | float], ahead: int = 2
                                ) -> dict[str, Any]:
    """Exports killed at any moment never break what is served, on one running
    server under requests: one exporting process per
    item of ``plan``, SIGKILLed just before that step (an EXPORT_STEPS name), when
    a :func:`_kill_when` condition holds (its label), or a random moment (a
    float: that fraction of the longest time an earlier kill took; that process
    exports five times in a row, so the kill always hits an export and it may
    commit some first). After every kill: every integer version is complete
    (and loads, when a kill at an arbitrary moment or the final export left it:
    a kill at a step boundary leaves versions renamed in whole before it),
    ``export.json`` names present versions, ``models.config`` pins the
    last committed export (a kill before the commit changes nothing) and the
    server serves exactly that set; a thread samples the served set throughout
    and never sees a mix; requests never fail. Then one complete export (in this
    process) removes the temporaries, adds one version of every model and
    replaces the served set at once. ``ahead`` processes start in advance, so
    that their imports overlap the exports before them.

    Returns:
        ``{"outcomes": [(kill, exit code, versions afterwards, temporaries
        left, pins)], "committed": [pins], "requests": OK count}``.
    """
    from tfdssm.errors import ExportError
    from tfdssm.export import serving_config

    committed = [serving_config.pinned_versions(export_dir)]
    assert committed[0] == {m: 1 for m in MODELS}
    serving_config.check_committed(export_dir, export.read_export(export_dir))
    points = _kill_when(export_dir, committed[0])
    assert all(isinstance(i, float) or i in EXPORT_STEPS or i in points for i in plan)
    samples, stop, outcomes, reached = [], threading.Event(), [], [1.0]
    torn = False  # export.json describes an export that never committed

    def spawn(item):
        return subprocess.Popen(
            [sys.executable, "-c", HOOKED_EXPORTER, str(export_dir), str(csv),
             item if item in EXPORT_STEPS else "none",
             "5" if isinstance(item, float) else "1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=ENV)

    # Requests every 50 ms per thread, not 20: serving goes on throughout all
    # the same, and leaves the exporters more of the two cores.
    with running_server(export_dir, poll_seconds=0.05, rest_port=None) as server, \
            _Hammer(server.grpc_port, pause=0.05) as hammer:
        def sample():
            while not stop.is_set():
                samples.append(server.manager.served())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        procs = [spawn(item) for item in plan[:ahead]]
        try:
            for i, item in enumerate(plan):
                versions_now = {m: export.versions(export_dir / m) for m in MODELS}
                proc = procs[i]
                _go(proc)
                if i + ahead < len(plan):  # its imports overlap the exports before
                    procs.append(spawn(plan[i + ahead]))
                start = time.monotonic()
                if isinstance(item, str) and item in EXPORT_STEPS:
                    label, code = f"just before {item}", proc.wait(timeout=300)
                    assert code == -signal.SIGKILL, label
                else:
                    if isinstance(item, float):
                        delay = item * max(reached)
                        label = f"random moment {delay:.2f}s"

                        def condition(s: float = start, d: float = delay) -> bool:
                            return time.monotonic() - s >= d
                    else:  # re-evaluated against the versions present now
                        label, condition = item, _kill_when(export_dir,
                                                            versions_now)[item]
                    assert _kill(proc, condition), label  # the kill hit an export
                    code = proc.returncode
                reached.append(time.monotonic() - start)
                # The exports it committed before it died (only a random
                # moment's process may get that far).
                for line in proc.stdout.read().splitlines():
                    assert isinstance(item, float), (label, line)
                    pins = json.loads(line.removeprefix("committed "))
                    assert all(pins[m] > committed[-1][m] for m in MODELS), pins
                    committed.append(pins)
                # Versions a kill at a step boundary left were renamed in whole
                # before it (their files are checked); those a kill at any other
                # moment left are loaded too, as are the final export's.
                at_a_step = isinstance(item, str) and item in EXPORT_STEPS
                found = _check_versions_complete(export_dir, load=not at_a_step)
                leftovers = [p for m in MODELS for p in _temporaries(export_dir / m)]
                pins = serving_config.pinned_versions(export_dir)
                if pins != committed[-1]:  # committed, killed before it said so
                    assert isinstance(item, float), (label, pins, committed)
                    assert all(pins[m] > committed[-1][m] for m in MODELS), pins
                    committed.append(pins)
                info = export.read_export(export_dir)
                try:
                    serving_config.check_committed(export_dir, info)
                    assert info["commit"]["versions"] == pins, label
                    torn = False
                except ExportError as error:  # a torn export is never silent
                    # Torn by this kill, or still torn by an earlier one: a kill
                    # before export.json leaves the last one written in place.
                    assert torn or isinstance(item, float) or item in (
                        "export.json", "models.config"), (label, error)
                    assert "before its commit" in str(error)
                    torn = True
                if item == "models.config":  # export.json written, not committed
                    assert info["commit"]["versions"] != pins
                deadline = time.monotonic() + 60
                while server.manager.served() != pins and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert server.manager.served() == pins, label
                outcomes.append((label, code, found, len(leftovers), pins))
            # The next complete export removes the temporaries, adds a version
            # of every model and replaces the served set at once.
            newest = _check_versions_complete(export_dir)
            info = export.export_model(model, export_dir, corpus=_corpus(export_dir))
            pins = serving_config.pinned_versions(export_dir)
            assert info["commit"]["versions"] == pins
            for name in MODELS:
                assert _temporaries(export_dir / name) == []
                assert export.versions(export_dir / name)[-1] == newest[name][-1] + 1
                assert pins[name] == newest[name][-1] + 1
            committed.append(pins)
            _check_versions_complete(export_dir)
            serving_config.check_committed(export_dir, export.read_export(export_dir))
            deadline = time.monotonic() + 60
            while (server.manager.served() != pins or max(
                    hammer.versions["towers"], default=0) < pins["towers"]) and (
                    time.monotonic() < deadline):
                time.sleep(0.05)
            assert server.manager.served() == pins
            assert max(hammer.versions["towers"]) == pins["towers"]
            time.sleep(0.2)  # a few more samples of the final set
            statuses = {m: server.manager.status(m) for m in MODELS}
        finally:
            stop.set()
            sampler.join(timeout=30)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=60)
        errors, served = list(hammer.errors), hammer.ok
    print(f"\nkill -> exit code, versions present afterwards (temporaries left), "
          f"pins; {len(committed) - 1} export(s) committed:")
    for label, code, found, leftovers, pins in outcomes:
        print(f"  {label:<48} exit {code:>3} {found} ({leftovers} tmp) {pins}")
    print(f"served throughout: {hammer.ok} requests OK, {len(hammer.errors)} failed; "
          f"versions seen {hammer.versions}; {len(samples)} served sets sampled")
    assert errors == [] and hammer.errors == [] and served > 50
    for name, states in statuses.items():  # never tried to load a broken version
        assert all(error == "" for _, _, error in states), (name, states)
    assert any(leftovers for *_, leftovers, _ in outcomes)  # kills left temporaries
    mixed = [s for s in samples if s not in committed]
    assert samples and mixed == [], mixed[:3]
    assert committed[-1] in samples
    # Orphan versions of the killed exports exist, yet were never served.
    orphans = {m: set(export.versions(export_dir / m)) - {c[m] for c in committed}
               for m in MODELS}
    assert orphans["towers"], orphans
    return {"outcomes": outcomes, "committed": committed, "requests": served}


# CI: a kill while towers is half-written (temporaries left), just before ScaNN
# (towers and brute force renamed in), before export.json, before the commit
# record, and at a random moment. `make bench` kills at every point and step and
# at 12 random moments (below).
CI_KILLS = ("writing towers", "retrieval", "export.json", "models.config")


def test_exports_killed_at_any_moment_leave_versions_loadable_and_sets_whole(
        export_copy, pairs_export):
    export_dir, csv = export_copy
    # A different moment every run, anywhere in an export: the longest earlier
    # kill (just before the commit) took about one whole export.
    moment = random.Random().uniform(0.02, 1.0)
    result = _kill_exports_while_serving(export_dir, csv, pairs_export[1].model,
                                         [*CI_KILLS, moment])
    assert [code for _, code, *_ in result["outcomes"]] == [-signal.SIGKILL] * 5


@pytest.mark.bench
def test_exports_killed_at_every_point_and_many_moments(export_copy, pairs_export):
    """The long version (``make bench``): a kill before every step, at every
    :func:`_kill_when` point, and at 12 random moments."""
    export_dir, csv = export_copy
    rng = random.Random(7)
    plan = [*EXPORT_STEPS, *_kill_when(export_dir, {m: [1] for m in MODELS}),
            *[rng.uniform(0.02, 1.5) for _ in range(12)]]
    result = _kill_exports_while_serving(export_dir, csv, pairs_export[1].model, plan)
    assert len(result["outcomes"]) == len(plan) == 23


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    base = tmp_path / "towers"
    base.mkdir()
    live = base / f".tmp-{os.getpid()}-{socket.gethostname()}.abcd1234"
    dead = base / f".tmp-999999999-{socket.gethostname()}.abcd1234"
    other_host = base / ".tmp-999999999-elsewhere.example.abcd1234"
    for path in (live, dead, other_host):
        path.mkdir()
    assert export._remove_stale_temporaries(base) == [dead]
    assert sorted(p.name for p in base.iterdir()) == sorted(
        [live.name, other_host.name])


# --------------------------------------------------------------------------- #
# Training killed mid-epoch, resumed
# --------------------------------------------------------------------------- #

SYNONYMS = {
    "red": ["crimson", "scarlet"], "quick": ["fast", "rapid"],
    "silent": ["quiet", "mute"], "golden": ["gilded", "amber"],
    "broken": ["shattered", "cracked"], "tiny": ["small", "minute"],
    "ancient": ["old", "antique"], "frozen": ["icy", "chilled"],
    "hidden": ["secret", "concealed"], "lucky": ["fortunate", "blessed"],
    "river": ["stream", "creek"], "castle": ["fortress", "citadel"],
    "engine": ["motor", "turbine"], "garden": ["yard", "orchard"],
    "mirror": ["reflection", "glass"], "forest": ["woods", "jungle"],
    "tower": ["spire", "turret"], "harbor": ["port", "dock"],
}


def synonym_pairs(rows: int = 480, documents: int = 40, seed: int = 0) -> pd.DataFrame:
    """Queries that share no words with their documents (synonyms only), so the
    towers have to learn the association over several epochs."""
    rng = np.random.default_rng(seed)
    words = list(SYNONYMS)
    combos = [(a, n) for a in words[:10] for n in words[10:]]
    chosen = rng.choice(len(combos), documents, replace=False)
    out = []
    for i in range(rows):
        adjective, noun = combos[chosen[i % documents]]
        query = [str(rng.choice(SYNONYMS[adjective])), str(rng.choice(SYNONYMS[noun]))]
        if rng.random() < 0.5:
            query.reverse()
        out.append({"query": " ".join(query), "doc": f"the {adjective} {noun} guide",
                    "doc_id": f"D{chosen[i % documents]}"})
    return pd.DataFrame(out)


# Kills its own process (SIGKILL: nothing flushed) at batch 3 of epoch 3.
KILLED_TRAINER = """
import os, sys
import tfdssm
import tensorflow as tf
from tfdssm import cli
from tfdssm.training import run as train

class KillMidEpoch(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 2 and batch == 2:
            print("killing myself in epoch 3", flush=True)
            os.kill(os.getpid(), 9)

run = train.run
train.run = lambda *a, callbacks=(), **k: run(*a, callbacks=[*callbacks,
                                                             KillMidEpoch()], **k)
sys.exit(cli.main(sys.argv[1:]))
"""
EPOCHS = 6


def _train_argv(csv: pathlib.Path, export_dir: pathlib.Path, *extra: str) -> list:
    return ["train", "--pipeline", "pairs", "--data", str(csv), "--candidate-id-column",
            "doc_id", "--export-dir", str(export_dir), "--hidden", "32", "--dim", "16",
            "--buckets", "500", "--epochs", str(EPOCHS), "--batch-size", "32",
            "--learning-rate", "0.001", "--patience", "0", "--hard-negatives", "none",
            "--no-hybrid", *extra]


def _main(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _epochs_run(stdout: str) -> list[int]:
    return [int(n) for n in re.findall(rf"^Epoch (\d+)/{EPOCHS}$", stdout, re.M)]


class _StateAtFirstEpoch(tf.keras.callbacks.Callback):
    """Records the model's and optimizer's variables when the first epoch this
    process runs begins (after ``BackupAndRestore`` restored them)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[np.ndarray] = []
        self.optimizer: list[np.ndarray] = []
        self.iterations = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.weights:
            return
        self.weights = [np.asarray(w) for w in self.model.get_weights()]
        variables = self.model.optimizer.variables
        variables = variables() if callable(variables) else variables
        self.optimizer = [np.asarray(v.numpy()) for v in variables]
        self.iterations = int(self.model.optimizer.iterations.numpy())


def test_training_killed_mid_epoch_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from tfdssm.training import run as train_module

    csv = tmp_path / "synonyms.csv"
    synonym_pairs().to_csv(csv, index=False)
    resumed_dir = tmp_path / "resumed"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_TRAINER, *_train_argv(csv, resumed_dir)],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _epochs_run(killed.stdout) == [1, 2, 3]
    backup = checkpoints.default_dir(resumed_dir)
    assert checkpoints.has_backup(backup) and not (resumed_dir / "towers").exists()

    # Different parameters: refused, the checkpoint kept.
    code, _, err = _main(_train_argv(csv, resumed_dir, "--resume", "--dim", "24"))
    assert code == 2 and "Traceback" not in err
    assert "--resume" in err and "dim: 16 then, 24 now" in err, err
    assert checkpoints.has_backup(backup)

    # What the checkpoint holds: the model and optimizer after epoch 2.
    reader = tf.train.load_checkpoint(str(backup / "chief"))
    saved: dict[tuple, list[np.ndarray]] = {}
    for key in reader.get_variable_to_shape_map():
        if key.endswith("/.ATTRIBUTES/VARIABLE_VALUE"):
            value = np.asarray(reader.get_tensor(key))
            saved.setdefault(value.shape, []).append(value)
    start = _StateAtFirstEpoch()
    run = train_module.run
    monkeypatch.setattr(train_module, "run", lambda *a, callbacks=(), **k: run(
        *a, callbacks=[*callbacks, start], **k))
    code, out, err = _main(_train_argv(csv, resumed_dir, "--resume"))
    monkeypatch.setattr(train_module, "run", run)
    assert code == 0, err
    # The resumed run's first epoch starts from exactly the checkpoint's
    # weights and optimizer state (Adam's moments, its step count), not from a
    # fresh model: every variable equals one the checkpoint holds.
    assert start.weights and start.optimizer and start.iterations > 0
    for value in [*start.weights, *start.optimizer]:
        assert any(np.array_equal(value, s) for s in saved.get(value.shape, [])), (
            value.shape)
    assert f"resuming from the checkpoint in {str(backup)!r}: epoch 3 of 6" in err
    assert _epochs_run(out) == [3, 4, 5, 6]  # epochs 1-2 were not run again
    assert not backup.exists()  # a finished run leaves no checkpoint
    resumed = export.read_export(resumed_dir)
    assert resumed["training"]["resumed_at_epoch"] == 3
    assert len(resumed["training"]["loss_history"]) == EPOCHS - 2

    whole_dir = tmp_path / "uninterrupted"
    code, out, err = _main(_train_argv(csv, whole_dir))
    assert code == 0, err
    assert _epochs_run(out) == list(range(1, EPOCHS + 1))
    whole = export.read_export(whole_dir)
    loss_whole = whole["training"]["loss_history"]
    loss_resumed = resumed["training"]["loss_history"]
    # Resumed from trained weights (checked exactly above): its first epoch's
    # loss is far below that of an epoch starting from fresh weights. (It is not
    # the uninterrupted run's epoch-3 loss: the resumed run's data iterator and
    # random state start afresh, so epoch 3 sees other batches, other in-batch
    # negatives; the two differed by over 50 % at times.)
    assert loss_resumed[0] < 0.5 * loss_whole[0]
    chance = sum(1 / r for r in range(1, 11)) / 40  # MRR@10 of a random ranking
    print(f"\nresume: killed in epoch 3/{EPOCHS}, resumed at epoch "
          f"{resumed['training']['resumed_at_epoch']}; loss per epoch: uninterrupted "
          f"{[round(x, 1) for x in loss_whole]}, resumed "
          f"{[round(x, 1) for x in loss_resumed]}"
          f"; mrr@10 {whole['metrics']['mrr@10']:.3f} uninterrupted vs "
          f"{resumed['metrics']['mrr@10']:.3f} resumed (chance {chance:.3f}); "
          f"recall@10 {whole['metrics']['recall@10']:.3f} vs "
          f"{resumed['metrics']['recall@10']:.3f}")
    for metric in ("mrr@10", "recall@10", "auc"):
        assert resumed["metrics"][metric] == pytest.approx(whole["metrics"][metric],
                                                           abs=0.1), metric
    assert resumed["metrics"]["mrr@10"] > 5 * chance


def _fake_backup(directory: pathlib.Path, run: dict) -> None:
    tf.train.Checkpoint(step=tf.Variable(1)).save(str(directory / "chief" / "ckpt"))
    (directory / checkpoints.RUN_FILE).write_text(json.dumps(run))


def test_checkpoint_dir_rules(tmp_path):
    messages = []
    directory = tmp_path / "ckpt"
    _fake_backup(directory, {"dim": 8, "epochs": 3})
    assert checkpoints.has_backup(directory)
    # More epochs may be asked for when resuming; other changes are refused.
    checkpoints.backup(directory, {"dim": 8, "epochs": 5}, resume=True,
                       log=messages.append)
    assert checkpoints.has_backup(directory) and messages == []
    with pytest.raises(ConfigError, match="dim: 8 then, 9 now"):
        checkpoints.backup(directory, {"dim": 9, "epochs": 3}, resume=True)
    # Without resume an interrupted run's checkpoint is discarded, and says so.
    checkpoints.backup(directory, {"dim": 9}, resume=False, log=messages.append)
    assert not checkpoints.has_backup(directory)
    assert "discarding the checkpoint of an interrupted run" in messages[-1]
    checkpoints.backup(directory, {"dim": 9}, resume=True, log=messages.append)
    assert "no checkpoint to resume" in messages[-1]
    checkpoints.finish(directory)
    assert not directory.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        checkpoints.backup(tmp_path / "file", {}, resume=False)


def test_a_version_that_appears_during_an_export_is_never_overwritten(tmp_path):
    """Two exporters racing for the same number: the second takes the next one."""
    base = tmp_path / "towers"
    (base / "1").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"first")

    def save(tmp: pathlib.Path) -> None:
        (tmp / "saved_model.pb").write_bytes(b"mine")
        (base / "2").mkdir()  # another export finished version 2 meanwhile
        (base / "2" / "saved_model.pb").write_bytes(b"theirs")

    target = export._atomic_save(base, save)
    assert target == base / "3"
    assert (base / "1" / "saved_model.pb").read_bytes() == b"first"
    assert (base / "2" / "saved_model.pb").read_bytes() == b"theirs"
    assert (base / "3" / "saved_model.pb").read_bytes() == b"mine"
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "3"]


# --------------------------------------------------------------------------- #
# Adversarial requests and directories against the server (issue 17)
# --------------------------------------------------------------------------- #

AMPLIFY_LIMIT = 2 * 1024 * 1024  # --max-request-bytes of the server under test
AMPLIFY_BATCH = 64  # --max-batch-size
RSS_BOUND_MIB = 64  # peak RSS may grow this much over all amplification requests


def _raw_tensor(dtype: int, dims: list[int], **fields) -> Any:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=(
        tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])))
    for name, values in fields.items():
        getattr(proto, name).extend(values)
    return proto


def _peak_rss_mib(pid: int) -> int:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) // 1024


@contextlib.contextmanager
def _serve_process(export_dir: pathlib.Path, log: pathlib.Path, *extra: str):
    """``tfdssm serve`` in a child process on free loopback ports:
    ``(process, grpc port, rest port)``; stopped with SIGTERM (then SIGKILL)."""
    code = "import sys; from tfdssm.cli import main; sys.exit(main(sys.argv[1:]))"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--export-dir", str(export_dir),
             "--host", "127.0.0.1", "--grpc-port", "0", "--rest-port", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"gRPC on 127\.0\.0\.1:(\d+), REST on "
                              r"http://127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                break
            time.sleep(0.2)
        assert found, log.read_text()[-3000:]
        yield proc, int(found[1]), int(found[2])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _post_json(port: int, path: str, payload: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     f"{len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    return int(answer.split()[1])


def _amplification_requests(large: bool) -> tuple[list, list]:
    """``(gRPC requests, REST bodies)`` that declare far more than they carry
    or exceed the limits; ``large`` adds bigger payloads and declarations."""
    from tensorflow.core.framework import types_pb2

    from tfdssm.serving.predict import VALUE_FIELDS

    mib = b"q" * (1 << 20)
    string = types_pb2.DT_STRING
    grpc_requests = [  # (model, signature, {input: TensorProto})
        ("towers", "query", {"query": _raw_tensor(string, [64], string_val=[mib])}),
        ("towers", "query", {"query": _raw_tensor(string, [5000], string_val=[mib])}),
        ("towers", "query", {"query": _raw_tensor(string, [1, 5000],
                                                  string_val=[mib])}),
        ("towers", "query", {"query": _raw_tensor(string, [2_000_000],
                                                  string_val=[b"x"])}),
        ("towers", "query", {"query": _raw_tensor(string, [2**40])}),
        ("retrieval_brute_force", "top_k", {
            "query": _raw_tensor(string, [64], string_val=[b"a"]),
            "k": _raw_tensor(types_pb2.DT_INT32, [64, 2**30], int_val=[1])}),
    ]
    dims = [[64, 2**24]] + ([[2**62], [AMPLIFY_BATCH, 2**40], [1, 2**20, 2**20]]
                            if large else [])
    for dtype in sorted(VALUE_FIELDS):  # every dtype a request may carry
        enum = tf.as_dtype(dtype).as_datatype_enum
        grpc_requests += [("towers", "query", {"query": _raw_tensor(enum, d)})
                          for d in dims]
    rows = [json.dumps({"instances": [{"query": "x" * 200}] * 5000}).encode()]
    if large:
        big = b"w" * (3 << 19)  # 1.5 MiB, under the message limit
        grpc_requests += [
            ("towers", "query", {"query": _raw_tensor(string, [AMPLIFY_BATCH],
                                                      string_val=[big])}),
            ("towers", "query", {"query": _raw_tensor(string, [2**62],
                                                      string_val=[big])}),
            ("towers", "query", {"query": _raw_tensor(string, [AMPLIFY_BATCH, 2**20],
                                                      string_val=[big[:1 << 20]])}),
            ("retrieval", "top_k", {
                "query": _raw_tensor(string, [AMPLIFY_BATCH], string_val=[mib]),
                "k": _raw_tensor(types_pb2.DT_INT32, [AMPLIFY_BATCH],
                                 int_val=[1])}),
            ("retrieval_brute_force", "top_k", {
                "query": _raw_tensor(string, [1], string_val=[b"a"]),
                "k": _raw_tensor(types_pb2.DT_INT32, [2**62],
                                 int_val=list(range(100_000)))}),
        ]
        rows += [
            json.dumps({"instances": [{"query": "x" * 200}] * 9000}).encode(),
            json.dumps({"inputs": {"query": ["y" * 100] * 18000}}).encode(),
            json.dumps({"instances": ["z" * 30] * 50_000}).encode(),
        ]
    return grpc_requests, rows


def _amplify(pairs_export, tmp_path, large: bool, rounds: int,
             clients: int) -> int:
    """Sends the amplification requests ``rounds`` times from each of
    ``clients`` threads over gRPC and REST; all are refused (INVALID_ARGUMENT,
    400) in seconds, the server still serves, its peak RSS grows by less than
    RSS_BOUND_MIB. Returns the number of requests."""
    export_dir = tmp_path / "export"
    shutil.copytree(pairs_export[0], export_dir)
    for name in ("\u00b2", "99999999999999999999", "-1"):
        (export_dir / "towers" / name).mkdir()
    grpc_requests, rows = _amplification_requests(large)
    protos = []
    for model, signature, inputs in grpc_requests:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        for name, proto in inputs.items():
            request.inputs[name].CopyFrom(proto)
        assert request.ByteSize() < AMPLIFY_LIMIT
        protos.append(request)
    assert all(len(body) < AMPLIFY_LIMIT for body in rows)
    good = predict_pb2.PredictRequest()
    good.model_spec.name, good.model_spec.signature_name = "towers", "query"
    good.inputs["query"].CopyFrom(
        _raw_tensor(tf.string.as_datatype_enum, [1], string_val=[b"kiwi"]))
    failures: list[str] = []
    with _serve_process(export_dir, tmp_path / "serve.log", "--max-request-bytes",
                        str(AMPLIFY_LIMIT), "--max-batch-size",
                        str(AMPLIFY_BATCH)) as (proc, grpc_port, rest_port):
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(3):  # warm: the first calls allocate their buffers
                stub.Predict(good, timeout=60)
                assert _post_json(rest_port, "/v1/models/towers:predict",
                                  b'{"instances": ["kiwi"]}') == 200
            before = _peak_rss_mib(proc.pid)

            def client(seed: int) -> None:
                order = [*protos, *rows] * rounds
                random.Random(seed).shuffle(order)
                for request in order:
                    start = time.monotonic()
                    if isinstance(request, bytes):
                        code = _post_json(rest_port, "/v1/models/towers:predict",
                                          request)
                        if code != 400:
                            failures.append(f"REST {len(request)} bytes: {code}")
                    else:
                        try:
                            stub.Predict(request, timeout=60)
                            failures.append(f"gRPC {request.inputs}: answered")
                        except grpc.RpcError as error:
                            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                                failures.append(f"{error.code()} {error.details()}")
                    if time.monotonic() - start > 5 * clients:
                        failures.append(f"took {time.monotonic() - start:.1f}s")

            threads = [threading.Thread(target=client, args=(i,))
                       for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
            assert not any(thread.is_alive() for thread in threads)
            growth = _peak_rss_mib(proc.pid) - before
            stub.Predict(good, timeout=60)  # still serving
        log = (tmp_path / "serve.log").read_text()
    sent = (len(protos) + len(rows)) * rounds * clients
    assert failures == [], failures[:5]
    assert growth < RSS_BOUND_MIB, f"peak RSS grew {growth} MiB"
    assert "Traceback" not in log and "is not a version of model 'towers'" in log
    print(f"\npeak RSS growth over {sent} amplification requests ({clients} "
          f"client(s)): {growth} MiB (bound {RSS_BOUND_MIB})")
    return sent


def test_amplification_requests_keep_the_servers_peak_rss_bounded(
        pairs_export, tmp_path):
    """Small requests declaring huge tensors (every dtype, gRPC and REST) are
    refused before anything is expanded: the server's peak RSS grows by less
    than RSS_BOUND_MIB over all of them (before the fix: +393 MiB for four
    1 MiB requests at these limits; 5 GB for one declaring [1, 5000]).
    Odd version directory names are in the export too: serve starts."""
    _amplify(pairs_export, tmp_path, large=False, rounds=1, clients=1)


@pytest.mark.bench
def test_many_large_amplification_requests_from_4_clients_keep_rss_bounded(
        pairs_export, tmp_path):
    """The long version (``make bench``): larger payloads (1.5 MiB strings,
    100,000 carried ints) and declarations (2**62 rows, 2**40 per row, every
    dtype), bigger REST bodies, 4 concurrent clients x 5 rounds each."""
    assert _amplify(pairs_export, tmp_path, large=True, rounds=5, clients=4) > 500


def _manager(base: pathlib.Path):
    from tfdssm.serving.models import ModelManager

    return ModelManager([("towers", base)], poll_seconds=0.1)


def _fill_slowly(manager, source: pathlib.Path, target: pathlib.Path, polls: int,
                 chunks: int, pause: float) -> int:
    """Copies version ``source`` to ``target`` the way a slow ``cp -r`` does:
    the directory appears empty, then one file at a time, ``saved_model.pb``
    last and in ``chunks`` parts, ``pause`` seconds apart. The manager polls
    ``polls`` times at every stage (more than MAX_LOAD_ATTEMPTS while it is
    empty): nothing loads and the previous version serves until the copy is
    complete, then the copy loads at once. Returns the number of stages."""
    from tfdssm.serving.models import MAX_LOAD_ATTEMPTS

    before = manager.get("towers").version
    files = sorted(p for p in source.rglob("*")
                   if p.is_file() and p.name != "saved_model.pb")
    graph = (source / "saved_model.pb").read_bytes()
    step = -(-len(graph) // chunks)
    stages = [lambda: target.mkdir()]
    for item in files:
        def copy(item=item):
            (target / item.relative_to(source)).parent.mkdir(parents=True,
                                                             exist_ok=True)
            shutil.copy(item, target / item.relative_to(source))
        stages.append(copy)
    for end in range(step, len(graph) + step, step):
        def write(end=end):
            (target / "saved_model.pb").write_bytes(graph[:end])
        stages.append(write)
    for i, stage in enumerate(stages):
        stage()
        if i == len(stages) - 1:
            break
        for _ in range(MAX_LOAD_ATTEMPTS + 3 if i == 0 else polls):
            assert not manager.refresh("towers"), (target, i)
        assert manager.get("towers").version == before, (target, i)
        time.sleep(pause)
    assert manager.refresh("towers"), target
    assert manager.get("towers").version == int(target.name)
    assert manager.status("towers")[0] == (int(target.name), 30, "")
    return len(stages)


@pytest.mark.parametrize("versions,polls,chunks,pause", [
    pytest.param(1, 1, 2, 0.0, id="short"),
    pytest.param(6, 4, 16, 0.2, id="long", marks=pytest.mark.bench),
])
def test_a_version_filled_after_it_appeared_is_loaded(
        pairs_export, tmp_path, versions, polls, chunks, pause):
    """A slow ``cp -r``: the directory appears empty, is filled seconds later.
    Failed attempts are bounded while it stays the same and start again when
    it changes; the old version serves throughout. The long version (``make
    bench``): 6 versions in a row, each copied over ~6 s in 16 parts of its
    graph, polled 4 times per part."""
    source = pathlib.Path(pairs_export[0]) / "towers" / "1"
    base = tmp_path / "towers"
    shutil.copytree(source, base / "1")
    manager = _manager(base)
    try:
        manager.load_all()
        assert manager.get("towers").version == 1
        start = time.monotonic()
        stages = [_fill_slowly(manager, source, base / str(v), polls, chunks, pause)
                  for v in range(2, versions + 2)]
        print(f"\n{versions} version(s) copied slowly in {stages} stages, "
              f"{time.monotonic() - start:.1f}s; each loaded once complete")
    finally:
        manager.stop()


def test_odd_version_names_never_stop_the_watcher(pairs_export, tmp_path):
    """Names that are not versions (``²``, > int64, a file named like a
    version) appear while the server polls: later versions still load, the
    other model is unaffected, status and requests keep working."""
    source = pathlib.Path(pairs_export[0]) / "towers" / "1"
    root = tmp_path / "export"
    for model in ("towers", "other"):
        shutil.copytree(source, root / model / "1")
    with running_server(root, rest_port=None, poll_seconds=0.1) as server:
        manager = server.manager
        for name in ("\u00b2", "99999999999999999999", "1" * 200, "٣"):
            (root / "towers" / name).mkdir()
        (root / "towers" / "7").write_text("a file")
        shutil.copytree(source, root / "towers" / "003")
        deadline = time.monotonic() + 30
        while manager.get("towers").version != 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert manager.get("towers").version == 3
        assert manager.get("towers").path == root / "towers" / "003"
        assert manager.status("towers") == [(3, 30, ""), (1, 50, "")]
        assert manager.status("other") == [(1, 30, "")]
        assert manager.get("other").version == 1


# --------------------------------------------------------------------------- #
# I/O failures are one-line errors, with nothing half-written left (issue 17.5)
# --------------------------------------------------------------------------- #

TINY_TRAIN = ["--hidden", "16", "--dim", "8", "--buckets", "500", "--epochs", "1",
              "--batch-size", "16", "--quiet", "--candidate-id-column", "doc_id"]


def _train_cli(csv: pathlib.Path, export_dir: pathlib.Path, capsys) -> tuple[int, str]:
    code = cli.main(["train", "--pipeline", "pairs", "--data", str(csv),
                     "--export-dir", str(export_dir), *TINY_TRAIN])
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("tfdssm: error")]
    assert len(lines) == 1, err
    return lines[0]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["export (candidates.npy)", "export (SavedModel)",
                                   "training (epoch backup)"])
def test_a_full_disk_is_one_error_and_leaves_nothing(where, export_copy, pairs_frame,
                                                     tmp_path, monkeypatch, capsys):
    from tfdssm.export import candidates, savedmodel

    _, csv = export_copy
    if where.startswith("export (c"):
        monkeypatch.setattr(candidates.np, "save", _disk_full)
    elif where.startswith("export (S"):
        monkeypatch.setattr(savedmodel.warmup, "write_warmup", _disk_full)
    else:
        def full(self, *args, **kwargs):
            raise tf.errors.ResourceExhaustedError(
                None, None, "/x/.checkpoints/chief; No space left on device")
        monkeypatch.setattr(checkpoints.Backup, "on_epoch_end", full)
    target = tmp_path / "new_export"
    code, err = _train_cli(csv, target, capsys)
    line = _one_error_line(err)
    assert code == 2 and "disk filled up" in line and "new_export" in line, line
    assert not target.exists()  # no export dir, no .checkpoints


def test_an_unwritable_export_keeps_the_committed_export(export_copy, monkeypatch,
                                                         capsys):
    from tfdssm.export import savedmodel, serving_config

    export_dir, csv = export_copy
    before = (export_dir / "models.config").read_text()

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(savedmodel.candidates, "write_candidates", read_only)
    code, err = _train_cli(csv, export_dir, capsys)
    line = _one_error_line(err)
    assert code == 2 and "cannot write" in line and "Read-only" in line, line
    assert (export_dir / "models.config").read_text() == before  # nothing committed
    assert not (export_dir / checkpoints.CHECKPOINT_DIR).exists()
    assert [p for m in MODELS for p in _temporaries(export_dir / m)] == []
    serving_config.check_committed(export_dir, export.read_export(export_dir))


def test_an_export_dir_under_a_file_or_unwritable_is_refused_first(tmp_path,
                                                                  monkeypatch):
    from tfdssm.errors import ExportError
    from tfdssm.export import layout

    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a directory"):
        layout.check_export_dir(tmp_path / "f" / "sub")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        layout.check_export_dir(tmp_path / "f")
    # root ignores 0o555
    monkeypatch.setattr(layout.os, "access", lambda *a, **k: False)
    with pytest.raises(ExportError, match="is not writable"):
        layout.check_export_dir(tmp_path / "new")
