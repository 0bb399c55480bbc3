"""``tfdssm serve`` under load: gRPC against in-process calls, a version swap, SIGTERM.

One ``tfdssm serve`` process on the MovieLens export (loopback ports); at each
load level (1, 8, 32 clients), N client threads, each with its own channel,
send ``Predict`` calls back to back for S seconds (a mix of ScaNN and
brute-force top-10, with and without exclusions, and user embeddings).
Reported per level: requests/s, latency percentiles, failed requests, the
server's RSS over the run. During the last level a new ``retrieval`` version is
swapped in (no request may fail); then a SIGTERM is sent under load (requests
in flight must finish; the process must exit 0).

The baseline: the same requests as direct calls in this process, with as many
threads for as long: the newest version of each model loaded with
``tf.saved_model.load``, each request's signature called with its inputs as
eager tensors (decoded from the very ``PredictRequest`` protos sent over gRPC).
The ratios of the two are gRPC's overhead: protobuf encoding, the loopback
network, the server's validation and its worker pool, and the client's own CPU
on the same cores.

With batching (``measure(..., batching=True)``, the suite's default), a second
``tfdssm serve --batching-parameters-file`` process (:data:`BATCHING_FILE`)
runs the same levels, version swap and SIGTERM; its rows are compared with the
same in-process (unbatched) calls and with the unbatched gRPC run.

``python -m benchmarks.run --suite serving`` (1 and 8 clients x 15 s, 32 x 30 s;
``--quick``: 1 and 8 clients x 4 s). ``tests/test_load.py`` runs the same code,
shortened and unbatched, in CI.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks import common

MODELS = ("retrieval", "retrieval_brute_force", "towers")
# TF Serving's text format (docs/serving.md): a batch runs as soon as the batch
# thread is free; requests arriving meanwhile merge. One thread on two cores:
# the other core decodes and answers requests (measured here: 3.0 rows per call
# and half the server CPU per request of two threads, which ran 1.5 rows).
BATCHING_FILE = """\
max_batch_size { value: 64 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 1 }
pad_variable_length_inputs: true
"""


# --------------------------------------------------------------------------- #
# The server process
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class ServeProcess:
    """A running ``tfdssm serve`` subprocess (see :func:`start_serve`)."""

    proc: subprocess.Popen
    grpc_port: int
    rest_port: int
    log: list[str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def rss_mb(self) -> float:
        """Resident memory now, MiB (``VmRSS``)."""
        return _status_kb(self.proc.pid, "VmRSS") / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the process has used (all its threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def listening(self) -> dict[int, set[str]]:
        """``{port: local addresses}`` of this server's listening TCP sockets."""
        return {port: _listen_addresses(port)
                for port in (self.grpc_port, self.rest_port)}

    def terminate(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGTERM, then wait; returns (exit code, seconds to exit)."""
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.perf_counter() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


def start_serve(export_dir: str | os.PathLike, *args: str,
                timeout: float = 300.0) -> ServeProcess:
    """Starts ``tfdssm serve`` on free loopback ports and waits until it serves.

    Its stderr is drained by a thread into ``ServeProcess.log``.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfdssm.cli", "serve", "--export-dir", str(export_dir),
         "--grpc-port", "0", "--rest-port", "0", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    started = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            if "gRPC on" in line:
                started.set()
        started.set()

    threading.Thread(target=drain, name="serve-log", daemon=True).start()
    if not started.wait(timeout) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("tfdssm serve did not start:\n" + "\n".join(log[-20:]))
    found = re.search(r"gRPC on [^ ]+:(\d+), REST on http://[^ ]+:(\d+)",
                      "\n".join(log))
    if not found:
        proc.kill()
        raise RuntimeError("no ports in the serve log:\n" + "\n".join(log[-20:]))
    return ServeProcess(proc, int(found[1]), int(found[2]), log)


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _listen_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from ``/proc/net/tcp{,6}``)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = pathlib.Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                found.add(_address(address))
    return found


def _address(hex_address: str) -> str:
    import ipaddress  # noqa: PLC0415

    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ".".join(str(b) for b in reversed(raw))
    address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1]
                                             for i in range(0, 16, 4)))
    return str(address.ipv4_mapped or address)  # ::ffff:127.0.0.1 -> 127.0.0.1


