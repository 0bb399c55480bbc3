"""TF Serving's gRPC services over a :class:`~tfdssm.serving.models.ModelManager`.

Implements ``tensorflow.serving.PredictionService`` (``Predict``,
``GetModelMetadata``) and ``tensorflow.serving.ModelService``
(``GetModelStatus``) with the official ``tensorflow-serving-api`` protos, so
``prediction_service_pb2_grpc.PredictionServiceStub`` and
``model_service_pb2_grpc.ModelServiceStub`` work unchanged. ``Classify``,
``Regress``, ``MultiInference`` and ``HandleReloadConfigRequest`` answer
``UNIMPLEMENTED``.

Stopping (:meth:`GrpcServer.stop`) loses no call the server has received.
grpcio's ``Server.stop(grace)`` alone would: gRPC core keeps the calls that
arrived but that grpcio's single serving thread has not taken yet (it asks core
for one call at a time, and needs the GIL and its server lock for each, so under
load it falls behind), and on shutdown core cancels all of them (the clients get
``CANCELLED``, whatever the grace period). Only the calls grpcio has already
taken (running, or waiting for a worker thread) are drained. So the stop first
sends the server a call of its own (a *marker*) on a fresh connection and waits
until grpcio takes it: core hands calls over in the order they arrived, so by
then every call received before the stop has been taken. Calls taken after the
marker are refused with ``UNAVAILABLE`` ("shutting down"; safe to retry: they
never ran), and grpcio's stop then drains the calls taken before it (later
calls fail on the client's side with ``UNAVAILABLE``: the port is closed). A
call reaching gRPC core in the instant between the marker and core's shutdown
can still be cancelled by core; it never ran either.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfdssm.errors import ServingError
from tfdssm.serving import predict
from tfdssm.serving.metrics import Metrics
from tfdssm.serving.models import ModelManager

LOG = logging.getLogger("tfdssm.serving")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SHUTTING_DOWN = ("tfdssm serve is shutting down and accepts no new requests; the "
                 "request was not run: retry it (another replica, or after the "
                 "restart).")
MARKER_METHOD = "/tfdssm.serving.Shutdown/Marker"
_MARKER_KEY = "tfdssm-shutdown-marker"


def requested_version(model_spec: Any) -> int | None:
    """The version a ``ModelSpec`` asks for (``None`` = newest).

    Raises:
        ServingError: a version label (tfdssm serve configures none).
    """
    if model_spec.HasField("version"):
        return int(model_spec.version.value)
    if model_spec.version_label:
        raise ServingError(
            f"Unrecognized servable version label: {model_spec.version_label}. "
            "tfdssm serve has no version labels; ask for a version number or none "
            "(the newest).")
    return None


def status_code(error: ServingError) -> grpc.StatusCode:
    """The gRPC status of a ``ServingError`` (``UNKNOWN`` for a code gRPC lacks)."""
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)


def _abort(context: grpc.ServicerContext, error: ServingError) -> None:
    context.abort(status_code(error), str(error))


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``Predict`` and ``GetModelMetadata`` (see the module docstring)."""

    def __init__(
        self,
        manager: ModelManager,
        max_batch_size: int | None = predict.DEFAULT_MAX_BATCH_SIZE,
        max_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self.manager = manager
        self.max_batch_size = max_batch_size
        self.max_bytes = max_bytes  # the inputs' size once expanded
        self.metrics = metrics or Metrics()

    def Predict(self, request: predict_pb2.PredictRequest,  # noqa: N802
                context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        start = time.perf_counter()
        spec = request.model_spec
        signature = spec.signature_name or predict.DEFAULT_SIGNATURE
        version: int | str = spec.version.value if spec.HasField("version") else ""
        status = "OK"
        try:
            servable = self.manager.get(spec.name, requested_version(spec))
            version = servable.version
            inputs = servable.tensors(signature, request.inputs, self.max_bytes,
                                      self.max_batch_size, as_numpy=True)
            outputs = servable.predict(signature, inputs, list(request.output_filter),
                                       self.max_batch_size)
            return self._response(servable, signature, outputs)
        except ServingError as error:
            status = status_code(error).name
            _abort(context, error)
        except Exception as error:  # noqa: BLE001 - answer, log, keep serving
            LOG.exception("tfdssm serve: internal error in Predict")
            status = "INTERNAL"
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")
        finally:
            self.metrics.request(spec.name, version, signature, status, "GRPC",
                                 (time.perf_counter() - start) * 1e6)

    @staticmethod
    def _response(servable: Any, signature: str,
                  outputs: dict) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for name, array in outputs.items():
            predict.tensor_to_proto(array, response.outputs[name])
        return response

    def GetModelMetadata(  # noqa: N802
        self, request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.ServicerContext,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        try:
            servable = self._metadata_servable(request)
        except ServingError as error:
            _abort(context, error)
        return metadata_response(servable)

    def _metadata_servable(self, request: Any) -> Any:
        """The servable a ``GetModelMetadataRequest`` asks about.

        Raises:
            ServingError: no or unknown ``metadata_field``; unknown model or
                version.
        """
        fields = list(request.metadata_field)
        if not fields:
            raise ServingError("GetModelMetadataRequest must specify at least one "
                               'metadata_field (use "signature_def").')
        unknown = [f for f in fields if f != "signature_def"]
        if unknown:
            raise ServingError(f"Metadata field {unknown[0]} is not supported; the "
                               'only field is "signature_def".')
        return self.manager.get(request.model_spec.name,
                                requested_version(request.model_spec))

    UNIMPLEMENTED = ("tfdssm serve implements Predict and GetModelMetadata only; "
                     "use Predict.")

    def _unimplemented(self, request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, self.UNIMPLEMENTED)

    Classify = Regress = MultiInference = _unimplemented


def metadata_response(servable: Any) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """``GetModelMetadataResponse`` with the ``signature_def`` map, as TF Serving."""
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for key, signature_def in servable.signature_defs.items():
        signatures.signature_def[key].CopyFrom(signature_def)
    response.metadata["signature_def"].Pack(signatures)
    return response


def status_response(
    manager: ModelManager, name: str, version: int | None
) -> get_model_status_pb2.GetModelStatusResponse:
    """``GetModelStatusResponse`` (raises ``ServingError`` NOT_FOUND)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state, error in manager.status(name, version):
        entry = response.model_version_status.add()
        entry.version = number
        entry.state = state
        entry.status.SetInParent()  # TF Serving always sends a status (OK)
        if error:
            entry.status.error_code = 9  # FAILED_PRECONDITION
            entry.status.error_message = error
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """``GetModelStatus`` (``HandleReloadConfigRequest`` is UNIMPLEMENTED)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            return status_response(self.manager, request.model_spec.name,
                                   requested_version(request.model_spec))
        except ServingError as error:
            _abort(context, error)

    RELOAD_UNIMPLEMENTED = ("tfdssm serve reads models.config at start; restart "
                            "it to change the model list (new versions are picked "
                            "up live).")

    def HandleReloadConfigRequest(self, request: Any, context: Any) -> None:  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, self.RELOAD_UNIMPLEMENTED)


def listen_address(host: str, port: int) -> str:
    """``host:port`` to bind (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_address(host: str, port: int) -> str:
    """Where this process reaches a server bound to ``host``: a wildcard
    host is reached on loopback."""
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return listen_address(host, port)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: the request size limit, any
    response size, and no port sharing (a second server on the port fails)."""
    return [("grpc.max_receive_message_length", int(max_message_bytes)),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0)]


class Admission:
    """The stop's cut-off (see the module docstring): admits calls until the
    marker call is taken, then refuses them. Both gRPC servers' interceptors
    ask it about each call as they take it.
    """

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.draining = False  # the stop has begun: watch for the marker
        self.closed = False  # the marker has been taken (or the wait gave up)
        self.wake = threading.Event()  # the marker: taken, or failed
        self.marker_taken = False  # what close() found

    def close(self, local: str, deadline: float) -> bool:
        """Closes admission, once: sends the marker call to the server at
        ``local`` and waits (until ``deadline``, a ``time.monotonic()`` value)
        for the server to take it; admission is closed either way.

        Returns:
            Whether the marker was taken (as found by the first call).
        """
        if self.closed:
            return self.marker_taken
        self.draining = True
        channel = grpc.insecure_channel(local, options=[("grpc.enable_http_proxy", 0)])
        try:
            marker = channel.unary_unary(MARKER_METHOD).future(
                b"", timeout=max(0.1, deadline - time.monotonic()),
                metadata=((_MARKER_KEY, self.token),))
            marker.add_done_callback(lambda _: self.wake.set())
            self.wake.wait(max(0.0, deadline - time.monotonic()))
        finally:
            channel.close()
        self.marker_taken = self.closed
        self.closed = True
        if not self.marker_taken:
            LOG.warning("tfdssm serve: could not confirm that gRPC calls received "
                        "before the stop were all taken (%s); some may be "
                        "cancelled", "grace period over" if time.monotonic() >=
                        deadline else "the marker call failed")
        return self.marker_taken

    def verdict(self, details: Any) -> str:
        """``"admit"``, ``"refuse"`` (``UNAVAILABLE``), or ``"marker"`` (the
        stop's own call, taken now: answer it ``UNIMPLEMENTED`` at once)."""
        if self.closed:
            return "refuse"
        if self.draining and details.method == MARKER_METHOD and any(
                key == _MARKER_KEY and value == self.token
                for key, value in details.invocation_metadata or ()):
            self.closed = True
            self.wake.set()
            return "marker"
        return "admit"


class _Admission(Admission, grpc.ServerInterceptor):
    """:class:`Admission` as the thread-pool server's interceptor.

    Runs in grpcio's serving thread as it takes each call, so in the order the
    calls reached the server (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        # Refusals do not queue behind the requests being drained.
        self.refusals = futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tfdssm-grpc-refuse")

        def refuse(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

        refuse.experimental_thread_pool = self.refusals  # grpcio's per-method pool
        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        verdict = self.verdict(details)
        if verdict == "admit":
            return continuation(details)
        return self._refuse if verdict == "refuse" else None  # None: UNIMPLEMENTED


class GenericHandlersOnly:
    """Adds a servicer's methods as generic handlers only.

    Newer generated ``*_pb2_grpc`` modules also register each method with gRPC
    core; a registered method has its own queue in core, so the marker would no
    longer follow the calls received before it. Generic handlers share one.
    """

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),))


class GrpcServer:
    """A running gRPC server (see :func:`start_grpc`) and its graceful stop.

    Attributes:
        server: The ``grpc.Server``.
        port: The bound port.
    """

    def __init__(self, server: grpc.Server, port: int, host: str,
                 admission: _Admission, workers: futures.ThreadPoolExecutor) -> None:
        self.server, self.port = server, port
        self._admission, self._workers = admission, workers
        self._local = local_address(host, port)

    def close_admission(self, deadline: float) -> bool:
        """The cut-off: calls received from now on are refused ``UNAVAILABLE``.

        Sends the marker call and waits (until ``deadline``, a
        ``time.monotonic()`` value) for grpcio to take it, i.e. to have taken
        every call received before it; those run as usual.

        Returns:
            Whether the marker was taken. If not (it could not be sent, or the
            deadline passed), admission closes anyway; calls still queued in
            gRPC core may then be cancelled by :meth:`stop`.
        """
        return self._admission.close(self._local, deadline)

    def stop(self, grace_seconds: float) -> None:
        """Closes admission (unless done), then drains: returns when every
        admitted call has finished, or ``grace_seconds`` (counted from this
        call) have passed and the remaining ones were cancelled."""
        deadline = time.monotonic() + max(0.0, grace_seconds)
        if grace_seconds > 0:
            self.close_admission(deadline)
        self._admission.closed = True
        remaining = max(0.0, deadline - time.monotonic())
        self.server.stop(remaining).wait(remaining + 1)
        self._workers.shutdown(wait=False)
        self._admission.refusals.shutdown(wait=False)


def add_services_and_bind(server: Any, prediction: Any, model: Any, host: str,
                          port: int) -> int:
    """Adds the two services to a (thread-pool or asyncio) gRPC server, as
    generic handlers only, and binds it; returns the bound port.

    Raises:
        ServingError: the address cannot be bound.
    """
    handlers = GenericHandlersOnly(server)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        prediction, handlers)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(model, handlers)
    address = listen_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:
        bound, reason = 0, str(error)
    else:
        reason = "address in use?"
    if not bound:
        raise ServingError(f"cannot listen for gRPC on {address} ({reason}); choose "
                           "another --grpc-port or stop the process using it.",
                           "UNAVAILABLE")
    return bound


def start_grpc(
    manager: ModelManager,
    host: str = "127.0.0.1",
    port: int = 8500,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    workers: int = 8,
    max_batch_size: int | None = predict.DEFAULT_MAX_BATCH_SIZE,
    metrics: Metrics | None = None,
) -> tuple[GrpcServer, int]:
    """Starts a gRPC server; returns it and the bound port (``port=0``: any free).

    ``max_message_bytes`` limits a request's size and the size its inputs
    declare once expanded (checked before anything is expanded, see
    :func:`tfdssm.serving.predict.tensors_from_protos`); ``max_batch_size``
    its rows; ``metrics`` counts the calls. Each Predict runs alone (batched
    serving runs on :func:`tfdssm.serving.aio_server.start_aio_grpc`).

    Raises:
        ServingError: the address cannot be bound.
    """
    pool = futures.ThreadPoolExecutor(max_workers=workers,
                                      thread_name_prefix="tfdssm-grpc")
    admission = _Admission()
    server = grpc.server(
        pool, interceptors=[admission],
        options=server_options(max_message_bytes))
    bound = add_services_and_bind(
        server, PredictionService(manager, max_batch_size, int(max_message_bytes),
                                  metrics), ModelService(manager), host, port)
    server.start()
    return GrpcServer(server, bound, host, admission, pool), bound
