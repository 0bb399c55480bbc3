"""Graceful stop of ``tfdssm serve``: no request the server has received is lost.

The contract (``tfdssm/serving/server.py``): on stop (SIGTERM) the server stops
accepting requests, lets the ones it has received finish (up to
``grace_seconds``) and exits; later requests are refused with a retryable
UNAVAILABLE (HTTP 503, or a refused connection).

Under load the server can fall behind *accepting* requests: gRPC core queues
calls that arrived but that grpcio's single serving thread has not taken yet
(it takes them one at a time, and needs the GIL and its server lock for each),
and the REST listener queues connections its accept loop has not accepted. Both
queues used to be dropped on stop: gRPC core cancels the calls it still holds
(CANCELLED, whatever the grace period) and closing the listener resets the
queued connections. These tests fill those queues deterministically (by holding
grpcio's server lock, or by holding the REST accept loop) instead of relying on
load. A tiny SavedModel (``y = 2 x``) keeps them fast.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import dataclasses
import json
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc._cython import cygrpc
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfdssm.serving.config_files import BatchingParameters
from tfdssm.serving.server import Server

WAIT = 30.0  # generous: a loaded 2-core CI machine
GRACE = 20.0
# The guarantees hold with server-side batching on too (gRPC then runs on
# grpcio's asyncio server, requests wait for their batch as coroutines, and the
# batcher stops after them).
BATCHING = pytest.mark.parametrize("batching", [
    None, BatchingParameters(max_batch_size=4, batch_timeout_micros=5000,
                             num_batch_threads=1)], ids=["unbatched", "batched"])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """``echo/1``: one ``serving_default`` signature, ``{"y": 2 * x}``."""

    class Echo(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def double(self, x):
            return {"y": x * 2.0}

    root = tmp_path_factory.mktemp("shutdown-export")
    module = Echo()
    tf.saved_model.save(module, str(root / "echo" / "1"),
                        signatures={"serving_default": module.double})
    return root


def _request(value: float, model: str = "echo") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([value], np.float32)))
    return request


def _y(response: predict_pb2.PredictResponse) -> float:
    return float(tf.make_ndarray(response.outputs["y"])[0])


def _code(future: grpc.Future) -> str:
    try:
        future.result()
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"
    return "OK"


def _wait_for(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _server_ids() -> set[str]:
    return {s["ref"]["serverId"]
            for s in json.loads(cygrpc.channelz_get_servers(0)).get("server", [])}


def _calls_started(server_id: str) -> int:
    """Calls that reached this gRPC server's core (channelz), taken or not."""
    data = json.loads(cygrpc.channelz_get_server(int(server_id)))["server"]["data"]
    return int(data.get("callsStarted", 0))


@contextlib.contextmanager
def _calls_held_in_core(server: Server):
    """While open, the server takes no new call from gRPC core: grpcio's
    serving thread (thread-pool server) waits for its server lock, which it
    takes for every new call; the asyncio server's loop (batching) is blocked."""
    loop = getattr(server._grpc, "loop", None)
    if loop is None:
        state = getattr(server._grpc.server, "_state", None)
        assert state is not None and hasattr(state, "lock"), (
            "grpcio's server internals changed (no _state.lock)")
        with state.lock:
            yield
        return
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(WAIT)

    loop.call_soon_threadsafe(hold)
    assert entered.wait(WAIT)
    try:
        yield
    finally:
        release.set()


@contextlib.contextmanager
def _started(export_dir, **kwargs):
    before = _server_ids()
    server = Server(export_dir, grpc_port=0, **kwargs).start()
    try:
        (server_id,) = _server_ids() - before
        yield server, server_id
    finally:
        server.stop(grace_seconds=2)


