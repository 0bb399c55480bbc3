"""A small gRPC client for tfdssm exports served by TF Serving or ``tfdssm serve``.

It wraps the official ``tensorflow-serving-api`` stubs; inputs are converted to
the dtypes the model's signature declares (read once with
``GetModelMetadata``), so ``{"age": [30]}`` becomes float32 when the model wants
float32.

Example (``tfdssm serve --export-dir saved_models/movielens`` running)::

    from tfdssm.client import Client
    with Client("localhost:8500") as client:
        ids, scores = client.top_k({"user_id": ["42"], "age": [30], "gender": ["M"],
                                    "occupation": ["writer"], "zip_prefix": ["94"]},
                                   k=10, exclude=["50", "181"],
                                   allow=["genres=Comedy"], deny=["genres=Horror"])
        vectors = client.embed({"title": ["Toy Story (1995)"], ...}, side="candidate")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfdssm.errors import DataError, ServingError

RESERVED = ("k", "exclude", "allow", "deny")


_HTTP1_SIGNS = ("Failed parsing HTTP/2", "Expected SETTINGS frame",
                "http1.x server")


def rest_port_hint(target: str, details: str) -> str:
    """What to say when a gRPC call reached an HTTP/1.1 (REST) port.

    >>> rest_port_hint("localhost:8501", "Failed parsing HTTP/2 (...)")[:58]
    'this looks like the REST port (HTTP/1.1); gRPC is on port '
    >>> rest_port_hint("localhost:8500", "Connection refused")
    ''
    """
    if not any(sign in details for sign in _HTTP1_SIGNS):
        return ""
    host, _, port = target.rpartition(":")
    grpc_port = ("8500 with the default ports (TF Serving's and `tfdssm serve`'s), "
                 f"i.e. --server {host}:8500" if port == "8501" else
                 "--grpc-port of `tfdssm serve` (TF Serving: --port; default 8500)")
    return (f"this looks like the REST port (HTTP/1.1); gRPC is on port "
            f"{grpc_port}. REST clients use http://{target}/v1/models/...")


class Client:
    """Talks to one model server.

    Args:
        target: ``host:port`` of the gRPC endpoint (TF Serving's 8500).
        timeout: Seconds per call.
        max_message_bytes: Largest message sent or received.
    """

    def __init__(self, target: str, timeout: float = 10.0,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.target = target
        self.timeout = float(timeout)
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = grpc.insecure_channel(target, options=options)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(
            self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._signatures: dict[str, Any] = {}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            code = error.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                details = error.details() or ""
                hint = rest_port_hint(self.target, details) or (
                    "is `tfdssm serve` (or TF Serving) running there?")
                raise ServingError(
                    f"cannot reach a model server at {self.target} ({code.name}: "
                    f"{details}); {hint}", code.name) from None
            raise ServingError(f"the server at {self.target} answered {code.name}: "
                               f"{error.details()}", code.name) from None

    def signatures(self, model: str) -> dict[str, Any]:
        """``{signature key: SignatureDef}`` of a model (cached)."""
        if model not in self._signatures:
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                metadata_field=["signature_def"])
            request.model_spec.name = model
            response = self._call(self.prediction.GetModelMetadata, request)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signatures)
            self._signatures[model] = dict(signatures.signature_def)
        return self._signatures[model]

    def input_dtypes(self, model: str, signature: str) -> dict[str, tf.DType]:
        """``{input name: dtype}`` of one signature."""
        signatures = self.signatures(model)
        if signature not in signatures:
            known = sorted(s for s in signatures if not s.startswith("__"))
            raise ServingError(f"model {model!r} has no signature {signature!r}; it "
                               f"has {known}.", "FAILED_PRECONDITION")
        inputs = signatures[signature].inputs
        return {n: tf.as_dtype(i.dtype) for n, i in inputs.items()}

    def status(self, model: str) -> list[tuple[int, str]]:
        """``[(version, state name)]`` from ``GetModelStatus``."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        response = self._call(self.models.GetModelStatus, request)
        names = get_model_status_pb2.ModelVersionStatus.State.Name
        return [(int(s.version), names(s.state)) for s in response.model_version_status]

    def predict(
        self,
        model: str,
        inputs: Mapping[str, Any],
        signature: str = "serving_default",
        version: int | None = None,
    ) -> dict[str, np.ndarray]:
        """One ``Predict`` call; inputs converted to the signature's dtypes.

        Raises:
            DataError: an input is missing, unexpected or not convertible.
            ServingError: the server rejected the request (its code and message).
        """
        dtypes = self.input_dtypes(model, signature)
        missing = sorted(set(dtypes) - set(inputs))
        extra = sorted(set(inputs) - set(dtypes))
        if missing or extra:
            raise DataError(f"signature {signature!r} of model {model!r} needs inputs "
                            f"{sorted(dtypes)}; missing {missing}, unexpected {extra}.")
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = int(version)
        for name, dtype in dtypes.items():
            request.inputs[name].CopyFrom(_tensor_proto(inputs[name], dtype, name))
        response = self._call(self.prediction.Predict, request)
        return {name: tf.make_ndarray(p) for name, p in response.outputs.items()}

    def top_k(
        self,
        features: Mapping[str, Sequence[Any]],
        k: int = 10,
        exclude: Sequence[str] | Sequence[Sequence[str]] | None = None,
        model: str = "retrieval",
        allow: Sequence[str] | Sequence[Sequence[str]] | None = None,
        deny: Sequence[str] | Sequence[Sequence[str]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` candidate ids and scores from a retrieval model.

        Args:
            features: Query column -> one value per query row.
            k: Results per row (1 to the export's ``max_k``).
            exclude: Ids to skip: one list for every row, or one list per row.
            model: ``retrieval`` (ScaNN) or ``retrieval_brute_force``.
            allow: ``namespace=token`` items (e.g. ``"genres=Comedy"``), one list
                for every row or one per row: only candidates with one of the
                allowed tokens of each namespace named (``top_k_filter``).
            deny: ``namespace=token`` items to leave out, likewise.

        Returns:
            ``ids`` (str ``[batch, k]``) and ``scores`` (float32 ``[batch, k]``);
            missing results are ``""`` with score ``-inf``.
        """
        batch = _batch_size(features)
        inputs: dict[str, Any] = {**features, "k": np.full([batch], k, np.int32)}
        signature = "top_k"
        if exclude is not None and len(exclude):
            inputs["exclude"] = _padded_rows(exclude, batch, "exclude")
            signature = "top_k_exclude"
        if (allow is not None and len(allow)) or (deny is not None and len(deny)):
            for name, items in (("allow", allow), ("deny", deny)):
                inputs[name] = _padded_rows(items, batch, name)
            inputs.setdefault("exclude", [[""]] * batch)
            signature = "top_k_filter"
        out = self.predict(model, inputs, signature)
        ids = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(out["ids"])
        return ids.astype(str), out["scores"].astype(np.float32)

    def embed(
        self,
        features: Mapping[str, Sequence[Any]],
        side: str = "query",
        model: str = "towers",
    ) -> np.ndarray:
        """Embeddings float32 ``[batch, dim]`` from the towers model.

        Args:
            features: The side's columns -> one value per row.
            side: ``query`` or ``candidate`` (the towers signature).
            model: The towers model name.
        """
        if side not in ("query", "candidate"):
            raise DataError(f"side must be 'query' or 'candidate', received {side!r}.")
        return self.predict(model, features, side)["embedding"].astype(np.float32)

    def query_inputs(self, model: str = "retrieval") -> dict[str, tf.DType]:
        """The query feature inputs of a retrieval model (without ``k``/``exclude``)."""
        return {n: d for n, d in self.input_dtypes(model, "top_k").items()
                if n not in RESERVED}

    def query_features(
        self,
        features: Mapping[str, list[str]],
        texts: Sequence[str] = (),
        model: str = "retrieval",
    ) -> dict[str, list[str]]:
        """Query features for :meth:`top_k` from ``NAME=VALUE`` pairs and texts.

        Args:
            features: Column -> values (e.g. from ``--feature`` flags).
            texts: Values of the model's only query input (positional texts).
            model: The retrieval model.

        Returns:
            Column -> values, in the order given.

        Raises:
            DataError: texts for a multi-input model, missing or unknown columns,
                or columns with different numbers of values.
        """
        names = list(self.query_inputs(model))
        features = {k: list(v) for k, v in features.items()}
        if texts:
            if len(names) != 1:
                raise DataError("positional query text needs a model with exactly one "
                                f"query input; {model!r} reads {names}. Use --feature "
                                "NAME=VALUE.")
            features[names[0]] = list(texts)
        missing = [n for n in names if n not in features]
        unknown = sorted(set(features) - set(names))
        if missing or unknown:
            raise DataError(f"model {model!r} reads the query features {names}; "
                            f"missing {missing}, unknown {unknown}. Pass --feature "
                            "NAME=VALUE for each.")
        _batch_size(features)
        return features


def _padded_rows(
    items: Sequence[str] | Sequence[Sequence[str]] | None, batch: int, name: str
) -> list[list[str]]:
    """``[batch, width]`` strings padded with ``""`` from one list for every row
    or one list per row (at least one column)."""
    if items is None or not len(items):
        rows: list[list[str]] = [[] for _ in range(batch)]
    elif isinstance(items[0], str):
        rows = [list(items) for _ in range(batch)]
    else:
        rows = [list(r) for r in items]
    if len(rows) != batch:
        raise DataError(f"{name} has {len(rows)} rows for {batch} query rows; "
                        "give one list per row or a single list for all.")
    width = max(1, max(len(r) for r in rows))
    return [r + [""] * (width - len(r)) for r in rows]


def _batch_size(features: Mapping[str, Sequence[Any]]) -> int:
    sizes = {name: len(values) for name, values in features.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise DataError(f"give every feature the same number of values (one per "
                        f"query row); received {sizes}.")
    return next(iter(sizes.values()))


def _tensor_proto(values: Any, dtype: tf.DType, name: str) -> Any:
    try:
        if dtype == tf.string:
            array = np.asarray(values, dtype=object)
            array = np.vectorize(
                lambda v: v if isinstance(v, bytes) else str(v).encode("utf-8"),
                otypes=[object])(array) if array.size else array
        else:
            array = np.asarray(values, dtype=dtype.as_numpy_dtype)
    except (TypeError, ValueError) as error:
        raise DataError(f"input {name!r} must be {dtype.name}: {error}") from None
    return tf.make_tensor_proto(array, dtype)


__all__ = ["Client"]
