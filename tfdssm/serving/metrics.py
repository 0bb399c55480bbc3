"""Prometheus metrics of ``tfdssm serve``, named as TF Serving's.

TF Serving records its metrics under TensorFlow monitoring names
(``/tensorflow/serving/request_count``) and its Prometheus exporter writes them
with ``/`` turned into ``:`` (``:tensorflow:serving:request_count``); the same
names are used here, so dashboards and alerts written for TF Serving work:

* ``:tensorflow:serving:request_count`` (counter; ``model_name``, ``status``,
  plus ``version`` and ``signature_name``): Predict requests answered;
* ``:tensorflow:serving:request_latency`` (histogram, microseconds;
  ``model_name``, ``API``, ``entrypoint``, plus ``version``,
  ``signature_name``);
* ``:tensorflow:serving:batching_session:queuing_latency`` (histogram, µs;
  ``thread_pool_name``, plus ``model_name``, ``signature_name``): time a
  request waited for its batch to run;
* ``:tensorflow:serving:batching_session:input_batch_size``,
  ``...:processed_batch_size`` and ``...:padding_size`` (histograms; rows of
  each request, of each merged call, and added to reach an allowed size);
* ``:tensorflow:serving:batching_session:wrapped_run_count`` (counter): merged
  calls run;
* ``:tensorflow:cc:saved_model:load_attempt_count`` (counter; ``model_path``,
  ``status`` ``success`` / ``fail``);
* ``:tensorflow:serving:model_event_count`` (counter; ``model_name``,
  ``version``, ``event``: ``load``, ``unload``, ``load_failed``), tfdssm's own.

``status`` is the gRPC code name (``OK``, ``INVALID_ARGUMENT``, ...) as TF
Serving writes it; ``entrypoint`` is ``GRPC`` or ``REST``. Latency buckets are
TF Serving's (10 µs x 1.8^i, 33 of them; queuing: 100 µs x 1.2^i, 52). The text
is the Prometheus exposition format 0.0.4 (see :meth:`Metrics.render`).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TF's ``monitoring::Buckets::Exponential``: ``scale * growth**i``.

    >>> exponential_buckets(1, 2, 4)
    (1.0, 2.0, 4.0, 8.0)
    """
    return tuple(float(scale * growth ** i) for i in range(count))


LATENCY_BUCKETS = exponential_buckets(10, 1.8, 33)
QUEUING_BUCKETS = exponential_buckets(100, 1.2, 52)
SIZE_BUCKETS = exponential_buckets(1, 2, 15)


class _Family:
    """One metric: its samples by label values."""

    def __init__(self, name: str, kind: str, help_text: str,
                 labels: Sequence[str], buckets: Sequence[float] = ()) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.labels, self.buckets = tuple(labels), tuple(buckets)
        self.values: dict[tuple[str, ...], list[float]] = {}

    def cell(self, values: tuple[str, ...]) -> list[float]:
        """Counter: ``[total]``; histogram: ``[count per bucket..., +Inf, sum]``."""
        found = self.values.get(values)
        if found is None:
            size = 1 if self.kind == "counter" else len(self.buckets) + 2
            found = self.values[values] = [0.0] * size
        return found


