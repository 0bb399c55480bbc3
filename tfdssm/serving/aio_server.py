"""TF Serving's gRPC services on grpcio's asyncio server, for batched serving.

With server-side batching on, a request spends most of its life waiting for
its batch. On grpcio's thread-pool server each waiting request holds a worker
thread (``tfdssm serve`` ran 128), and every call crosses from grpcio's serving
thread to a worker and back, each crossing a wait for the GIL among all those
threads. Here the calls are coroutines on one event loop, in a thread of their
own: a call is decoded and checked on the loop, queued in the
:class:`~tfdssm.serving.batching.Batcher`, and awaits its answer, which the
batch thread hands back with one wake-up of the loop per batch, not per
request. Measured on the MovieLens export, 32 clients on 2 cores
(docs/batching.md): more requests per second for less server CPU per request
than the thread-pool server with the same batching parameters.

The services and their answers are those of :mod:`tfdssm.serving.grpc_server`
(same messages, codes and metrics); so is the graceful stop: a *marker* call
taken by the loop proves every call received before it has been taken from
gRPC core, calls taken after it are refused ``UNAVAILABLE``, and grpcio's stop
then drains the admitted ones. The loop must never block: the model runs in the
batch threads (a request with a scalar input, which cannot be batched, runs on
the loop; none of tfdssm's exports has one).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any

import grpc
from tensorflow_serving.apis import predict_pb2

from tfdssm.errors import ServingError
from tfdssm.serving import batching, predict
from tfdssm.serving.grpc_server import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SHUTTING_DOWN,
    Admission,
    ModelService,
    PredictionService,
    add_services_and_bind,
    local_address,
    metadata_response,
    requested_version,
    server_options,
    status_code,
    status_response,
)
from tfdssm.serving.metrics import Metrics
from tfdssm.serving.models import ModelManager

LOG = logging.getLogger("tfdssm.serving")
_START_SECONDS = 60.0  # binding and starting the server


class _Waker:
    """Hands answered batch tasks back to the event loop.

    :meth:`notify` runs in a batch thread; the loop is woken once for all the
    tasks answered before it gets to run :meth:`_drain` (one batch's worth),
    not once per task.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def notify(self, future: asyncio.Future, task: Any) -> None:
        self._ready.append((future, task))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop has closed: nobody awaits the answer
            LOG.debug("tfdssm serve: a batch answered after the gRPC loop closed")

    def _drain(self) -> None:
        with self._lock:
            self._scheduled = False
        while self._ready:
            future, task = self._ready.popleft()
            if future.done():  # the call was cancelled (its deadline passed)
                continue
            if task.error is not None:
                future.set_exception(task.error)
            else:
                future.set_result(task.result)


class AioPredictionService(PredictionService):
    """``Predict`` and ``GetModelMetadata`` as coroutines (see the module
    docstring); answers as :class:`~tfdssm.serving.grpc_server.PredictionService`.
    """

    def __init__(self, manager: ModelManager, batcher: batching.Batcher,
                 waker: _Waker, max_batch_size: int | None, max_bytes: int | None,
                 metrics: Metrics | None = None) -> None:
        super().__init__(manager, max_batch_size, max_bytes, metrics)
        self.batcher, self._waker = batcher, waker

    async def Predict(self, request: predict_pb2.PredictRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        spec = request.model_spec
        signature = spec.signature_name or predict.DEFAULT_SIGNATURE
        version: int | str = spec.version.value if spec.HasField("version") else ""
        status, failure, task = "OK", None, None
        try:
            servable = self.manager.get(spec.name, requested_version(spec))
            version = servable.version
            inputs = servable.tensors(signature, request.inputs, self.max_bytes,
                                      self.max_batch_size, as_numpy=True)
            future = asyncio.get_running_loop().create_future()
            task = self.batcher.submit(
                servable, signature, inputs, list(request.output_filter),
                self.max_batch_size,
                lambda done, future=future: self._waker.notify(future, done))
            outputs = task if isinstance(task, dict) else await future
            return self._response(servable, signature, outputs)
        except ServingError as error:
            failure = (status_code(error), str(error))
            status = failure[0].name
        except asyncio.CancelledError:  # the client went away or its deadline passed
            status = "CANCELLED"
            if isinstance(task, batching._Task):  # noqa: SLF001 - ours
                task.cancelled = True  # a batch not yet run skips it
            raise
        except Exception as error:  # noqa: BLE001 - answer, log, keep serving
            LOG.exception("tfdssm serve: internal error in Predict")
            status = "INTERNAL"
            failure = (grpc.StatusCode.INTERNAL, f"internal error: {error}")
        finally:
            self.metrics.request(spec.name, version, signature, status, "GRPC",
                                 (time.perf_counter() - start) * 1e6)
        await context.abort(*failure)

    async def GetModelMetadata(self, request: Any,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> Any:
        try:
            servable = self._metadata_servable(request)
        except ServingError as error:
            await context.abort(status_code(error), str(error))
        return metadata_response(servable)

    async def _unimplemented(self, request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, self.UNIMPLEMENTED)

    Classify = Regress = MultiInference = _unimplemented


class AioModelService(ModelService):
    """``GetModelStatus`` as a coroutine (see
    :class:`~tfdssm.serving.grpc_server.ModelService`)."""

    async def GetModelStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            return status_response(self.manager, request.model_spec.name,
                                   requested_version(request.model_spec))
        except ServingError as error:
            await context.abort(status_code(error), str(error))

    async def HandleReloadConfigRequest(self, request: Any,  # noqa: N802
                                        context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, self.RELOAD_UNIMPLEMENTED)


class _Admission(Admission, grpc.aio.ServerInterceptor):
    """Admits calls until the stop's marker call is taken, then refuses them.

    Runs on the loop as each call's task starts, in the order the calls were
    taken from gRPC core, which is the order they arrived (see
    :mod:`tfdssm.serving.grpc_server`).
    """

    def __init__(self) -> None:
        super().__init__()

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        verdict = self.verdict(details)
        if verdict == "admit":
            return await continuation(details)
        return self._refuse if verdict == "refuse" else None  # None: UNIMPLEMENTED


class AioGrpcServer:
    """A running asyncio gRPC server (see :func:`start_aio_grpc`) and its
    graceful stop; the same interface as
    :class:`~tfdssm.serving.grpc_server.GrpcServer`.

    Attributes:
        server: The ``grpc.aio.Server``.
        port: The bound port.
        loop: The event loop it runs on (in its own thread).
    """

    def __init__(self, server: grpc.aio.Server, port: int, host: str,
                 admission: _Admission, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        self.server, self.port, self.loop = server, port, loop
        self._admission, self._thread = admission, thread
        self._local = local_address(host, port)

    def close_admission(self, deadline: float) -> bool:
        """The cut-off (see
        :meth:`tfdssm.serving.grpc_server.GrpcServer.close_admission`)."""
        return self._admission.close(self._local, deadline)

    def stop(self, grace_seconds: float) -> None:
        """Closes admission (unless done), drains the admitted calls (up to
        ``grace_seconds``; the rest are cancelled), stops the loop."""
        deadline = time.monotonic() + max(0.0, grace_seconds)
        if grace_seconds > 0:
            self.close_admission(deadline)
        self._admission.closed = True
        remaining = max(0.0, deadline - time.monotonic())
        if self._thread.is_alive():
            stopping = asyncio.run_coroutine_threadsafe(self.server.stop(remaining),
                                                        self.loop)
            try:
                stopping.result(remaining + 5.0)
            except (concurrent.futures.TimeoutError, RuntimeError) as error:
                LOG.warning("tfdssm serve: the gRPC server did not stop in time (%s)",
                            error)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10.0)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


def start_aio_grpc(
    manager: ModelManager,
    batcher: batching.Batcher,
    host: str = "127.0.0.1",
    port: int = 8500,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_batch_size: int | None = predict.DEFAULT_MAX_BATCH_SIZE,
    metrics: Metrics | None = None,
) -> tuple[AioGrpcServer, int]:
    """Starts the asyncio gRPC server in a thread of its own; returns it and the
    bound port (``port=0``: any free). Arguments as
    :func:`tfdssm.serving.grpc_server.start_grpc`'s; ``batcher`` runs every
    ``Predict``.

    Raises:
        ServingError: the address cannot be bound.
    """
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()
        # Stopped: finish what the stop left (cancelled calls' cleanup).
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for pending_task in pending:
            pending_task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    thread = threading.Thread(target=run, name="tfdssm-grpc-aio", daemon=True)
    thread.start()
    admission = _Admission()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=[admission],
                                 options=server_options(max_message_bytes))
        bound = add_services_and_bind(
            server, AioPredictionService(manager, batcher, _Waker(loop),
                                         max_batch_size, int(max_message_bytes),
                                         metrics),
            AioModelService(manager), host, port)
        await server.start()
        return server, bound

    try:
        server, bound = asyncio.run_coroutine_threadsafe(start(), loop).result(
            _START_SECONDS)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)
        raise
    return AioGrpcServer(server, bound, host, admission, loop, thread), bound