@contextlib.contextmanager
def _gate_model(server: Server, name: str = "slow"):
    """Requests for model ``name`` block (then serve ``echo``) until released.

    Yields ``(entered, release)`` events; released on exit whatever happens.
    With batching, the request is held where it runs, in the batch thread (the
    asyncio gRPC server's loop must not block).
    """
    entered, release = threading.Event(), threading.Event()
    get = server.manager.get

    def gated(model, version=None):
        if model == name:
            entered.set()
            release.wait(WAIT)
            model = "echo"
        return get(model, version)

    def renamed(model, version=None):
        if model == name:
            return dataclasses.replace(get("echo", version), name=name)
        return get(model, version)

    batcher = server.batcher
    if batcher is None:
        server.manager.get = gated
    else:
        server.manager.get = renamed
        run = batcher._run

        def gated_run(batch) -> None:
            if batch.tasks[0].model == name:
                entered.set()
                release.wait(WAIT)
            run(batch)

        batcher._run = gated_run
    try:
        yield entered, release
    finally:
        release.set()


@contextlib.contextmanager
def _hold_accept_loop(server: Server):
    """The REST accept loop stalls on the next connection until released."""
    rest = server._rest
    entered, release = threading.Event(), threading.Event()
    verify = rest.verify_request

    def held(request, address):
        entered.set()
        release.wait(WAIT)
        return verify(request, address)

    rest.verify_request = held
    try:
        yield entered, release
    finally:
        release.set()


def _stopping(server: Server) -> threading.Thread:
    """``server.stop(GRACE)`` in a thread, as on SIGTERM."""
    stopper = threading.Thread(target=server.stop, kwargs={"grace_seconds": GRACE})
    stopper.start()
    return stopper


# --------------------------------------------------------------------------- #
# gRPC
# --------------------------------------------------------------------------- #


@BATCHING
def test_grpc_calls_queued_in_grpc_core_are_served_not_cancelled(export_dir, batching):
    """Calls gRPC core holds for grpcio's serving thread when the stop comes."""
    count = 8
    with _started(export_dir, rest_port=None, workers=2,
                  batching=batching) as (server, server_id):
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=WAIT)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        base = _calls_started(server_id)
        with _calls_held_in_core(server):
            calls = [stub.Predict.future(_request(i), timeout=WAIT * 2)
                     for i in range(count)]
            _wait_for(lambda: _calls_started(server_id) >= base + count,
                      "the calls to reach the server")
            stopper = _stopping(server)  # every call has been received
            # Let stop() get going: the old code then waits for this lock in
            # grpc's Server.stop; the new one sends its own call (one more).
            with contextlib.suppress(AssertionError):
                _wait_for(lambda: _calls_started(server_id) > base + count,
                          "stop() to begin", timeout=1.0)
        stopper.join(timeout=WAIT + GRACE)
        assert not stopper.is_alive()
        codes = [_code(call) for call in calls]
        assert codes == ["OK"] * count, codes
        assert [_y(call.result()) for call in calls] == [2.0 * i for i in range(count)]
        channel.close()