def add_version(base: pathlib.Path, source: int | None = None) -> int:
    """Copies the newest (or ``source``) version of a model to the next number,
    written under a temporary name and renamed, then commits it as an export
    does: ``models.config`` pins it (the other models keep their pins)."""
    from tfdssm.export import layout, serving_config  # noqa: PLC0415

    numbers = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
    target = numbers[-1] + 1
    tmp = base / f".tmp-bench-{target}"
    shutil.copytree(base / str(source or numbers[-1]), tmp)
    os.rename(tmp, base / str(target))
    export_dir = base.parent
    pins = dict(layout.read_export(export_dir).get("commit", {}).get("versions", {}))
    if pins:
        pins[base.name] = target
        serving_config.write_model_configs(export_dir, list(pins), pins)
    return target


# --------------------------------------------------------------------------- #
# Requests and the load loop
# --------------------------------------------------------------------------- #


def predict_requests(users: Sequence[Mapping[str, Any]], k: int = 10) -> list:
    """A mix of PredictRequests: per user, ScaNN and brute-force ``top_k``,
    ``top_k_exclude`` (3 ids), and the towers ``query`` embedding."""
    import tensorflow as tf  # noqa: PLC0415
    from tensorflow_serving.apis import predict_pb2  # noqa: PLC0415

    def request(model: str, signature: str, inputs: Mapping[str, Any]):
        out = predict_pb2.PredictRequest()
        out.model_spec.name = model
        out.model_spec.signature_name = signature
        for name, value in inputs.items():
            array = np.asarray(value)
            dtype = {"age": tf.float32, "k": tf.int32}.get(name, tf.string)
            out.inputs[name].CopyFrom(tf.make_tensor_proto(
                array.astype(object) if dtype == tf.string else array, dtype))
        return out

    out = []
    for user in users:
        features = {n: [v] for n, v in user.items()}
        top = {**features, "k": [k]}
        out += [request("retrieval", "top_k", top),
                request("retrieval_brute_force", "top_k", top),
                request("retrieval", "top_k_exclude",
                        {**top, "exclude": [["1", "50", "100"]]}),
                request("towers", "query", features)]
    return out


@dataclasses.dataclass
class Call:
    """One request as the client saw it (monotonic seconds)."""

    start: float
    end: float
    model: str
    code: str  # "OK", the gRPC status name, or the TensorFlow error class
    version: int = 0
    details: str = ""


@dataclasses.dataclass
class Load:
    """What :func:`run_load` or :func:`run_in_process` measured."""

    clients: int
    seconds: float
    calls: list[Call]
    rss: list[tuple[float, float]]  # (seconds since start, MiB)
    started: float
    # CPU seconds over the run: this process (the clients, or the in-process
    # calls) and the server process (NaN without one).
    cpu: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def ok(self) -> list[Call]:
        return [c for c in self.calls if c.code == "OK"]

    @property
    def failed(self) -> list[Call]:
        return [c for c in self.calls if c.code != "OK"]

    def latency_ms(self, q: float) -> float:
        times = [c.end - c.start for c in self.ok]
        return float(np.percentile(times, q) * 1e3) if times else float("nan")

    @property
    def per_second(self) -> float:
        return len(self.ok) / self.seconds

    def rss_growth_mb(self, warmup: float = 0.2) -> tuple[float, float, float]:
        """(RSS after the first ``warmup`` fraction, at the end, growth), MiB."""
        if not self.rss:
            return float("nan"), float("nan"), float("nan")
        cut = self.rss[0][0] + warmup * (self.rss[-1][0] - self.rss[0][0])
        early = [mb for t, mb in self.rss if t <= cut] or [self.rss[0][1]]
        late = [mb for t, mb in self.rss if t >= self.rss[-1][0] - 1.0]
        base, end = float(np.median(early)), float(np.median(late))
        return base, end, end - base

    def versions(self, model: str) -> set[int]:
        return {c.version for c in self.ok if c.model == model}

    def summary(self) -> dict[str, Any]:
        base, end, growth = self.rss_growth_mb()
        return {"clients": self.clients, "seconds": round(self.seconds, 1),
                "requests": len(self.calls), "failed": len(self.failed),
                "requests_per_s": round(self.per_second, 1),
                "p50_ms": round(self.latency_ms(50), 2),
                "p90_ms": round(self.latency_ms(90), 2),
                "p99_ms": round(self.latency_ms(99), 2),
                "max_ms": round(self.latency_ms(100), 2),
                "rss_start_mb": round(base, 1), "rss_end_mb": round(end, 1),
                "rss_growth_mb": round(growth, 1),
                "this_process_cpu_ms_per_request": self._cpu_ms(self.cpu[0]),
                "server_cpu_ms_per_request": self._cpu_ms(self.cpu[1])}

    def _cpu_ms(self, seconds: float) -> float:
        return round(seconds / len(self.ok) * 1e3, 3) if self.ok else float("nan")


