"""TF Serving warm-up records: ``assets.extra/tf_serving_warmup_requests``.

TF Serving replays this file (a TFRecord of ``tensorflow.serving.PredictionLog``
protos) when it loads a version, before the version receives traffic, so the
first real request does not pay for graph optimisation and table/index set-up.
``tfdssm serve`` replays it the same way. Each exported SavedModel gets one
request per signature, built from example feature values.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_RECORDS = 1000  # TF Serving's limit.


def example_row(tower: Any) -> dict[str, Any]:
    """One plausible value per input column of a tower (for warm-up requests).

    Each served feature gives :meth:`tfdssm.features.Feature.example_value`:
    text a short phrase, categorical features their first vocabulary entry,
    numeric features their training mean, histories an empty one. Training-only
    features (served as a constant, e.g. example age) are left out.
    """
    return {column: feature.example_value()
            for feature in tower.features for column in feature.served_columns}


def predict_request(
    model_name: str,
    signature_name: str,
    inputs: Mapping[str, Any],
    dtypes: Mapping[str, tf.DType] | None = None,
) -> predict_pb2.PredictRequest:
    """A ``PredictRequest`` with typed tensors.

    Args:
        model_name: ``model_spec.name``.
        signature_name: ``model_spec.signature_name``.
        inputs: Input name -> array-like (text as ``str``).
        dtypes: Input name -> dtype to convert to (default: the value's own,
            strings as ``tf.string``).

    >>> request = predict_request("towers", "query", {"query": ["hello"]})
    >>> request.inputs["query"].string_val
    [b'hello']
    """
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind in "UO":
            array = array.astype(object)
        if dtypes and name in dtypes:
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtypes[name]))
        elif array.dtype == object:
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array, tf.string))
        else:
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    return request


def write_warmup(
    saved_model_dir: str | os.PathLike, requests: Sequence[predict_pb2.PredictRequest]
) -> pathlib.Path:
    """Writes ``requests`` as PredictionLogs into ``saved_model_dir/assets.extra``."""
    directory = pathlib.Path(saved_model_dir) / WARMUP_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WARMUP_FILE
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in list(requests)[:MAX_RECORDS]:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup(saved_model_dir: str | os.PathLike) -> list[predict_pb2.PredictRequest]:
    """The predict requests of a SavedModel's warm-up file (``[]`` if none)."""
    path = pathlib.Path(saved_model_dir) / WARMUP_DIR / WARMUP_FILE
    if not path.is_file():
        return []
    out = []
    for record in tf.data.TFRecordDataset(str(path)).take(MAX_RECORDS):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if log.HasField("predict_log"):
            out.append(log.predict_log.request)
    return out


def towers_requests(model: Any, candidate_row: Mapping[str, Any] | None = None,
                    model_name: str = "towers") -> list[predict_pb2.PredictRequest]:
    """Warm-up requests for the towers SavedModel (``query`` and ``candidate``)."""
    query = {k: [v] for k, v in example_row(model.query_tower).items()}
    candidate = dict(candidate_row or example_row(model.candidate_tower))
    candidate = {k: [candidate[k]] for k in model.candidate_tower.feature_names}
    return [predict_request(model_name, "query", query),
            predict_request(model_name, "candidate", candidate),
            predict_request(model_name, "serving_default", query)]


def retrieval_requests(
    query_row: Mapping[str, Any], example_id: str, max_k: int, model_name: str
) -> list[predict_pb2.PredictRequest]:
    """Warm-up requests for a retrieval SavedModel (every signature; the
    ``top_k_filter`` one with an empty filter)."""
    query = {k: [v] for k, v in query_row.items()}
    k = np.asarray([min(10, max_k)], np.int32)
    return [
        predict_request(model_name, "serving_default", query),
        predict_request(model_name, "top_k", {**query, "k": k}),
        predict_request(model_name, "top_k_exclude",
                        {**query, "k": k, "exclude": [[example_id]]}),
        predict_request(model_name, "top_k_filter",
                        {**query, "k": k, "exclude": [[example_id]], "allow": [[""]],
                         "deny": [[""]]}),
    ]


__all__ = [
    "WARMUP_DIR",
    "WARMUP_FILE",
    "example_row",
    "predict_request",
    "read_warmup",
    "retrieval_requests",
    "towers_requests",
    "write_warmup",
]