@BATCHING
def test_grpc_stop_refuses_late_calls_with_unavailable_and_drains(export_dir, batching):
    """A call after the stop began: UNAVAILABLE; the one in flight: served."""
    with (_started(export_dir, rest_port=None, batching=batching) as (server, _),
          _gate_model(server) as (entered, release)):
        target = f"127.0.0.1:{server.grpc_port}"
        channel = grpc.insecure_channel(target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        slow = stub.Predict.future(_request(7.0, "slow"), timeout=WAIT * 2)
        assert entered.wait(WAIT)
        stopper = _stopping(server)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", server.grpc_port), 1).close()
            except OSError:
                return True
            return False

        _wait_for(refused, "the gRPC port to close")
        assert stopper.is_alive()  # still draining the slow call
        fresh = grpc.insecure_channel(target)
        late = [stub.Predict.future(_request(1.0), timeout=WAIT),  # old channel
                prediction_service_pb2_grpc.PredictionServiceStub(fresh)
                .Predict.future(_request(1.0), timeout=WAIT)]
        codes = [_code(call) for call in late]
        assert all(code.startswith("UNAVAILABLE") for code in codes), codes
        release.set()
        stopper.join(timeout=WAIT + GRACE)
        assert not stopper.is_alive()
        assert _code(slow) == "OK" and _y(slow.result()) == 14.0
        fresh.close()
        channel.close()


def test_grpc_calls_after_admission_closed_get_unavailable(export_dir):
    """After the cut-off, calls are refused at once, even with every worker busy."""
    with (_started(export_dir, rest_port=None, workers=1) as (server, _),
          _gate_model(server) as (entered, release)):
        grpc_server = server._grpc
        if not hasattr(grpc_server, "close_admission"):
            pytest.fail("the gRPC server has no close_admission (old code)")
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        assert _y(stub.Predict(_request(2.0), timeout=WAIT)) == 4.0
        slow = stub.Predict.future(_request(5.0, "slow"), timeout=WAIT * 2)
        assert entered.wait(WAIT)  # the only worker is busy
        assert grpc_server.close_admission(time.monotonic() + WAIT)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(_request(2.0), timeout=WAIT / 2)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.value.details()
        release.set()
        assert _code(slow) == "OK" and _y(slow.result()) == 10.0
        channel.close()


# --------------------------------------------------------------------------- #
# REST
# --------------------------------------------------------------------------- #


def _post(port: int, value: float, model: str = "echo",
          timeout: float = WAIT) -> socket.socket:
    body = json.dumps({"instances": [value]}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(f"POST /v1/models/{model}:predict HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head, "the connection closed without an answer"
    return int(head.split()[1]), json.loads(payload)


def test_rest_connections_queued_in_the_listener_are_served(export_dir):
    """Connections the REST accept loop has not accepted yet when the stop comes."""
    with (_started(export_dir, rest_port=0) as (server, _),
          _hold_accept_loop(server) as (entered, release)):
        first = _post(server.rest_port, 0.0)
        assert entered.wait(WAIT)  # the accept loop is stuck on `first`
        queued = [_post(server.rest_port, float(i)) for i in range(1, 5)]
        stopper = _stopping(server)
        with contextlib.suppress(AssertionError):  # the stop has reached REST
            _wait_for(lambda: getattr(server._rest, "_BaseServer__shutdown_request",
                                      True),
                      "the REST accept loop to be told to stop", timeout=5.0)
        release.set()
        answers = [_answer(sock) for sock in [first, *queued]]
        stopper.join(timeout=WAIT + GRACE)
        assert not stopper.is_alive()
        assert answers == [(200, {"predictions": [2.0 * i]}) for i in range(5)]


def test_rest_late_connections_are_answered_promptly(export_dir):
    """While gRPC drains, a new REST request: 503 or refused, not left hanging."""
    with (_started(export_dir, rest_port=0) as (server, _),
          _gate_model(server) as (entered, release)):
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        slow = stub.Predict.future(_request(3.0, "slow"), timeout=WAIT * 2)
        assert entered.wait(WAIT)
        rest = server._rest
        stopper = _stopping(server)
        loop_done = getattr(rest, "_BaseServer__is_shut_down", None)
        if loop_done is not None:
            _wait_for(loop_done.is_set, "the REST accept loop to stop")
        try:
            status, body = _answer(_post(server.rest_port, 1.0, timeout=5.0))
        except ConnectionRefusedError:
            status, body = "refused", {}
        except TimeoutError:
            status, body = "no answer in 5 s", {}
        assert stopper.is_alive()  # still draining the slow gRPC call
        # 200 only if it beat the cut-off (queued before stop's own connection).
        assert status in ("refused", 200, 503), (status, body)
        if status == 503:
            assert "shutting down" in body["error"]
        release.set()
        stopper.join(timeout=WAIT + GRACE)
        assert not stopper.is_alive()
        assert _code(slow) == "OK"
        channel.close()