Send = Callable[[Any], tuple[str, str, int, str]]
"""Sends one request; returns ``(model, code, version, details)``."""

Connect = Callable[[], tuple[Send, Callable[[], None]]]
"""Opens one client's connection; returns its :data:`Send` and a ``close``."""


def drive(
    connect: Connect,
    requests: Sequence[Any],
    clients: int,
    seconds: float,
    rss: Callable[[], float] | None = None,
    events: Sequence[tuple[float, Callable[[], Any]]] = (),
    stop_on: threading.Event | None = None,
    server_cpu: Callable[[], float] | None = None,
) -> Load:
    """``clients`` threads (one ``connect()`` each) sending ``requests`` round-robin.

    Args:
        connect: Opens a client (a gRPC channel, or nothing for in-process calls).
        requests: Requests to cycle through (each client starts at a different
            offset).
        clients: Concurrent clients.
        seconds: How long every client keeps sending.
        rss: Returns the server's RSS in MiB (sampled every 0.25 s).
        events: ``(seconds after start, callable)`` run by the sampler thread,
            e.g. adding a model version or sending SIGTERM.
        stop_on: Clients also stop once this is set.
        server_cpu: Returns the server process's CPU seconds so far.
    """
    calls: list[Call] = []
    lock = threading.Lock()
    stop = stop_on or threading.Event()
    started = time.monotonic()
    deadline = started + seconds

    def client(offset: int) -> None:
        send, close = connect()
        mine, i = [], offset
        while time.monotonic() < deadline and not stop.is_set():
            request = requests[i % len(requests)]
            i += 1
            begin = time.monotonic()
            model, code, version, details = send(request)
            mine.append(Call(begin, time.monotonic(), model, code, version, details))
            if code != "OK":
                stop.wait(0.01)  # back off, as a real client would
        close()
        with lock:
            calls.extend(mine)

    samples: list[tuple[float, float]] = []
    pending = sorted(events, key=lambda e: e[0])

    def sampler() -> None:
        while time.monotonic() < deadline and not stop.is_set():
            now = time.monotonic() - started
            while pending and pending[0][0] <= now:
                pending.pop(0)[1]()
            if rss is not None:
                try:
                    samples.append((now, rss()))
                except (OSError, KeyError):  # the server has exited
                    pass
            time.sleep(0.25)

    threads = [threading.Thread(target=client, args=(i * 7,), name=f"client-{i}")
               for i in range(clients)]
    watcher = threading.Thread(target=sampler, name="sampler")
    cpu_before = (time.process_time(), _cpu_or_nan(server_cpu))
    for thread in [*threads, watcher]:
        thread.start()
    for thread in [*threads, watcher]:
        thread.join(timeout=seconds + 120)
    cpu = (time.process_time() - cpu_before[0],
           _cpu_or_nan(server_cpu) - cpu_before[1])
    return Load(clients, time.monotonic() - started, calls, samples, started, cpu)


def _cpu_or_nan(server_cpu: Callable[[], float] | None) -> float:
    try:
        return server_cpu() if server_cpu else float("nan")
    except OSError:  # the server has exited (SIGTERM under load)
        return float("nan")


