"""Parameter-server training: embedding tables larger than one worker.

``--strategy parameter_server`` runs :class:`tf.distribute.ParameterServerStrategy`
over the cluster in ``TF_CONFIG``: one ``chief`` (the coordinator: it runs the
program, schedules training steps on the workers and writes the export), one
or more ``worker`` tasks (they run the steps) and one or more ``ps`` tasks
(they hold the variables). Every variable of at least ``2 x min_shard_bytes``
(the trigram and id embedding tables) is split by rows across the ps tasks
(:class:`tf.distribute.experimental.partitioners.MinSizePartitioner`); a step
gathers only the rows its batch needs. Worker and ps tasks run no program of
their own: they serve until the job ends (:func:`run_server`), so the same
command can run on every task::

    TF_CONFIG='{"cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"],
                "ps": ["p0:2222", "p1:2222"]}, "task": {"type": "chief", "index": 0}}'
    tfdssm train --strategy parameter_server ...

Training is asynchronous: each worker applies its steps as it finishes them,
and an epoch is ``steps_per_epoch`` steps, computed from the training rows
(each worker streams its own shuffled, repeated copy of the input, so an
epoch visits rows at random rather than each exactly once). The export is
the same as any other: the trained weights are copied into an unsharded model
(:func:`unsharded_copy`) that is evaluated and exported as usual.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError, ExportError
from tfdssm.training.distribute import TF_CONFIG, read_tf_config

logger = logging.getLogger("tfdssm")

MIN_SHARD_BYTES = 256 << 10  # a variable is split only into shards of >= 256 KiB
_EXAMPLE = (
    '{"cluster": {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"], '
    '"ps": ["host3:2222", "host4:2222"]}, "task": {"type": "chief", "index": 0}}'
)


def check_cluster(cluster: Mapping[str, Any]) -> None:
    """Refuses a cluster without exactly one chief, a worker and a ps task.

    >>> check_cluster({"chief": ["c:1"], "worker": ["w:1"]})
    Traceback (most recent call last):
    ...
    tfdssm.errors.ConfigError: --strategy parameter_server needs a cluster with \
one 'chief', at least one 'worker' and at least one 'ps' task; TF_CONFIG has \
{'chief': 1, 'worker': 1, 'ps': 0}. Expected e.g. {"cluster": {"chief": \
["host0:2222"], "worker": ["host1:2222", "host2:2222"], "ps": ["host3:2222", \
"host4:2222"]}, "task": {"type": "chief", "index": 0}}.
    """
    counts = {kind: len(cluster.get(kind, ())) for kind in ("chief", "worker", "ps")}
    if counts["chief"] != 1 or not counts["worker"] or not counts["ps"]:
        raise ConfigError(
            "--strategy parameter_server needs a cluster with one 'chief', at "
            f"least one 'worker' and at least one 'ps' task; {TF_CONFIG} has "
            f"{counts}. Expected e.g. {_EXAMPLE}.")


def _config(environ: Mapping[str, str] | None) -> dict[str, Any]:
    config = read_tf_config(environ)
    if config is None:
        raise ConfigError(
            f"--strategy parameter_server reads the cluster from the {TF_CONFIG} "
            f"environment variable, which is not set. Set it on every task, e.g. "
            f"{TF_CONFIG}='{_EXAMPLE}' (Kubeflow TFJob and Vertex AI custom "
            "training set it for you).")
    check_cluster(config["cluster"])
    return config


def is_server_task(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``TF_CONFIG`` makes this process a ``worker`` or ``ps`` task of a
    parameter-server cluster (which serves, :func:`run_server`).

    >>> is_server_task({"TF_CONFIG": '{"cluster": {"chief": ["c:1"], "worker": '
    ...                 '["w:1"], "ps": ["p:1"]}, "task": {"type": "ps", "index": 0}}'})
    True
    """
    return _config(environ)["task"]["type"] in ("worker", "ps")


def run_server(environ: Mapping[str, str] | None = None) -> NoReturn:
    """Starts this ``worker`` / ``ps`` task's server and serves the chief until
    the process is stopped (the job ends when the chief finishes).

    Raises:
        ConfigError: no valid parameter-server ``TF_CONFIG``, or this is the
            chief task (which trains: :func:`make_strategy`).
    """
    config = _config(environ)
    kind, index = config["task"]["type"], config["task"]["index"]
    if kind == "chief":
        raise ConfigError("run_server() is for 'worker' and 'ps' tasks; this is "
                          "the chief, which trains (make_strategy).")
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    server = tf.distribute.Server(
        tf.train.ClusterSpec(config["cluster"]), job_name=kind, task_index=index,
        protocol="grpc", start=True)
    logger.info("parameter_server: %s task %d serving at %s until the job ends",
                kind, index, config["cluster"][kind][index])
    server.join()
    raise SystemExit(0)  # join() returns only if the server is stopped


