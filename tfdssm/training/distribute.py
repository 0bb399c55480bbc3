"""``tf.distribute`` strategies for training: one device, one machine, a cluster.

* ``default``: no distribution (the current strategy, usually one device).
* ``mirrored``: :class:`tf.distribute.MirroredStrategy`, one replica per local GPU
  (on a CPU-only machine, one replica unless logical CPUs are configured).
* ``multi_worker``: :class:`tf.distribute.MultiWorkerMirroredStrategy` over the
  cluster in ``TF_CONFIG``, which Kubernetes (Kubeflow ``TFJob``) and Vertex AI
  custom training set on every replica. Every worker runs the same command; the
  input pipeline is sharded by data (by file for a glob of files,
  :mod:`tfdssm.data.files`); only the chief writes the export.
* ``parameter_server``: :class:`tf.distribute.ParameterServerStrategy` over the
  ``chief``, ``worker`` and ``ps`` tasks in ``TF_CONFIG``; the large embedding
  tables are sharded across the ``ps`` tasks
  (:mod:`tfdssm.training.parameter_server`). The chief runs the program;
  worker and ps tasks only serve (:func:`run_server`).

Build the model inside ``strategy.scope()`` so that its variables are mirrored,
then call :func:`tfdssm.training.run.run` with the same strategy::

    strategy = make_strategy("multi_worker")   # first, before any TF op runs
    with strategy.scope():
        prepared = pairs.prepare("clicks.csv", ...)
    train.run(prepared, "saved_models/clicks", strategy=strategy)

``MultiWorkerMirroredStrategy`` must be created at program start-up, before
TensorFlow runs any op (it configures the collective ops of the process).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.training import STRATEGIES  # noqa: E402 - the option list, defined once

TF_CONFIG = "TF_CONFIG"
_EXAMPLE = (
    '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


def read_tf_config(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Parses and checks ``TF_CONFIG`` (``None`` when it is unset or empty).

    Args:
        environ: Environment to read (default ``os.environ``).

    Returns:
        ``{"cluster": {task type: [address, ...]}, "task": {"type", "index"}}``.

    Raises:
        ConfigError: not JSON, or no cluster/task, or a task outside the cluster.

    >>> read_tf_config({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:2"]}, '
    ...                 '"task": {"type": "worker", "index": 1}}'})["task"]
    {'type': 'worker', 'index': 1}
    """
    text = (os.environ if environ is None else environ).get(TF_CONFIG, "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{TF_CONFIG} is not valid JSON ({error}); received {text[:200]!r}. "
            f"Expected e.g. {_EXAMPLE}."
        ) from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError(
            f"{TF_CONFIG} needs a 'cluster' and a 'task' object; received "
            f"{text[:200]!r}. Expected e.g. {_EXAMPLE}."
        )
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster or not isinstance(index, int) or not (
        0 <= index < len(cluster[kind])
    ):
        raise ConfigError(
            f"{TF_CONFIG} task {task} is not in its cluster {cluster}: the task "
            "type must be a key of 'cluster' and the index a position in its list."
        )
    if kind not in ("chief", "worker", "ps"):
        raise ConfigError(
            f"{TF_CONFIG} task type {kind!r} is not supported; training runs "
            "'chief', 'worker' and (with --strategy parameter_server) 'ps' tasks "
            "only (no evaluator)."
        )
    return {"cluster": cluster, "task": {"type": kind, "index": index}}


