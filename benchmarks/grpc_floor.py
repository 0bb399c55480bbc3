"""Where a ``tfdssm serve`` Predict call's time goes, and grpcio's floor.

Two measurements, both against baselines taken in the same run:

* **Empty round trip**: a unary call answering ``b"x"`` at once, served by
  grpcio's synchronous server (a thread pool of 8, as ``tfdssm serve``) and by
  its asyncio server (``grpc.aio``, the handler a coroutine), each in its own
  process, alternating rounds, 1 and 32 client threads (one channel each) in
  this process. This is the least a gRPC Predict can cost over an in-process
  call, whatever the handler does.
* **Server-side parts of one Predict** on the MovieLens export (the serving
  suite's request mix, one thread): decoding and checking the
  ``TensorProto`` inputs, making tensors (``predict.as_tensor``, and
  ``tf.constant`` for comparison), the signature call, encoding the response;
  against the serving suite's in-process baseline (the signature called with
  ready tensors, outputs read as numpy).

``python -m benchmarks.run --suite grpc_floor`` (``--quick``: fewer calls).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common

SERVICE, METHOD = "tfdssm.bench.Empty", "Call"


def _handlers(behavior: Callable[..., Any]) -> Any:
    import grpc  # noqa: PLC0415

    return grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(behavior)})


def serve(kind: str, seconds: float = 600.0) -> None:
    """Runs an empty server (``sync`` or ``aio``) on a free loopback port,
    prints the port, exits after ``seconds`` (or when killed)."""
    import grpc  # noqa: PLC0415

    if kind == "sync":
        from concurrent import futures  # noqa: PLC0415

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((_handlers(lambda request, context: b"x"),))
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        server.start()
        server.wait_for_termination(seconds)
        return

    async def answer(request: bytes, context: Any) -> bytes:
        return b"x"

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handlers(answer),))
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await server.wait_for_termination(seconds)

    asyncio.run(main())


def round_trips(port: int, clients: int, calls: int) -> dict[str, float]:
    """``clients`` threads (a channel each) making ``calls`` empty calls each."""
    import grpc  # noqa: PLC0415

    times: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        for _ in range(20):
            call(b"", timeout=30)
        mine = []
        for _ in range(calls):
            begin = time.perf_counter()
            call(b"", timeout=30)
            mine.append(time.perf_counter() - begin)
        channel.close()
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.perf_counter() - start
    times.sort()
    return {"p50_ms": times[len(times) // 2] * 1e3,
            "p99_ms": times[int(len(times) * 0.99)] * 1e3,
            "per_s": len(times) / elapsed}


def empty_round_trips(rounds: int, calls: int,
                      levels: Sequence[int] = (1, 32)) -> dict[int, dict[str, dict]]:
    """``{clients: {"sync"|"aio": medians over the rounds}}``."""
    servers = {}
    try:
        for kind in ("sync", "aio"):
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.grpc_floor", kind],
                stdout=subprocess.PIPE, text=True)
            servers[kind] = (proc, int(proc.stdout.readline()))
        runs: dict[tuple[int, str], list[dict[str, float]]] = {}
        for _ in range(rounds):
            for clients in levels:
                for kind, (_, port) in servers.items():
                    count = calls if clients == 1 else max(20, calls // 8)
                    runs.setdefault((clients, kind), []).append(
                        round_trips(port, clients, count))
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait(timeout=60)
    return {clients: {kind: {key: statistics.median(r[key] for r in runs[clients, kind])
                             for key in ("p50_ms", "p99_ms", "per_s")}
                      for kind in ("sync", "aio")} for clients in levels}


def _median_ms(function: Callable[[int], Any], count: int) -> float:
    for i in range(min(100, count)):
        function(i)
    times = []
    for i in range(count):
        begin = time.perf_counter()
        function(i)
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def predict_parts(export_dir: str, requests: Sequence[Any], count: int) -> dict:
    """Median ms per request of each server-side step, and of the in-process
    call (see the module docstring)."""
    import tensorflow as tf  # noqa: PLC0415

    from benchmarks import serving  # noqa: PLC0415
    from tfdssm.export import serving_config  # noqa: PLC0415
    from tfdssm.serving import grpc_server, predict  # noqa: PLC0415
    from tfdssm.serving.models import ModelManager  # noqa: PLC0415

    manager = ModelManager(serving_config.read_model_specs(export_dir), 3600.0)
    manager.load_all()
    try:
        size = len(requests)
        servables = [manager.get(r.model_spec.name) for r in requests]
        names = [r.model_spec.signature_name for r in requests]
        signatures = [s.signature(n) for s, n in zip(servables, names, strict=True)]
        limit = predict.DEFAULT_MAX_BATCH_SIZE

        def decode(i: int) -> Any:
            j = i % size
            return servables[j].tensors(names[j], requests[j].inputs, 64 << 20, limit,
                                        as_numpy=True)

        arrays = [decode(i) for i in range(size)]

        def convert(i: int) -> dict:
            specs = signatures[i % size].specs
            return {n: predict.as_tensor(v, specs[n].dtype)
                    for n, v in arrays[i % size].items()}

        def constant(i: int) -> dict:
            specs = signatures[i % size].specs
            return {n: tf.constant(v, specs[n].dtype)
                    for n, v in arrays[i % size].items()}

        tensors = [convert(i) for i in range(size)]
        outputs = [signatures[i].call(tensors[i]) for i in range(size)]

        def encode(i: int) -> bytes:
            j = i % size
            return grpc_server.PredictionService._response(
                servables[j], names[j], outputs[j]).SerializeToString()

        def whole(i: int) -> bytes:
            inputs = decode(i)
            result = servables[i % size].predict(names[i % size], inputs, (), limit)
            return grpc_server.PredictionService._response(
                servables[i % size], names[i % size], result).SerializeToString()

        local = serving.local_requests(requests, serving.load_models(export_dir))
        send, _ = serving.local_client()
        steps = {
            "decode + check the TensorProtos (tensors_from_protos)": decode,
            "check the arrays (Signature.check)":
                lambda i: signatures[i % size].check(arrays[i % size], (), limit),
            "arrays -> tensors, predict.as_tensor": convert,
            "arrays -> tensors, tf.constant (before)": constant,
            "signature call (flat) + outputs as numpy":
                lambda i: signatures[i % size].call(tensors[i % size]),
            "encode + serialize the PredictResponse": encode,
            "server total (all but the gRPC transport)": whole,
            "in-process baseline: signature(**tensors) + numpy":
                lambda i: send(local[i % size]),
        }
        return {label: _median_ms(step, count) for label, step in steps.items()}
    finally:
        manager.stop()


def run(quick: bool = False) -> dict[str, Any]:
    from benchmarks import serving  # noqa: PLC0415
    from tfdssm.recipes import movielens  # noqa: PLC0415
    from tfdssm.training import run as train  # noqa: PLC0415

    empty = empty_round_trips(rounds=2 if quick else 3, calls=400 if quick else 1500)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = movielens.prepare(verbose=False)
        train.run(prepared, tmp, epochs=1, verbose=0)
        requests = serving.predict_requests(serving.movielens_users(prepared, 16))
        parts = predict_parts(tmp, requests, 300 if quick else 2000)
    rows = [[clients, f"{by['sync']['p50_ms']:.3f}", f"{by['aio']['p50_ms']:.3f}",
             f"{by['sync']['p99_ms']:.3f}", f"{by['aio']['p99_ms']:.3f}",
             f"{by['sync']['per_s']:.0f}", f"{by['aio']['per_s']:.0f}",
             f"{by['aio']['per_s'] / by['sync']['per_s']:.2f}"]
            for clients, by in empty.items()]
    baseline = parts["in-process baseline: signature(**tensors) + numpy"]
    total = parts["server total (all but the gRPC transport)"]
    floor = empty[1]["sync"]["p50_ms"]
    markdown = (
        "### gRPC floor and server-side parts of a Predict call\n\n"
        "Empty unary round trip (answer `b\"x\"`), server in its own process, "
        "client threads with a channel each; medians over alternating rounds:\n\n"
        + common.table(["clients", "sync p50 ms", "aio p50 ms", "sync p99 ms",
                        "aio p99 ms", "sync calls/s", "aio calls/s",
                        "aio / sync calls/s"], rows)
        + "\n\nOne Predict request's server-side steps (median ms over the serving "
        "suite's request mix, one thread), against the in-process call of the "
        "same request in the same run:\n\n"
        + common.table(["step", "ms", "/ in-process call"],
                       [[label, f"{ms:.3f}", f"{ms / baseline:.2f}"]
                        for label, ms in parts.items()])
        + f"\n\nOne client's floor: empty round trip ({floor:.3f} ms) + server "
        f"total ({total:.3f} ms) = {floor + total:.3f} ms, "
        f"{(floor + total) / baseline:.2f}x the in-process call ({baseline:.3f} ms).")
    return {"markdown": markdown, "result": {"empty": empty, "parts": parts}}


if __name__ == "__main__":
    serve(sys.argv[1])
