"""TF Serving's gRPC services over a :class:`~tfdssm.serving.models.ModelManager`.

Implements ``tensorflow.serving.PredictionService`` (``Predict``,
``GetModelMetadata``) and ``tensorflow.serving.ModelService``
(``GetModelStatus``) with the official ``tensorflow-serving-api`` protos, so
``prediction_service_pb2_grpc.PredictionServiceStub`` and
``model_service_pb2_grpc.ModelServiceStub`` work unchanged. ``Classify``,
``Regress``, ``MultiInference`` and ``HandleReloadConfigRequest`` answer
``UNIMPLEMENTED``.
"""

from __future__ import annotations

import logging
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
from tfdssm.serving.models import ModelManager

LOG = logging.getLogger("tfdssm.serving")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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


def _abort(context: grpc.ServicerContext, error: ServingError) -> None:
    context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN),
                  str(error))


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``Predict`` and ``GetModelMetadata`` (see the module docstring)."""

    def __init__(
        self,
        manager: ModelManager,
        max_batch_size: int | None = predict.DEFAULT_MAX_BATCH_SIZE,
        max_elements: int | None = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.manager = manager
        self.max_batch_size = max_batch_size
        self.max_elements = max_elements

    def Predict(self, request: predict_pb2.PredictRequest,  # noqa: N802
                context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        try:
            spec = request.model_spec
            servable = self.manager.get(spec.name, requested_version(spec))
            signature = spec.signature_name or predict.DEFAULT_SIGNATURE
            inputs = {name: predict.tensor_from_proto(name, proto, self.max_elements)
                      for name, proto in request.inputs.items()}
            outputs = servable.predict(signature, inputs, list(request.output_filter),
                                       self.max_batch_size)
        except ServingError as error:
            _abort(context, error)
        except Exception as error:  # noqa: BLE001 - answer, log, keep serving
            LOG.exception("tfdssm serve: internal error in Predict")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for name, array in outputs.items():
            response.outputs[name].CopyFrom(predict.tensor_to_proto(array))
        return response

    def GetModelMetadata(  # noqa: N802
        self, request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.ServicerContext,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        try:
            fields = list(request.metadata_field)
            if not fields:
                raise ServingError("GetModelMetadataRequest must specify at least one "
                                   'metadata_field (use "signature_def").')
            unknown = [f for f in fields if f != "signature_def"]
            if unknown:
                raise ServingError(f"Metadata field {unknown[0]} is not supported; the "
                                   'only field is "signature_def".')
            servable = self.manager.get(request.model_spec.name,
                                        requested_version(request.model_spec))
        except ServingError as error:
            _abort(context, error)
        return metadata_response(servable)

    def _unimplemented(self, request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "tfdssm serve implements Predict and GetModelMetadata only; "
                      "use Predict.")

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

    def HandleReloadConfigRequest(self, request: Any, context: Any) -> None:  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "tfdssm serve reads models.config at start; restart it to "
                      "change the model list (new versions are picked up live).")


def start_grpc(
    manager: ModelManager,
    host: str = "127.0.0.1",
    port: int = 8500,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    workers: int = 8,
    max_batch_size: int | None = predict.DEFAULT_MAX_BATCH_SIZE,
) -> tuple[grpc.Server, int]:
    """Starts a gRPC server; returns it and the bound port (``port=0``: any free).

    ``max_message_bytes`` limits a request's size and each input's declared
    number of elements; ``max_batch_size`` its rows.

    Raises:
        ServingError: the address cannot be bound.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers,
                                   thread_name_prefix="tfdssm-grpc"),
        options=[("grpc.max_receive_message_length", int(max_message_bytes)),
                 ("grpc.max_send_message_length", -1),
                 ("grpc.so_reuseport", 0)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, max_batch_size, int(max_message_bytes)), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(manager), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
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
    server.start()
    return server, bound