def make_strategy(
    name: str = "default", devices: Sequence[str] | None = None,
    min_shard_bytes: int | None = None,
) -> tf.distribute.Strategy:
    """Creates a strategy by name (see the module docstring).

    Args:
        name: One of :data:`STRATEGIES`.
        devices: ``mirrored`` only: devices to mirror over, e.g.
            ``["/cpu:0", "/cpu:1"]`` (default: all local GPUs, else the CPU).
        min_shard_bytes: ``parameter_server`` only: the smallest shard of a
            variable split across the ps tasks (default
            :data:`tfdssm.training.parameter_server.MIN_SHARD_BYTES`).

    Returns:
        The strategy; enter ``strategy.scope()`` to build the model.

    Raises:
        ConfigError: an unknown name, or ``multi_worker`` /
            ``parameter_server`` without a valid ``TF_CONFIG`` for it.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, received {name!r}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "parameter_server":
        from tfdssm.training import parameter_server  # noqa: PLC0415 - a cycle

        return parameter_server.make_strategy(min_shard_bytes=min_shard_bytes)
    config = read_tf_config()
    if config is not None and "ps" in config["cluster"]:
        raise ConfigError(
            f"{TF_CONFIG} names 'ps' tasks, which --strategy multi_worker does not "
            "use; pass --strategy parameter_server (or remove the 'ps' tasks).")
    if config is None:
        raise ConfigError(
            f"--strategy multi_worker reads the cluster from the {TF_CONFIG} "
            f"environment variable, which is not set. Set it on every worker, e.g. "
            f"{TF_CONFIG}='{_EXAMPLE}' (Kubeflow TFJob and Vertex AI custom training "
            "set it for you), or use --strategy mirrored on one machine."
        )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:
        raise ConfigError(
            f"cannot start MultiWorkerMirroredStrategy: {error}. It must be created "
            "before TensorFlow runs any op: create the strategy first in the program."
        ) from None


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker processes taking part in ``strategy`` (1 unless multi-worker or
    parameter server; the latter counts its ``worker`` tasks, which train)."""
    if is_parameter_server(strategy):
        return int(getattr(strategy.extended, "_num_workers", 1)) or 1
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    return sum(len(spec.get(kind, ())) for kind in ("chief", "worker")) or 1


def is_parameter_server(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether ``strategy`` is a :class:`tf.distribute.ParameterServerStrategy`."""
    return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def is_chief_task(
    kind: str | None, index: int | None, cluster: Mapping[str, Any]
) -> bool:
    """The chief is the ``chief`` task if the cluster has one, else worker 0.

    >>> is_chief_task("worker", 0, {"worker": ["a:1", "b:1"]})
    True
    >>> is_chief_task("worker", 0, {"chief": ["c:1"], "worker": ["a:1"]})
    False
    """
    if kind is None:  # a single local process, no cluster
        return True
    return kind == "chief" or ("chief" not in cluster and kind == "worker"
                               and index == 0)


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes outputs (always true outside multi-worker)."""
    strategy = strategy or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    return is_chief_task(resolver.task_type, resolver.task_id,
                         resolver.cluster_spec().as_dict())


def worker_shard(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(num_shards, index)`` of this process among the chief and workers in
    ``TF_CONFIG`` (``(1, 0)`` without it), e.g. for
    :func:`tfdssm.export.sharding.write_embedding_shard`.

    >>> worker_shard({"TF_CONFIG": '{"cluster": {"chief": ["c:1"], "worker": '
    ...               '["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}'})
    (3, 2)
    """
    config = read_tf_config(environ)
    if config is None:
        return 1, 0
    cluster, task = config["cluster"], config["task"]
    chiefs = len(cluster.get("chief", ()))
    total = chiefs + len(cluster.get("worker", ()))
    offset = 0 if task["type"] == "chief" else chiefs
    return total, offset + task["index"]


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Sets the auto-shard policy to ``DATA``: each worker keeps every n-th batch.

    File-based sharding (the default ``AUTO`` policy's first choice) does not
    apply to in-memory tables (``from_tensor_slices``); ``DATA`` works for any
    source. Every worker must see the same number of batches per epoch, so batch
    with ``drop_remainder=True``.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


@contextlib.contextmanager
def write_dir(
    target: str | os.PathLike, strategy: tf.distribute.Strategy | None = None
) -> Iterator[pathlib.Path]:
    """Where this process writes: ``target`` on the chief, a temporary directory
    (removed on exit) on other workers.

    Non-chief workers run the same saving code as the chief (saving may need
    every worker's participation) but into a throw-away directory, so only the
    chief's export appears under ``target``.
    """
    if is_chief(strategy):
        yield pathlib.Path(target)
        return
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="tfdssm-worker-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = [
    "STRATEGIES",
    "is_chief",
    "is_chief_task",
    "is_parameter_server",
    "make_strategy",
    "num_workers",
    "read_tf_config",
    "shard_by_data",
    "worker_shard",
    "write_dir",
]