def grpc_client(target: str) -> tuple[Send, Callable[[], None]]:
    """One channel to ``target``; sends ``PredictRequest``s over it."""
    import grpc  # noqa: PLC0415
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: PLC0415

    channel = grpc.insecure_channel(target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def send(request: Any) -> tuple[str, str, int, str]:
        model = request.model_spec.name
        try:
            response = stub.Predict(request, timeout=30)
        except grpc.RpcError as error:
            return model, error.code().name, 0, error.details() or ""
        return model, "OK", response.model_spec.version.value, ""

    return send, channel.close


def run_load(target: str, requests: Sequence[Any], clients: int, seconds: float,
             **options: Any) -> Load:
    """``clients`` gRPC clients (one channel each) sending ``requests``.

    Args:
        target: ``host:port`` of the gRPC server.
        requests: PredictRequests.
        clients, seconds, **options: As :func:`drive`'s (``rss``, ``events``,
            ``stop_on``).
    """
    return drive(lambda: grpc_client(target), requests, clients, seconds, **options)


# --------------------------------------------------------------------------- #
# The baseline: the same requests as direct in-process calls
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class LocalRequest:
    """A ``PredictRequest`` as a direct call of a loaded SavedModel's signature."""

    model: str
    version: int
    function: Callable[..., Mapping[str, Any]]
    inputs: dict[str, Any]  # name -> eager tf.Tensor


def load_models(export_dir: str | os.PathLike,
                names: Sequence[str] = MODELS) -> dict[str, tuple[int, Any]]:
    """``{name: (version, tf.saved_model.load(...))}``, the newest version of each.

    The export layout is ``<export_dir>/<name>/<version>/``.
    """
    import scann  # noqa: F401, PLC0415 - registers the Scann>* ops of `retrieval`
    import tensorflow as tf  # noqa: PLC0415

    from tfdssm.export import versions  # noqa: PLC0415

    out = {}
    for name in names:
        base = pathlib.Path(export_dir) / name
        version = versions(base)[-1]
        out[name] = (version, tf.saved_model.load(str(base / str(version))))
    return out


def local_requests(requests: Sequence[Any],
                   models: Mapping[str, tuple[int, Any]]) -> list[LocalRequest]:
    """Each PredictRequest as the same signature of the same model, called with
    its own inputs (``tf.make_ndarray`` of each ``TensorProto``) as tensors."""
    import tensorflow as tf  # noqa: PLC0415

    out = []
    for request in requests:
        name = request.model_spec.name
        version, loaded = models[name]
        inputs = {key: tf.constant(tf.make_ndarray(proto), tf.as_dtype(proto.dtype))
                  for key, proto in request.inputs.items()}
        out.append(LocalRequest(name, version,
                                loaded.signatures[request.model_spec.signature_name],
                                inputs))
    return out


def local_client() -> tuple[Send, Callable[[], None]]:
    """Calls :class:`LocalRequest`s; outputs are read as numpy, as a server would."""
    import tensorflow as tf  # noqa: PLC0415

    def send(request: LocalRequest) -> tuple[str, str, int, str]:
        try:
            outputs = request.function(**request.inputs)
            for value in outputs.values():
                value.numpy()
        except tf.errors.OpError as error:
            return request.model, type(error).__name__, 0, error.message
        return request.model, "OK", request.version, ""

    return send, lambda: None


def run_in_process(requests: Sequence[LocalRequest], clients: int,
                   seconds: float) -> Load:
    """``clients`` threads of this process calling ``requests`` round-robin."""
    return drive(local_client, requests, clients, seconds)


def sigterm_under_load(server: ServeProcess, requests: Sequence[Any],
                       slow_request: Any, clients: int = 16,
                       after: float = 1.5) -> dict[str, Any]:
    """Sends SIGTERM while ``clients`` keep sending and ``slow_request`` runs.

    Returns:
        ``{"in_flight", "in_flight_failed", "slow_ok", "exit_code",
        "exit_seconds", "rejected_after"}``: requests begun (client clock) at
        least 10 ms before the signal and not finished at it were in flight and
        must all succeed; later ones may be refused (the server no longer
        accepts). Clients stop sending once the server has exited.
    """
    import grpc  # noqa: PLC0415
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: PLC0415

    slow: dict[str, Any] = {}
    signalled: dict[str, float] = {}
    exit_info: dict[str, Any] = {}
    stop = threading.Event()

    def send_slow() -> None:
        channel = grpc.insecure_channel(server.target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        slow["start"] = time.monotonic()
        try:
            stub.Predict(slow_request, timeout=60)
            slow["code"] = "OK"
        except grpc.RpcError as error:
            slow["code"] = f"{error.code().name}: {error.details()}"
        slow["end"] = time.monotonic()
        channel.close()

    slow_thread = threading.Thread(target=send_slow)

    def slow_then_terminate() -> None:
        slow_thread.start()
        time.sleep(0.1)  # the slow request has reached the server
        signalled["at"] = time.monotonic()
        code, took = server.terminate(timeout=120)
        exit_info.update(code=code, seconds=took)
        stop.set()

    terminator = threading.Thread(target=slow_then_terminate)
    load = run_load(server.target, requests, clients, after + 60,
                    events=[(after, terminator.start)], stop_on=stop)
    terminator.join(timeout=180)
    slow_thread.join(timeout=120)
    at = signalled["at"]
    in_flight = [c for c in load.calls if c.start <= at - 0.01 and c.end >= at]
    return {"in_flight": len(in_flight),
            "in_flight_failed": [(c.code, c.details) for c in in_flight
                                 if c.code != "OK"],
            "slow_ok": slow.get("code") == "OK" and slow["end"] > at,
            "slow_seconds": round(slow.get("end", at) - slow.get("start", at), 3),
            "exit_code": exit_info.get("code"),
            "exit_seconds": round(exit_info.get("seconds", float("nan")), 2),
            "rejected_after": len([c for c in load.calls
                                   if c.start > at and c.code != "OK"])}


# --------------------------------------------------------------------------- #
# The benchmark suite
# --------------------------------------------------------------------------- #


def movielens_users(prepared: Any, count: int) -> list[dict[str, Any]]:
    """``count`` distinct test users' query features."""
    users = prepared.test.drop_duplicates("user_id").head(count)
    return [{"user_id": str(r.user_id), "age": float(r.age), "gender": r.gender,
             "occupation": r.occupation, "zip_prefix": r.zip_prefix}
            for r in users.itertuples()]


def slow_candidates_request(prepared: Any, rows: int = 4096) -> Any:
    """A towers ``candidate`` request of ``rows`` movies with 1,000-character
    titles: slow enough to be in flight when a signal arrives."""
    import tensorflow as tf  # noqa: PLC0415
    from tensorflow_serving.apis import predict_pb2  # noqa: PLC0415

    movies = prepared.corpus.sample(rows, replace=True, random_state=0)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "towers"
    request.model_spec.signature_name = "candidate"
    for column in ("movie_id", "title", "genres", "year"):
        values = movies[column].astype(str)
        if column == "title":
            values = (values + " ") * (1000 // 20)
        request.inputs[column].CopyFrom(tf.make_tensor_proto(
            np.asarray(values.tolist(), object), tf.string))
    return request


def grpc_levels(export_copy: pathlib.Path, prepared: Any, requests: Sequence[Any],
                levels: Sequence[tuple[int, float]],
                serve_args: Sequence[str] = ()) -> dict[str, Any]:
    """``tfdssm serve`` on ``export_copy`` (which gets a new version) at each level.

    A warm-up run first (the most clients, up to 2 s); the last level's run
    swaps in a new ``retrieval`` version a quarter into it (loading and warming
    it up under load takes seconds); then SIGTERM under load.

    Args:
        serve_args: More ``tfdssm serve`` arguments (e.g. batching).

    Returns:
        ``{"loads": [Load per level], "warm", "swap", "sigterm", "bind", "log"}``.
    """
    server = start_serve(export_copy, "--poll-seconds", "0.2", *serve_args)
    try:
        bind = server.listening()
        warm = run_load(server.target, requests, max(c for c, _ in levels),
                        min(2.0, levels[-1][1] / 4))
        loads = [run_load(server.target, requests, clients, seconds,
                          rss=server.rss_mb, server_cpu=server.cpu_seconds)
                 for clients, seconds in levels[:-1]]
        clients, seconds = levels[-1]
        swapped: dict[str, int] = {}
        loads.append(run_load(
            server.target, requests, clients, seconds, rss=server.rss_mb,
            server_cpu=server.cpu_seconds, events=[(seconds / 4, lambda: swapped.update(
                version=add_version(export_copy / "retrieval")))]))
        stats = batch_stats(server) if "--monitoring-config-file" in serve_args else {}
        sigterm = sigterm_under_load(server, requests,
                                     slow_candidates_request(prepared))
    finally:
        server.kill()
    swap = {"new_version": swapped.get("version"),
            "versions_served": sorted(loads[-1].versions("retrieval")),
            "failed": len(loads[-1].failed)}
    return {"loads": loads, "warm": warm, "swap": swap, "sigterm": sigterm,
            "bind": {port: sorted(a) for port, a in bind.items()},
            "log": server.log[-12:], "batch_stats": stats}


METRICS_PATH = "/monitoring/prometheus/metrics"


def batch_stats(server: ServeProcess) -> dict[str, float]:
    """Mean rows per merged call, merged calls, requests and mean queuing
    delay so far, from the server's Prometheus metrics."""
    import urllib.request  # noqa: PLC0415

    url = f"http://127.0.0.1:{server.rest_port}{METRICS_PATH}"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split(" ")[0]
        totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    prefix = ":tensorflow:serving:batching_session:"
    runs = totals.get(prefix + "processed_batch_size_count", 0.0)
    queued = totals.get(prefix + "queuing_latency_count", 0.0)
    return {"merged_calls": runs, "requests": queued,
            "mean_batch_rows": round(totals.get(prefix + "processed_batch_size_sum",
                                                0.0) / max(runs, 1), 2),
            "mean_queuing_ms": round(totals.get(prefix + "queuing_latency_sum", 0.0)
                                     / max(queued, 1) / 1e3, 3)}


def in_process_levels(export_dir: str | os.PathLike, requests: Sequence[Any],
                      levels: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """The same ``requests`` as direct calls of ``export_dir``'s SavedModels, at
    each level (after the same warm-up as :func:`grpc_levels`).

    Returns:
        ``{"loads": [Load per level], "warm": Load}``.
    """
    local = local_requests(requests, load_models(export_dir))
    warm = run_in_process(local, max(c for c, _ in levels),
                          min(2.0, levels[-1][1] / 4))
    return {"loads": [run_in_process(local, clients, seconds)
                      for clients, seconds in levels], "warm": warm}


def compare(grpc: Load, local: Load, unbatched: Load | None = None) -> dict[str, Any]:
    """One level: both summaries and gRPC's overhead ratios (and, for a batched
    run, its p99 over the ``unbatched`` gRPC run's)."""
    out = {"clients": grpc.clients, "grpc": grpc.summary(),
           "in_process": local.summary(),
           "p50_overhead": _ratio(grpc.latency_ms(50), local.latency_ms(50)),
           "p99_overhead": _ratio(grpc.latency_ms(99), local.latency_ms(99)),
           "throughput_ratio": _ratio(grpc.per_second, local.per_second)}
    if unbatched is not None:
        out["p99_vs_unbatched"] = _ratio(grpc.latency_ms(99), unbatched.latency_ms(99))
        out["unbatched_p99_ms"] = round(unbatched.latency_ms(99), 2)
    return out


def _ratio(a: float, b: float) -> float:
    """``a / b`` to 3 decimals; NaN when ``b`` is 0 or NaN."""
    return round(a / b, 3) if b > 0 else float("nan")


def measure(export_dir: str | os.PathLike, prepared: Any,
            levels: Sequence[tuple[int, float]], users: int = 64,
            batching: bool = False) -> dict[str, Any]:
    """The whole scenario on a copy of ``export_dir`` (which is not changed).

    Args:
        export_dir: A MovieLens export (``<name>/<version>/`` per model).
        prepared: Its ``movielens.prepare`` result (test users, corpus).
        levels: ``(clients, seconds)`` per load level, gRPC and in-process
            alike; the last level's gRPC run has the version swap.
        users: Distinct users in the request mix (4 requests each).
        batching: Also run the levels against a server with batching on
            (:data:`BATCHING_FILE`).

    Returns:
        ``{"levels": [compare() per level], "load": the last gRPC level's
        Load.summary(), "warmup_failed", "failures", "swap", "sigterm",
        "bind", "log"}``, and with ``batching`` ``"batched": {"levels",
        "load", "failures", "swap", "sigterm", "parameters"}`` (the levels
        compared with the same in-process runs and the unbatched gRPC runs).
    """
    requests = predict_requests(movielens_users(prepared, users))
    with tempfile.TemporaryDirectory(prefix="tfdssm-bench-serving-") as tmp:
        copy = pathlib.Path(tmp) / "export"
        shutil.copytree(export_dir, copy)
        served = grpc_levels(copy, prepared, requests, levels)
        batched = None
        if batching:
            copy = pathlib.Path(tmp) / "export-batched"
            shutil.copytree(export_dir, copy)
            parameters = pathlib.Path(tmp) / "batching.txt"
            parameters.write_text(BATCHING_FILE)
            monitoring = pathlib.Path(tmp) / "monitoring.txt"
            monitoring.write_text(
                f'prometheus_config {{ enable: true, path: "{METRICS_PATH}" }}\n')
            batched = grpc_levels(copy, prepared, requests, levels,
                                  ("--batching-parameters-file", str(parameters),
                                   "--monitoring-config-file", str(monitoring)))
    local = in_process_levels(export_dir, requests, levels)
    failed = [c for load in served["loads"] for c in load.failed]
    out = {"levels": [compare(g, i) for g, i in
                      zip(served["loads"], local["loads"], strict=True)],
           "load": served["loads"][-1].summary(),
           "warmup_failed": len(served["warm"].failed) + len(local["warm"].failed),
           "failures": [(c.model, c.code, c.details) for c in failed[:5]],
           **{key: served[key] for key in ("swap", "sigterm", "bind", "log")}}
    if batched is not None:
        failed = [c for load in batched["loads"] for c in load.failed]
        out["batched"] = {
            "levels": [compare(b, i, g) for b, i, g in zip(
                batched["loads"], local["loads"], served["loads"], strict=True)],
            "load": batched["loads"][-1].summary(),
            "warmup_failed": len(batched["warm"].failed),
            "failures": [(c.model, c.code, c.details) for c in failed[:5]],
            "parameters": BATCHING_FILE.strip().replace("\n", "; "),
            **{key: batched[key] for key in ("swap", "sigterm", "log",
                                             "batch_stats")}}
    return out


def markdown(result: Mapping[str, Any]) -> str:
    """The report section: one table row per level, then the swap and SIGTERM."""
    rows = [[level["clients"], level["grpc"]["seconds"], level["grpc"]["requests"],
             level["grpc"]["failed"], level["grpc"]["requests_per_s"],
             level["grpc"]["p50_ms"], level["grpc"]["p99_ms"],
             level["in_process"]["requests_per_s"], level["in_process"]["p50_ms"],
             level["in_process"]["p99_ms"], f"{level['p50_overhead']:.2f}x",
             f"{level['throughput_ratio']:.2f}",
             f"{level['grpc']['rss_start_mb']:.0f} -> "
             f"{level['grpc']['rss_end_mb']:.0f}", *_cpu_cells(level)]
            for level in result["levels"]]
    sigterm, swap = result["sigterm"], result["swap"]
    return (
        "### Serving under load (`tfdssm serve`, gRPC, loopback) vs in-process "
        "calls\n\n"
        "MovieLens export; request mix: ScaNN and brute-force top-10, with and "
        "without exclusions, user embeddings. gRPC: one `tfdssm serve` process, "
        "N client threads with a channel each. In-process: the same requests "
        "(same models, signatures and inputs) as direct signature calls of the "
        "`tf.saved_model.load`ed models, N threads in one process.\n\n"
        + common.table(["clients", "s", "gRPC requests", "failed", "gRPC req/s",
                        "gRPC p50 ms", "gRPC p99 ms", "in-process req/s",
                        "in-process p50 ms", "in-process p99 ms",
                        "p50 overhead (gRPC / in-process)",
                        "throughput (gRPC / in-process)", "server RSS MiB",
                        *CPU_COLUMNS], rows)
        + f"\n\nA new `retrieval` version (v{swap['new_version']}) swapped in "
        f"during the {result['levels'][-1]['clients']}-client gRPC run: versions "
        f"served {swap['versions_served']}, {swap['failed']} failed requests "
        "(the server's CPU in that run includes loading it). "
        f"SIGTERM under load: {sigterm['in_flight']} requests in flight, "
        f"{len(sigterm['in_flight_failed'])} failed; a {sigterm['slow_seconds']} s "
        f"request in flight {'completed' if sigterm['slow_ok'] else 'FAILED'}; exit "
        f"code {sigterm['exit_code']} after {sigterm['exit_seconds']} s. Listening "
        f"on {result['bind']}."
        + (_batched_markdown(result["batched"]) if "batched" in result else ""))


CPU_COLUMNS = ("server CPU ms/request", "gRPC clients' CPU ms/request",
               "in-process CPU ms/request")


def _cpu_cells(level: Mapping[str, Any]) -> list[float]:
    """CPU per answered request: the server process and the client threads'
    process in the gRPC run; the whole in-process run."""
    return [level["grpc"]["server_cpu_ms_per_request"],
            level["grpc"]["this_process_cpu_ms_per_request"],
            level["in_process"]["this_process_cpu_ms_per_request"]]


def _batched_markdown(batched: Mapping[str, Any]) -> str:
    """The batching-on rows: against the same in-process (unbatched) calls and
    the unbatched gRPC run of the same requests."""
    rows = [[level["clients"], level["grpc"]["requests"], level["grpc"]["failed"],
             level["grpc"]["requests_per_s"], level["grpc"]["p50_ms"],
             level["grpc"]["p99_ms"], level["in_process"]["requests_per_s"],
             level["in_process"]["p50_ms"], level["unbatched_p99_ms"],
             f"{level['throughput_ratio']:.2f}", f"{level['p50_overhead']:.2f}x",
             f"{level['p99_vs_unbatched']:.2f}x", *_cpu_cells(level)]
            for level in batched["levels"]]
    sigterm, swap = batched["sigterm"], batched["swap"]
    stats = batched.get("batch_stats", {})
    return (
        "\n\n#### With server-side batching (`tfdssm serve "
        "--batching-parameters-file`)\n\n"
        f"Parameters: `{batched['parameters']}`. Same requests and clients; the "
        "baseline is the same in-process unbatched calls as above.\n\n"
        + common.table(["clients", "gRPC requests", "failed", "batched req/s",
                        "batched p50 ms", "batched p99 ms", "in-process req/s",
                        "in-process p50 ms", "unbatched gRPC p99 ms",
                        "throughput (batched / in-process)",
                        "p50 overhead (batched / in-process)",
                        "p99 (batched / unbatched gRPC)", *CPU_COLUMNS], rows)
        + f"\n\nOver the batched run: {stats.get('requests', 0):.0f} requests in "
        f"{stats.get('merged_calls', 0):.0f} SavedModel calls, "
        f"{stats.get('mean_batch_rows', 0)} rows per call on average, "
        f"{stats.get('mean_queuing_ms', 0)} ms mean queuing delay (the server's "
        "Prometheus metrics). "
        f"Version swap under batched load: versions served "
        f"{swap['versions_served']}, {swap['failed']} failed requests. SIGTERM: "
        f"{sigterm['in_flight']} in flight, {len(sigterm['in_flight_failed'])} "
        f"failed; exit code {sigterm['exit_code']} after "
        f"{sigterm['exit_seconds']} s.")


def run(quick: bool = False) -> dict[str, Any]:
    from tfdssm.recipes import movielens  # noqa: PLC0415
    from tfdssm.training import run as train  # noqa: PLC0415

    levels = ((1, 4.0), (8, 4.0)) if quick else ((1, 15.0), (8, 15.0), (32, 30.0))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = movielens.prepare(verbose=False)
        train.run(prepared, tmp, epochs=1, verbose=0)
        result = measure(tmp, prepared, levels, batching=True)
    return {"markdown": markdown(result), "result": result}
