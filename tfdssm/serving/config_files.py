"""TF Serving's ``--batching_parameters_file`` and ``--monitoring_config_file``.

Both are text protos, read with ``google.protobuf.text_format`` into TF
Serving's own messages: ``tensorflow.serving.BatchingParameters`` (from
``session_bundle_config.proto``) and ``tensorflow.serving.MonitoringConfig``
(``monitoring_config.proto``). ``tensorflow-serving-api`` does not ship those
two modules, so when they cannot be imported the same messages (names, fields
and types, ``google.protobuf.Int64Value`` wrappers included) are built here
from a descriptor; a file TF Serving accepts is accepted, and a misspelt field
is an error naming its line. A batching file::

    max_batch_size { value: 64 }
    batch_timeout_micros { value: 2000 }
    max_enqueued_batches { value: 100 }
    num_batch_threads { value: 2 }
    allowed_batch_sizes: 8
    allowed_batch_sizes: 64
    pad_variable_length_inputs: true

A monitoring file::

    prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,  # noqa: F401 - registers the wrapper types
)

from tfdssm.errors import ConfigError

DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """How requests are merged (TF Serving's ``BatchingParameters``, its defaults).

    Attributes:
        max_batch_size: Most rows a merged batch has (a larger request fails).
        batch_timeout_micros: How long the first request of a batch may wait
            for others before the batch runs anyway (0: runs as soon as a
            batch thread is free; requests arriving meanwhile still merge).
        max_enqueued_batches: Batches a queue (one per model, version and
            signature) may hold; a request that needs one more is refused
            ``UNAVAILABLE``.
        num_batch_threads: Batches run at the same time.
        allowed_batch_sizes: Batch sizes to pad to (by repeating the first
            row; the padding's outputs are dropped); increasing, the last
            equal to ``max_batch_size``. Empty: no padding.
        pad_variable_length_inputs: Merge requests whose inputs differ in a
            dimension after the first (``exclude`` lists of different lengths)
            by padding them (``""`` for strings, 0 for numbers); otherwise
            only requests of the same shapes merge.
        thread_pool_name: Label of the batching metrics.
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = dataclasses.field(
        default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    thread_pool_name: str = "batch_threads"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batching parameter {name} must be >= 1, received "
                                  f"{getattr(self, name)}.")
        if self.batch_timeout_micros < 0:
            raise ConfigError("batching parameter batch_timeout_micros must be >= 0, "
                              f"received {self.batch_timeout_micros}.")
        sizes = self.allowed_batch_sizes
        if sizes and (any(s < 1 for s in sizes)
                      or any(a >= b for a, b in zip(sizes, sizes[1:], strict=False))
                      or sizes[-1] != self.max_batch_size):
            raise ConfigError(
                f"allowed_batch_sizes must be positive and increasing, the last equal "
                f"to max_batch_size ({self.max_batch_size}); received {list(sizes)}. "
                f"Add `allowed_batch_sizes: {self.max_batch_size}` last.")


@dataclasses.dataclass(frozen=True)
class MonitoringOptions:
    """What ``--monitoring-config-file`` asks for.

    Attributes:
        prometheus: Whether to serve Prometheus metrics on the REST port.
        path: The HTTP path they are served on.
    """

    prometheus: bool = False
    path: str = DEFAULT_METRICS_PATH


@functools.cache
def _messages() -> dict[str, Any]:
    """``{"BatchingParameters": class, "MonitoringConfig": class}``: TF Serving's,
    else the same messages built from a descriptor."""
    found: dict[str, Any] = {}
    try:
        from tensorflow_serving.servables.tensorflow import (  # noqa: PLC0415
            session_bundle_config_pb2,
        )
        found["BatchingParameters"] = session_bundle_config_pb2.BatchingParameters
    except ImportError:
        pass
    try:
        from tensorflow_serving.config import monitoring_config_pb2  # noqa: PLC0415
        found["MonitoringConfig"] = monitoring_config_pb2.MonitoringConfig
    except ImportError:
        pass
    if len(found) == 2:
        return found
    field = descriptor_pb2.FieldDescriptorProto
    wrapper = {"int64": ".google.protobuf.Int64Value",
               "string": ".google.protobuf.StringValue",
               "bool": ".google.protobuf.BoolValue"}
    scalar = {"bool": field.TYPE_BOOL, "string": field.TYPE_STRING,
              "int64": field.TYPE_INT64, "double": field.TYPE_DOUBLE}
    messages = {
        "BatchingParameters": [
            ("max_batch_size", 1, "Int64Value"), ("batch_timeout_micros", 2,
                                                  "Int64Value"),
            ("max_enqueued_batches", 3, "Int64Value"),
            ("num_batch_threads", 4, "Int64Value"),
            ("thread_pool_name", 5, "StringValue"),
            ("allowed_batch_sizes", 6, "repeated int64"),
            ("pad_variable_length_inputs", 7, "bool")],
        "PrometheusConfig": [("enable", 1, "bool"), ("path", 2, "string")],
        "SamplingConfig": [("sampling_rate", 1, "double")],
        "MonitoringConfig": [("prometheus_config", 1, ".PrometheusConfig"),
                             ("sampling_config", 2, ".SamplingConfig")],
    }
    file = descriptor_pb2.FileDescriptorProto(
        name="tfdssm/serving/tf_serving_config_files.proto",
        package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    for name, fields in messages.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind in fields:
            entry = message.field.add(name=field_name, number=number,
                                      label=field.LABEL_OPTIONAL)
            if kind.startswith("repeated "):
                entry.label = field.LABEL_REPEATED
                kind = kind.split()[1]
            if kind.endswith("Value"):
                entry.type = field.TYPE_MESSAGE
                entry.type_name = wrapper[kind[:-len("Value")].lower()]
            elif kind.startswith("."):
                entry.type = field.TYPE_MESSAGE
                entry.type_name = ".tensorflow.serving" + kind
            else:
                entry.type = scalar[kind]
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(_wrappers_file())
    pool.Add(file)
    built = {name: message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in ("BatchingParameters", "MonitoringConfig")}
    return {**built, **found}


def _wrappers_file() -> bytes:
    """``google/protobuf/wrappers.proto``'s descriptor, serialized."""
    proto = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto.SerializeToString()


def _parse(path: str | os.PathLike, message: str, flag: str) -> Any:
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - read at once
    except OSError as error:
        raise ConfigError(f"cannot read {flag} {path}: {error.strerror or error}."
                          ) from None
    proto = _messages()[message]()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as error:
        raise ConfigError(
            f"{flag} {path} is not a valid tensorflow.serving.{message} text proto: "
            f"{str(error).rstrip('.')}. See docs/serving.md for an example.") from None
    return proto


def read_batching_parameters(path: str | os.PathLike) -> BatchingParameters:
    """Reads a TF Serving batching parameters file (see the module docstring).

    Unset fields take TF Serving's defaults (``max_batch_size`` 1000,
    ``batch_timeout_micros`` 0, ``max_enqueued_batches`` 10,
    ``num_batch_threads`` the number of CPUs).

    Raises:
        ConfigError: unreadable, not the text format, unknown field, or values
            out of range (the message says which).
    """
    proto = _parse(path, "BatchingParameters", "--batching-parameters-file")
    defaults = BatchingParameters()
    values: dict[str, Any] = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                 "num_batch_threads", "thread_pool_name"):
        values[name] = (getattr(proto, name).value if proto.HasField(name)
                        else getattr(defaults, name))
    return BatchingParameters(
        **values, allowed_batch_sizes=tuple(proto.allowed_batch_sizes),
        pad_variable_length_inputs=proto.pad_variable_length_inputs)


def read_monitoring_config(path: str | os.PathLike) -> MonitoringOptions:
    """Reads a TF Serving monitoring config (see the module docstring).

    Raises:
        ConfigError: unreadable, not the text format, or a path not starting
            with ``/``.
    """
    proto = _parse(path, "MonitoringConfig", "--monitoring-config-file")
    config = proto.prometheus_config
    metrics_path = config.path or DEFAULT_METRICS_PATH
    if not metrics_path.startswith("/"):
        raise ConfigError(f"prometheus_config.path must start with '/', received "
                          f"{metrics_path!r} in {path}.")
    return MonitoringOptions(config.enable, metrics_path)