class Metrics:
    """The server's metrics (thread-safe; cheap enough to record always).

    >>> m = Metrics()
    >>> m.request("towers", 1, "query", "OK", "GRPC", 850.0)
    >>> ':tensorflow:serving:request_count{model_name="towers",status="OK",' \\
    ...     'version="1",signature_name="query"} 1' in m.render()
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        family = self._family
        self.requests = family(":tensorflow:serving:request_count", "counter",
                               "The total number of requests.",
                               ("model_name", "status", "version", "signature_name"))
        self.latency = family(
            ":tensorflow:serving:request_latency", "histogram",
            "Distribution of wall time (in microseconds) for Tensorflow Serving "
            "request.", ("model_name", "API", "entrypoint", "version",
                         "signature_name"), LATENCY_BUCKETS)
        self.queuing = family(
            ":tensorflow:serving:batching_session:queuing_latency", "histogram",
            "Distribution of wall time spent (in microseconds) in queuing",
            ("thread_pool_name", "model_name", "signature_name"), QUEUING_BUCKETS)
        self.input_size = family(
            ":tensorflow:serving:batching_session:input_batch_size", "histogram",
            "Tracks the batch size distribution on the inputs by model_name (if "
            "available).", ("model_name", "signature_name"), SIZE_BUCKETS)
        self.batch_size = family(
            ":tensorflow:serving:batching_session:processed_batch_size", "histogram",
            "Tracks the batch size distribution on processing by model_name (if "
            "available).", ("model_name", "signature_name"), SIZE_BUCKETS)
        self.padding = family(
            ":tensorflow:serving:batching_session:padding_size", "histogram",
            "Tracks the padding size distribution on batches by model_name (if "
            "available).", ("model_name", "signature_name"), SIZE_BUCKETS)
        self.runs = family(
            ":tensorflow:serving:batching_session:wrapped_run_count", "counter",
            "Total count of run calls on the wrapped session", ())
        self.runs.cell(())  # rendered from the start, as 0
        self.load_attempts = family(
            ":tensorflow:cc:saved_model:load_attempt_count", "counter",
            "The number of times a SavedModel was successfully loaded.",
            ("model_path", "status"))
        self.model_events = family(
            ":tensorflow:serving:model_event_count", "counter",
            "Model versions loaded, unloaded or failed to load (tfdssm serve).",
            ("model_name", "version", "event"))

    def _family(self, name: str, kind: str, help_text: str, labels: Sequence[str],
                buckets: Sequence[float] = ()) -> _Family:
        family = self._families[name] = _Family(name, kind, help_text, labels, buckets)
        return family

    def inc(self, family: _Family, labels: Sequence[object], amount: float = 1) -> None:
        """Adds ``amount`` to a counter."""
        key = tuple(str(v) for v in labels)
        with self._lock:
            family.cell(key)[0] += amount

    def observe(self, family: _Family, labels: Sequence[object], value: float) -> None:
        """Records one value in a histogram."""
        key = tuple(str(v) for v in labels)
        index = bisect.bisect_left(family.buckets, value)  # le = upper bound
        with self._lock:
            cell = family.cell(key)
            cell[index] += 1
            cell[-1] += value

    def request(self, model: str, version: int | str, signature: str, status: str,
                entrypoint: str, micros: float) -> None:
        """One answered Predict request (any status)."""
        self.inc(self.requests, (model, status, version, signature))
        self.observe(self.latency, (model, "predict", entrypoint, version, signature),
                     micros)

    def model_event(self, model: str, version: int, event: str,
                    path: str = "") -> None:
        """A version ``load``ed, ``unload``ed, or that failed to load."""
        self.inc(self.model_events, (model, version, event))
        if event in ("load", "load_failed"):
            self.inc(self.load_attempts,
                     (path, "success" if event == "load" else "fail"))

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format 0.0.4."""
        lines: list[str] = []
        with self._lock:
            for family in self._families.values():
                lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
                lines.append(f"# TYPE {family.name} {family.kind}")
                for key, cell in sorted(family.values.items()):
                    labels = list(zip(family.labels, key, strict=True))
                    if family.kind == "counter":
                        lines.append(f"{family.name}{_labels(labels)} {_num(cell[0])}")
                        continue
                    total = 0.0
                    bounds = [*family.buckets, math.inf]
                    for bound, count in zip(bounds, cell[:-1], strict=True):
                        total += count
                        le = "+Inf" if bound == math.inf else _num(bound)
                        lines.append(f"{family.name}_bucket"
                                     f"{_labels([*labels, ('le', le)])} {_num(total)}")
                    lines.append(f"{family.name}_sum{_labels(labels)} {_num(cell[-1])}")
                    lines.append(f"{family.name}_count{_labels(labels)} {_num(total)}")
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{name}="{_escape_value(value)}"' for name, value in pairs)
    return "{" + body + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
