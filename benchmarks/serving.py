"""``tfdssm serve`` under load: concurrent gRPC clients, a version swap, SIGTERM.

One ``tfdssm serve`` process on the MovieLens export (loopback ports); N client
threads, each with its own channel, send ``Predict`` calls back to back for S
seconds (a mix of ScaNN and brute-force top-10, with and without exclusions,
and user embeddings). Reported: requests/s, latency percentiles, failed
requests, the server's RSS over the run, a new ``retrieval`` version swapped in
halfway (no request may fail), and a SIGTERM sent under load (requests in
flight must finish; the process must exit 0).

``python -m benchmarks.run --suite serving`` (32 clients x 30 s; ``--quick``:
8 x 5 s). ``tests/test_load.py`` runs the same code, shortened, in CI.
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
    written under a temporary name and renamed, as an export does."""
    numbers = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
    target = numbers[-1] + 1
    tmp = base / f".tmp-bench-{target}"
    shutil.copytree(base / str(source or numbers[-1]), tmp)
    os.rename(tmp, base / str(target))
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
    code: str  # "OK" or the gRPC status name
    version: int = 0
    details: str = ""


@dataclasses.dataclass
class Load:
    """What :func:`run_load` measured."""

    clients: int
    seconds: float
    calls: list[Call]
    rss: list[tuple[float, float]]  # (seconds since start, MiB)
    started: float

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
                "rss_growth_mb": round(growth, 1)}


def run_load(
    target: str,
    requests: Sequence[Any],
    clients: int,
    seconds: float,
    rss: Callable[[], float] | None = None,
    events: Sequence[tuple[float, Callable[[], Any]]] = (),
    stop_on: threading.Event | None = None,
) -> Load:
    """``clients`` threads (one channel each) sending ``requests`` round-robin.

    Args:
        target: ``host:port`` of the gRPC server.
        requests: PredictRequests to cycle through (each client starts at a
            different offset).
        clients: Concurrent clients.
        seconds: How long every client keeps sending.
        rss: Returns the server's RSS in MiB (sampled every 0.25 s).
        events: ``(seconds after start, callable)`` run by the sampler thread,
            e.g. adding a model version or sending SIGTERM.
        stop_on: Clients also stop once this is set.
    """
    import grpc  # noqa: PLC0415
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: PLC0415

    calls: list[Call] = []
    lock = threading.Lock()
    stop = stop_on or threading.Event()
    started = time.monotonic()
    deadline = started + seconds

    def client(offset: int) -> None:
        channel = grpc.insecure_channel(target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        mine, i = [], offset
        while time.monotonic() < deadline and not stop.is_set():
            request = requests[i % len(requests)]
            i += 1
            begin = time.monotonic()
            try:
                response = stub.Predict(request, timeout=30)
                mine.append(Call(begin, time.monotonic(), request.model_spec.name,
                                 "OK", response.model_spec.version.value))
            except grpc.RpcError as error:
                mine.append(Call(begin, time.monotonic(), request.model_spec.name,
                                 error.code().name, details=error.details() or ""))
                stop.wait(0.01)  # back off, as a real client would
        channel.close()
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
    for thread in [*threads, watcher]:
        thread.start()
    for thread in [*threads, watcher]:
        thread.join(timeout=seconds + 120)
    return Load(clients, time.monotonic() - started, calls, samples, started)


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


def measure(export_dir: str | os.PathLike, prepared: Any, clients: int,
            seconds: float, users: int = 64) -> dict[str, Any]:
    """The whole scenario on a copy of ``export_dir`` (which is not changed).

    Returns:
        ``{"load": Load.summary(), "swap": ..., "sigterm": ..., "bind": ...}``.
    """
    with tempfile.TemporaryDirectory(prefix="tfdssm-bench-serving-") as tmp:
        copy = pathlib.Path(tmp) / "export"
        shutil.copytree(export_dir, copy)
        requests = predict_requests(movielens_users(prepared, users))
        server = start_serve(copy, "--poll-seconds", "0.2")
        try:
            bind = server.listening()
            warm = run_load(server.target, requests, clients, min(2.0, seconds / 4))
            swapped: dict[str, int] = {}
            load = run_load(
                server.target, requests, clients, seconds, rss=server.rss_mb,
                events=[(seconds / 3, lambda: swapped.update(
                    version=add_version(copy / "retrieval")))])
            sigterm = sigterm_under_load(server, requests,
                                         slow_candidates_request(prepared))
        finally:
            server.kill()
        swap = {"new_version": swapped.get("version"),
                "versions_served": sorted(load.versions("retrieval")),
                "failed": len(load.failed)}
        return {"load": load.summary(), "warmup_failed": len(warm.failed),
                "failures": [(c.model, c.code, c.details) for c in load.failed[:5]],
                "swap": swap, "sigterm": sigterm,
                "bind": {port: sorted(a) for port, a in bind.items()},
                "log": server.log[-12:]}


def run(quick: bool = False) -> dict[str, Any]:
    from tfdssm import train  # noqa: PLC0415
    from tfdssm.pipelines import movielens  # noqa: PLC0415

    clients, seconds = (8, 5.0) if quick else (32, 30.0)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = movielens.prepare(verbose=False)
        train.run(prepared, tmp, epochs=1, verbose=0)
        result = measure(tmp, prepared, clients, seconds)
    load, sigterm, swap = result["load"], result["sigterm"], result["swap"]
    rows = [[f"{clients} gRPC clients x {seconds:.0f} s (MovieLens export: ScaNN, "
             "brute force, exclusions, embeddings)", load["requests"], load["failed"],
             load["requests_per_s"], load["p50_ms"], load["p99_ms"],
             f"{load['rss_start_mb']:.0f} -> {load['rss_end_mb']:.0f}"]]
    markdown = (
        "### Serving under load (`tfdssm serve`, gRPC, loopback)\n\n"
        + common.table(["scenario", "requests", "failed", "req/s", "p50 ms", "p99 ms",
                        "RSS MiB"], rows)
        + f"\n\nA new `retrieval` version (v{swap['new_version']}) swapped in under "
        f"load: versions served {swap['versions_served']}, {swap['failed']} failed "
        f"requests. SIGTERM under load: {sigterm['in_flight']} requests in flight, "
        f"{len(sigterm['in_flight_failed'])} failed; a {sigterm['slow_seconds']} s "
        f"request in flight {'completed' if sigterm['slow_ok'] else 'FAILED'}; exit "
        f"code {sigterm['exit_code']} after {sigterm['exit_seconds']} s. Listening "
        f"on {result['bind']}.")
    return {"markdown": markdown, "result": result}
