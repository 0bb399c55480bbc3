"""Tests for tfdssm serve: TF Serving's gRPC and REST APIs over loopback.

Uses the official tensorflow-serving-api stubs against an in-process server on
free ports (plus one `tfdssm serve` subprocess stopped with SIGTERM).
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import scann  # noqa: F401 - registers ScaNN's ops for loading `retrieval` in-process
import tensorflow as tf
from serving_helpers import running_server, trained_export, user_features
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfdssm import cli
from tfdssm.errors import ConfigError, ExportError, ServingError
from tfdssm.export import serving_config as config
from tfdssm.serving import json_codec, predict
from tfdssm.serving.predict import InputSpec
from tfdssm.serving.server import Server

MAX_BYTES = 256 * 1024
MOVIE_COLUMNS = ("movie_id", "title", "genres", "year")


@pytest.fixture(scope="module")
def exported():
    export_dir, prepared, _ = trained_export()
    return pathlib.Path(export_dir), prepared


@pytest.fixture(scope="module")
def server(exported):
    with running_server(exported[0], max_request_bytes=MAX_BYTES) as running:
        yield running


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel))
    channel.close()


@pytest.fixture(scope="module")
def direct(exported):
    return {name: tf.saved_model.load(str(exported[0] / name / "1"))
            for name in ("towers", "retrieval", "retrieval_brute_force")}


def _typed(features: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32 if k == "age" else object)
            for k, v in features.items()}


def _request(model: str, signature: str, inputs: dict, version: int | None = None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for name, value in inputs.items():
        array = np.asarray(value)
        dtype = tf.string if array.dtype.kind in "OU" else None
        request.inputs[name].CopyFrom(tf.make_tensor_proto(
            array.astype(object) if dtype else array, dtype))
    return request


def _movies(prepared, count: int) -> dict[str, np.ndarray]:
    head = prepared.corpus.head(count)
    return {c: np.asarray(head[c].astype(str).tolist(), object) for c in MOVIE_COLUMNS}


def _call_direct(loaded, signature: str, inputs: dict) -> dict[str, np.ndarray]:
    function = loaded.signatures[signature]
    types = function.structured_input_signature[1]
    out = function(**{k: tf.constant(v, types[k].dtype) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def _http(server, method: str, path: str, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (
        None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}",
                                     data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# --------------------------------------------------------------------------- #
# gRPC Predict with the official stubs
# --------------------------------------------------------------------------- #


def test_predict_towers_equals_the_savedmodel(stubs, direct, exported):
    prediction, _ = stubs
    _, prepared = exported
    users, movies = _typed(user_features(prepared, 4)), _movies(prepared, 5)
    for signature, inputs in [("query", users), ("candidate", movies),
                              ("", users)]:
        response = prediction.Predict(_request("towers", signature, inputs), timeout=30)
        assert response.model_spec.name == "towers"
        assert response.model_spec.version.value == 1
        assert response.model_spec.signature_name == (signature or "serving_default")
        got = tf.make_ndarray(response.outputs["embedding"])
        assert list(response.outputs["embedding"].float_val)  # typed fields, like TFS
        want = _call_direct(direct["towers"], signature or "serving_default", inputs)
        np.testing.assert_allclose(got, want["embedding"], atol=1e-6)
        assert got.shape == (len(next(iter(inputs.values()))), 16)


@pytest.mark.parametrize("model", ["retrieval", "retrieval_brute_force"])
def test_predict_retrieval_models(stubs, direct, exported, model):
    prediction, _ = stubs
    users = _typed(user_features(exported[1], 3))
    calls = [("serving_default", users),
             ("top_k", {**users, "k": np.array([5, 1, 10], np.int32)}),
             ("top_k_exclude", {**users, "k": np.array([5, 5, 5], np.int32),
                                "exclude": np.array([["1", "2"], ["", ""], ["3", ""]],
                                                    object)})]
    for signature, inputs in calls:
        response = prediction.Predict(_request(model, signature, inputs), timeout=30)
        want = _call_direct(direct[model], signature, inputs)
        ids = tf.make_ndarray(response.outputs["ids"])
        np.testing.assert_array_equal(ids, want["ids"])
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]),
                                   want["scores"], atol=1e-6)
    assert ids.shape == (3, 5) and not {b"1", b"2"} & set(ids[0])


def test_output_filter(stubs, exported):
    prediction, _ = stubs
    request = _request("retrieval", "", _typed(user_features(exported[1], 1)))
    request.output_filter.append("ids")
    response = prediction.Predict(request, timeout=30)
    assert list(response.outputs) == ["ids"]
    assert tf.make_ndarray(response.outputs["ids"]).shape == (1, 50)


def test_metadata_and_status_over_grpc(stubs):
    prediction, models = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        metadata_field=["signature_def"])
    request.model_spec.name = "retrieval"
    response = prediction.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    top_k = signatures.signature_def["top_k_exclude"]
    assert set(top_k.inputs) == {"user_id", "age", "gender", "occupation",
                                 "zip_prefix", "k", "exclude"}
    assert top_k.inputs["k"].dtype == tf.int32.as_datatype_enum
    assert [d.size for d in top_k.inputs["exclude"].tensor_shape.dim] == [-1, -1]
    assert top_k.outputs["ids"].dtype == tf.string.as_datatype_enum
    default = signatures.signature_def["serving_default"]
    assert [d.size for d in default.outputs["scores"].tensor_shape.dim] == [-1, 50]
    status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
        model_spec={"name": "retrieval_brute_force"}), timeout=30)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]


# --------------------------------------------------------------------------- #
# REST
# --------------------------------------------------------------------------- #


def test_rest_predict_row_and_columnar_formats(server, exported, direct):
    users = user_features(exported[1], 2)
    rows = [{**{k: v[i] for k, v in users.items()}, "k": 3} for i in range(2)]
    status, body = _http(server, "POST", "/v1/models/retrieval:predict",
                         {"signature_name": "top_k", "instances": rows})
    assert status == 200, body
    want = _call_direct(direct["retrieval"], "top_k",
                        {**_typed(users), "k": np.array([3, 3], np.int32)})
    assert [p["ids"] for p in body["predictions"]] == [
        [b.decode() for b in r] for r in want["ids"]]
    np.testing.assert_allclose([p["scores"] for p in body["predictions"]],
                               want["scores"], atol=1e-6)
    status, columnar = _http(
        server, "POST", "/v1/models/retrieval_brute_force/versions/1:predict",
        {"signature_name": "top_k", "inputs": {**users, "k": [3, 3]}})
    assert status == 200, columnar
    assert columnar["outputs"]["ids"] == [p["ids"] for p in body["predictions"]]
    # One output: "predictions" is a list of values per row; "outputs" the value.
    movies = {k: v.tolist() for k, v in _movies(exported[1], 2).items()}
    status, body = _http(server, "POST", "/v1/models/towers:predict", {
        "signature_name": "candidate",
        "instances": [{k: v[i] for k, v in movies.items()} for i in range(2)]})
    assert status == 200 and np.asarray(body["predictions"]).shape == (2, 16)
    status, columnar = _http(server, "POST", "/v1/models/towers:predict",
                             {"signature_name": "candidate", "inputs": movies})
    np.testing.assert_allclose(columnar["outputs"], body["predictions"], atol=1e-6)


def test_rest_padding_scores_are_negative_infinity(server, exported):
    users = user_features(exported[1], 1)
    status, body = _http(server, "POST", "/v1/models/retrieval:predict", {
        "signature_name": "top_k_exclude",
        "inputs": {**users, "k": [2], "exclude": [["1", ""]]}})
    assert status == 200
    assert len(body["outputs"]["ids"][0]) == 2 and "1" not in body["outputs"]["ids"][0]
    status, body = _http(server, "POST", "/v1/models/retrieval:predict", {
        "signature_name": "top_k", "instances": [
            {**{k: v[0] for k, v in users.items()}, "k": 1},
            {**{k: v[0] for k, v in users.items()}, "k": 3}]})
    assert body["predictions"][0]["ids"][1:] == ["", ""]
    assert body["predictions"][0]["scores"][1:] == [-np.inf, -np.inf]


def test_rest_status_and_metadata(server):
    status, body = _http(server, "GET", "/v1/models/towers")
    assert status == 200
    assert body == {"model_version_status": [{
        "version": "1", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]}
    status, body = _http(server, "GET", "/v1/models/retrieval/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "retrieval", "signature_name": "",
                                  "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["top_k"]
    assert signature["inputs"]["k"]["dtype"] == "DT_INT32"
    assert signature["outputs"]["ids"]["dtype"] == "DT_STRING"
    assert signature["method_name"] == "tensorflow/serving/predict"


def test_json_codec_single_input_and_b64():
    spec = {"query": InputSpec("query", tf.string, (None,))}
    inputs, fmt = json_codec.request_inputs({"instances": ["a", {"b64": "w6k="}]}, spec)
    assert fmt == "row" and inputs["query"].numpy().tolist() == [b"a", "é".encode()]
    inputs, fmt = json_codec.request_inputs({"inputs": ["x"]}, spec)
    assert fmt == "columnar" and inputs["query"].numpy().tolist() == [b"x"]
    assert json_codec.response_body({"e": np.array([[0.1]], np.float32)}, "row") == {
        "predictions": [[0.1]]}


def _raw(dtype: int, dims: list[int], **fields) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in dims:
        proto.tensor_shape.dim.add().size = size
    return proto


@pytest.mark.parametrize("proto", [
    tf.make_tensor_proto(np.array([[1.5, -2.0]], np.float32)),
    tf.make_tensor_proto(np.array([1.5, 2.0], np.float64), tf.float64),
    tf.make_tensor_proto(np.array([3, -4], np.int32), tf.int32),
    tf.make_tensor_proto(np.array([2**40], np.int64), tf.int64),
    tf.make_tensor_proto(np.array([True, False]), tf.bool),
    tf.make_tensor_proto(np.array([[b"a", b"\xff"]], object), tf.string),
    tf.make_tensor_proto(np.array(b"scalar", object), tf.string),
    _raw(types_pb2.DT_INT32, [2], int_val=[3, 4]),
    _raw(types_pb2.DT_INT32, [2, 2], int_val=[7]),  # one value, broadcast
    _raw(types_pb2.DT_INT32, [2]),  # no values: zeros
    _raw(types_pb2.DT_STRING, [3], string_val=[b"a", b"b"]),  # padded
    _raw(types_pb2.DT_FLOAT, [2], float_val=[9.0],  # tensor_content wins
         tensor_content=np.array([1, 2], np.float32).tobytes()),
    _raw(types_pb2.DT_INT64, [0, 3]),
    _raw(types_pb2.DT_HALF, [1], half_val=[15360]),
], ids=lambda p: f"{types_pb2.DataType.Name(p.dtype)}")
def test_tensor_from_proto_decodes_as_make_ndarray(proto):
    got = predict.tensor_from_proto("x", proto)
    want = tf.make_ndarray(proto)
    assert got.dtype == tf.as_dtype(proto.dtype)
    assert got.shape == want.shape
    assert np.asarray(got.numpy()).tolist() == want.tolist()


@pytest.mark.parametrize("proto", [
    _raw(types_pb2.DT_INT32, [2], int_val=[1, 2, 3]),
    _raw(types_pb2.DT_INT32, [2], tensor_content=b"\x01\x02\x03"),
    _raw(types_pb2.DT_STRING, [1], tensor_content=b"abcd"),
])
def test_malformed_tensor_protos_are_invalid_argument(proto):
    with pytest.raises(ServingError, match="not a valid TensorProto") as error:
        predict.tensor_from_proto("x", proto)
    assert error.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("array", [
    np.array([[0.1, -np.inf]], np.float32), np.array([1e300], np.float64),
    np.array([[1, 2]], np.int32), np.array([2**40], np.int64),
    np.array([7], np.uint8), np.array([True]), np.array(2.5, np.float32),
    np.zeros((2, 0), np.float32), np.array([[b"a", "é"]], object),
    np.array(["u"]), np.array([1.0], np.float16),
], ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_tensor_to_proto_uses_typed_fields_and_round_trips(array):
    proto = predict.tensor_to_proto(array)
    assert proto.HasField("tensor_shape")
    assert [d.size for d in proto.tensor_shape.dim] == list(array.shape)
    back = tf.make_ndarray(proto)
    if array.dtype.kind in "OU":
        assert not proto.tensor_content and proto.dtype == types_pb2.DT_STRING
        want = [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()]
        assert back.ravel().tolist() == want
    else:
        assert proto.dtype == tf.as_dtype(array.dtype).as_datatype_enum
        if array.dtype != np.float16:
            assert not proto.tensor_content
        np.testing.assert_array_equal(back.reshape(array.shape), array)


def test_servable_prepares_each_signature_once(server, exported):
    _, prepared = exported
    servable = server.manager.get("towers")
    users = {k: tf.constant(v) for k, v in _typed(user_features(prepared, 2)).items()}
    first = servable.predict("query", users)
    cached = servable._signatures["query"]
    again = servable.predict("query", users, ["embedding"])
    assert servable._signatures["query"] is cached
    np.testing.assert_array_equal(first["embedding"], again["embedding"])
    for _ in range(2):  # unknown signatures raise every time, and are not kept
        with pytest.raises(ServingError, match='"nope" not found') as error:
            servable.predict("nope", users)
        assert error.value.code == "FAILED_PRECONDITION"
    assert "nope" not in servable._signatures


# --------------------------------------------------------------------------- #
# Bad requests: clear errors, and the server keeps serving
# --------------------------------------------------------------------------- #


def _bad_grpc_requests(prepared):
    users = _typed(user_features(prepared, 2))
    k = np.array([3, 3], np.int32)
    return [
        (_request("retrieval", "no_such_signature", users), "FAILED_PRECONDITION",
         r'Serving signature key "no_such_signature" not found.*serving_default, '
         r"top_k, top_k_exclude"),
        (_request("nope", "", users), "NOT_FOUND", r"Latest\(nope\).*'towers'"),
        (_request("towers", "query", users, version=7), "NOT_FOUND",
         r"Specific\(towers, 7\).*serves version 1"),
        (_request("retrieval", "top_k", {**users, "k": k.astype(np.float32)}),
         "INVALID_ARGUMENT", r'input "k" .* must be int32, received float32'),
        (_request("towers", "query", {**users, "age": np.array([1, 2], np.int64)}),
         "INVALID_ARGUMENT", r'input "age" .* must be float32, received int64'),
        (_request("retrieval", "top_k", users), "INVALID_ARGUMENT",
         r"Missing but required: \{k\}"),
        (_request("towers", "query", {**users, "extra": ["a", "b"]}),
         "INVALID_ARGUMENT", r"Sent extra: \{extra\}"),
        (_request("towers", "query", {k: v[:0] for k, v in users.items()}),
         "INVALID_ARGUMENT", r"empty batch"),
        (_request("retrieval", "top_k", {**users, "k": np.array([3, 51], np.int32)}),
         "INVALID_ARGUMENT", r"k must be between 1 and max_k=50 .*received k = 3 51"),
        (_request("retrieval_brute_force", "top_k",
                  {**users, "k": np.array([0, 2], np.int32)}),
         "INVALID_ARGUMENT", r"k must be between 1 and max_k=50"),
        (_request("towers", "query", {**users, "gender": ["M"]}), "INVALID_ARGUMENT",
         r"same batch size.*gender: 1"),
        (_request("retrieval", "top_k", {**users, "k": np.array([[3], [3]], np.int32)}),
         "INVALID_ARGUMENT", r'input "k" .* must have shape int32 \[batch\], received '
         r"shape \[2, 1\]"),
        (_request("retrieval", "top_k_exclude",
                  {**users, "k": k, "exclude": ["a", "b"]}),
         "INVALID_ARGUMENT", r'input "exclude" .* must have shape string \[batch, n\]'),
    ]


def test_bad_grpc_requests_get_clear_errors_and_serving_goes_on(stubs, exported):
    prediction, _ = stubs
    good = _request("retrieval", "top_k", {**_typed(user_features(exported[1], 1)),
                                           "k": np.array([2], np.int32)})
    for request, code, message in _bad_grpc_requests(exported[1]):
        with pytest.raises(grpc.RpcError) as caught:
            prediction.Predict(request, timeout=30)
        assert caught.value.code().name == code, (message, caught.value.details())
        assert re.search(message, caught.value.details()), caught.value.details()
        response = prediction.Predict(good, timeout=30)  # still serving
        assert tf.make_ndarray(response.outputs["ids"]).shape == (1, 2)


def test_oversized_grpc_message_is_rejected(stubs, exported):
    prediction, _ = stubs
    big = {**_typed(user_features(exported[1], 1)), "k": np.array([1], np.int32)}
    big["user_id"] = np.array(["x" * (MAX_BYTES + 10)], object)
    with pytest.raises(grpc.RpcError) as caught:
        prediction.Predict(_request("retrieval", "top_k", big), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details()


def test_bad_rest_requests(server, exported):
    users = user_features(exported[1], 1)
    row = {k: v[0] for k, v in users.items()}
    cases = [
        ("POST", "/v1/models/retrieval:predict", {"signature_name": "top_k",
                                                  "instances": [{**row, "k": 99}]},
         400, r"k must be between 1 and max_k=50.*received k = 99"),
        ("POST", "/v1/models/retrieval:predict", {"signature_name": "top_k",
                                                  "instances": [row]},
         400, r"instance 0 does not match .*missing \['k'\]"),
        ("POST", "/v1/models/towers:predict", {"signature_name": "query",
                                               "instances": []}, 400, "empty batch"),
        ("POST", "/v1/models/towers:predict", {"signature_name": "query",
                                               "instances": [{**row, "user_id": 7}]},
         400, r'input "user_id" expects strings .*received 7'),
        ("POST", "/v1/models/towers:predict", {"signature_name": "nope",
                                               "instances": [row]},
         400, r'Serving signature key "nope" not found'),
        ("POST", "/v1/models/towers:predict", {"instances": [row], "inputs": {}}, 400,
         r'exactly one of "instances"'),
        ("POST", "/v1/models/nope:predict", {"instances": [row]}, 404,
         r"Latest\(nope\)"),
        ("POST", "/v1/models/towers/versions/9:predict", {"instances": [row]}, 404,
         r"Specific\(towers, 9\)"),
        ("GET", "/v1/models/nope", None, 404,
         "Could not find any versions of model nope"),
        ("GET", "/v1/nothing", None, 400, "Malformed request: GET /v1/nothing"),
        ("POST", "/v1/models/towers:classify", {"instances": [row]}, 501,
         ":predict only"),
        ("POST", "/v1/models/retrieval:predict", {
            "signature_name": "top_k_exclude",
            "inputs": {**users, "k": [1], "exclude": [["a"], ["b", "c"]]}},
         400, r'input "exclude" is ragged'),
    ]
    for method, path, body, code, message in cases:
        status, answer = _http(server, method, path, body)
        assert status == code, (path, answer)
        assert set(answer) == {"error"} and re.search(message, answer["error"]), answer
    status, answer = _http(server, "POST", "/v1/models/towers:predict", raw=b"{nope")
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = _http(server, "POST", "/v1/models/towers:predict",
                           raw=b" " * (MAX_BYTES + 1))
    assert status == 413 and f"at most {MAX_BYTES}" in answer["error"]
    status, answer = _http(server, "POST", "/v1/models/retrieval:predict",
                           {"signature_name": "top_k", "instances": [{**row, "k": 4}]})
    assert status == 200 and len(answer["predictions"][0]["ids"]) == 4


# --------------------------------------------------------------------------- #
# New versions, failed versions
# --------------------------------------------------------------------------- #


def _add_version(base: pathlib.Path, source: int, target: int) -> None:
    """Copies a version and renames it into place (as an export does)."""
    tmp = base / f".tmp-copy-{target}"
    shutil.copytree(base / str(source), tmp)
    os.rename(tmp, base / str(target))


def test_new_version_is_picked_up_without_dropping_requests(exported, tmp_path):
    export_dir, prepared = exported
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    request = _request("retrieval", "top_k", {**_typed(user_features(prepared, 1)),
                                              "k": np.array([3], np.int32)})
    with running_server(copy, poll_seconds=0.2, rest_port=None) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        first = stub.Predict(request, timeout=30)
        assert first.model_spec.version.value == 1
        seen, errors, stop = set(), [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    seen.add(stub.Predict(request, timeout=30).model_spec.version.value)
                except grpc.RpcError as error:  # pragma: no cover - the failure case
                    errors.append(error)

        thread = threading.Thread(target=hammer)
        thread.start()
        _add_version(copy / "retrieval", 1, 2)
        time.sleep(0.6)  # not committed: models.config pins version 1
        assert server.manager.served()["retrieval"] == 1 and 2 not in seen
        pins = config.pinned_versions(copy)
        config.write_model_configs(copy, list(pins), {**pins, "retrieval": 2})
        deadline = time.monotonic() + 30
        while 2 not in seen and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        thread.join(timeout=30)
        assert errors == [] and 2 in seen
        second = stub.Predict(request, timeout=30)
        assert second.model_spec.version.value == 2
        assert tf.make_ndarray(second.outputs["ids"]).tolist() == tf.make_ndarray(
            first.outputs["ids"]).tolist()
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(
                model_spec={"name": "retrieval"}),
            timeout=30)
        states = {s.version: s.state for s in status.model_version_status}
        assert states == {2: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
                          1: get_model_status_pb2.ModelVersionStatus.END}
        # A broken version is reported and the previous one keeps serving.
        (copy / "towers" / ".tmp-broken").mkdir()
        (copy / "towers" / ".tmp-broken" / "saved_model.pb").write_bytes(b"garbage")
        os.rename(copy / "towers" / ".tmp-broken", copy / "towers" / "5")
        config.write_model_configs(copy, list(pins), {**pins, "retrieval": 2,
                                                      "towers": 5})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = dict((v, (s, e)) for v, s, e in server.manager.status("towers"))
            if 5 in states and states[5][0] == 50:
                break
            time.sleep(0.1)
        assert states[5][0] == 50 and "SavedModel" in states[5][1], states
        towers = stub.Predict(_request("towers", "query",
                                       _typed(user_features(prepared, 1))), timeout=30)
        assert towers.model_spec.version.value == 1
        assert server.manager.served() == {**pins, "retrieval": 2}  # the whole set
        channel.close()


def test_model_config_discovery_and_errors(exported, tmp_path):
    export_dir = exported[0]
    assert config.resolve_base_path("/models/towers", tmp_path) == tmp_path / "towers"
    assert config.resolve_base_path("sub/m", tmp_path) == tmp_path / "sub" / "m"
    (tmp_path / "towers").mkdir()
    shutil.copytree(export_dir / "towers" / "1", tmp_path / "towers" / "3")
    assert config.read_model_config(tmp_path) == [("towers", tmp_path / "towers")]
    with running_server(tmp_path, rest_port=None) as server:  # no models.config
        assert server.manager.status("towers") == [(3, 30, "")]
    (tmp_path / "models.config").write_text("model_config_list { nonsense }")
    with pytest.raises(ExportError, match="not a valid TF Serving model config"):
        config.read_model_config(tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        config.read_model_config(tmp_path / "missing")
    with pytest.raises(ConfigError, match="between 0 and 65535"):
        Server(export_dir, grpc_port=70000)


def test_rest_stop_drains_a_request_in_flight(exported):
    users = user_features(exported[1], 1)
    body = json.dumps({"signature_name": "top_k", "inputs": {**users, "k": [2]}})
    with running_server(exported[0], grpc_port=0) as server:
        sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)
        sock.sendall(f"POST /v1/models/retrieval:predict HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.3)  # the handler is now waiting for the body
        stopper = threading.Thread(target=server.stop, kwargs={"grace_seconds": 5})
        stopper.start()
        time.sleep(0.5)
        assert stopper.is_alive()  # stop() waits for the request in flight
        sock.sendall(body.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        stopper.join(timeout=30)
        assert not stopper.is_alive()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and len(json.loads(payload)["outputs"][
        "ids"][0]) == 2


# --------------------------------------------------------------------------- #
# `tfdssm serve` as a process: query through it, then SIGTERM
# --------------------------------------------------------------------------- #


def test_cli_serve_query_and_sigterm(exported):
    export_dir, prepared = exported
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfdssm.cli", "serve", "--export-dir", str(export_dir),
         "--grpc-port", "0", "--rest-port", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        lines, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "gRPC on" in line:
                break
        started = "".join(lines)
        found = re.search(r"gRPC on 127\.0\.0\.1:(\d+), REST on http://127\.0\.0\.1:(\d+)",
                          started)
        assert found, started
        grpc_port = found[1]
        users = user_features(prepared, 1)
        argv = ["query", "--server", f"127.0.0.1:{grpc_port}", "--k", "4",
                "--model", "retrieval_brute_force"]
        for name, values in users.items():
            argv += ["--feature", f"{name}={values[0]}"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
        assert code == 0, err.getvalue()
        ranked = re.findall(r"^\s*(\d+)\. (\S+)\s+(-?\d+\.\d{4})$",
                            out.getvalue(), re.M)
        assert [int(r[0]) for r in ranked] == [1, 2, 3, 4]
        loaded = tf.saved_model.load(str(export_dir / "retrieval_brute_force" / "1"))
        want = _call_direct(loaded, "serving_default", _typed(users))
        assert [r[1] for r in ranked] == [b.decode() for b in want["ids"][0][:4]]
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "shutting down" in rest and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