def partitioner(num_ps: int, min_shard_bytes: int | None = None) -> Any:
    """Splits a variable by rows into shards of at least ``min_shard_bytes``
    (default :data:`MIN_SHARD_BYTES`), at most one per ps task."""
    size = MIN_SHARD_BYTES if min_shard_bytes is None else int(min_shard_bytes)
    if size < 1:
        raise ConfigError(f"min_shard_bytes must be >= 1, received {size}.")
    return tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=size, max_shards=max(1, int(num_ps)))


def make_strategy(
    cluster_resolver: Any = None, min_shard_bytes: int | None = None
) -> tf.distribute.ParameterServerStrategy:
    """The chief's :class:`tf.distribute.ParameterServerStrategy`.

    Args:
        cluster_resolver: The cluster (default: ``TF_CONFIG``, which must make
            this process the chief).
        min_shard_bytes: See :func:`partitioner`.

    Returns:
        The strategy; build the model in its ``scope()``.

    Raises:
        ConfigError: no valid ``TF_CONFIG`` for a parameter-server cluster, or
            this is a worker / ps task.
    """
    if cluster_resolver is None:
        config = _config(None)
        if config["task"]["type"] != "chief":
            raise ConfigError(
                f"{TF_CONFIG} makes this process {config['task']['type']} task "
                f"{config['task']['index']}, which serves the chief "
                "(tfdssm train does so by itself; in a program call "
                "tfdssm.training.parameter_server.run_server()).")
        cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = cluster_resolver.cluster_spec().as_dict()
    check_cluster(cluster)
    return tf.distribute.ParameterServerStrategy(
        cluster_resolver,
        variable_partitioner=partitioner(len(cluster["ps"]), min_shard_bytes))


def sharded_variables(model: tf.Module) -> list[dict[str, Any]]:
    """The variables of ``model`` split across ps tasks, with their shards.

    Returns:
        One ``{"name", "shape", "shards": [{"rows", "device"}, ...]}`` per
        sharded variable (empty outside parameter-server training).
    """
    found, seen = [], set()
    for layer in model.submodules:
        for value in vars(layer).values():
            shards = getattr(value, "variables", None)
            if (not isinstance(value, tf.__internal__.distribute.ShardedVariable)
                    or id(value) in seen):
                continue
            seen.add(id(value))
            first = shards[0].name.split(":")[0]
            name = first[:-len("/part_0")] if first.endswith("/part_0") else first
            found.append({
                "name": f"{layer.name}/{name}",
                "shape": [int(d) for d in value.shape],
                "shards": [{"rows": int(s.shape[0]), "device": s.device}
                           for s in shards]})
    return found


def unsharded_copy(model: tf.keras.Model, batch: Mapping[str, Any]) -> tf.keras.Model:
    """A copy of ``model`` on this process with the trained weights, its
    sharded variables joined back into one (for evaluation and export).

    Args:
        model: A model trained under a parameter-server strategy (any Keras
            model with ``get_config`` / ``from_config``).
        batch: A few input rows (column -> ``[n]`` array) to build the copy.

    Returns:
        The copy, built outside any strategy.

    Raises:
        ExportError: the copy's variables do not match the model's shards.
    """
    if tf.distribute.has_strategy():
        raise ConfigError("unsharded_copy() builds the copy outside any strategy; "
                          "call it outside `strategy.scope()`.")
    copy = type(model).from_config(model.get_config())
    copy({name: tf.constant(values) for name, values in batch.items()})
    sources, targets = list(model.weights), list(copy.weights)
    values, used = [], 0
    for target in targets:
        shape = tuple(target.shape)
        parts, rows = [], 0
        while used < len(sources) and (not parts or (shape and rows < shape[0])):
            part = sources[used]
            parts.append(part)
            rows += int(part.shape[0]) if part.shape.rank else 0
            used += 1
        value = (np.concatenate([p.numpy() for p in parts], axis=0) if len(parts) > 1
                 else parts[0].numpy() if parts else None)
        if value is None or tuple(value.shape) != shape:
            raise ExportError(
                f"cannot join the sharded weights of {model.name!r}: variable "
                f"{target.name!r} of shape {list(shape)} got "
                f"{None if value is None else list(value.shape)}. Export from a "
                "model built by the same code as the trained one.")
        values.append(value)
    if used != len(sources):
        raise ExportError(
            f"cannot join the sharded weights of {model.name!r}: "
            f"{len(sources) - used} trained variable(s) left over.")
    copy.set_weights(values)
    return copy


__all__ = [
    "MIN_SHARD_BYTES",
    "check_cluster",
    "is_server_task",
    "make_strategy",
    "partitioner",
    "run_server",
    "sharded_variables",
    "unsharded_copy",
]
