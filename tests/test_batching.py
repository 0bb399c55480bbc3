"""Server-side batching (``tfdssm serve --enable-batching``), the Prometheus
metrics (``--monitoring-config-file``) and the two TF Serving config files.

Concurrent requests with different ``k``, exclusions and row counts, merged,
must get what they get alone; a bad request in a batch fails alone; the batch
size limit, the timeout and the queue bound hold. The merged answers' ids are
compared exactly; scores to float32 rounding (a batched matrix product may sum
in another order than the single-row one). The metrics are read as a
Prometheus server reads them (``prometheus_client``'s parser).
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import io
import json
import pathlib
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import scann  # noqa: F401 - registers ScaNN's ops for loading `retrieval` in-process
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import running_server, trained_export
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfdssm import cli
from tfdssm.errors import ConfigError, ServingError
from tfdssm.serving.batching import Batcher
from tfdssm.serving.config_files import (
    BatchingParameters,
    MonitoringOptions,
    read_batching_parameters,
    read_monitoring_config,
)

WAIT = 60.0


@pytest.fixture(scope="module")
def exported():
    export_dir, prepared, _ = trained_export()
    return pathlib.Path(export_dir), prepared


@pytest.fixture(scope="module")
def server(exported):
    batching = BatchingParameters(max_batch_size=64, batch_timeout_micros=100_000,
                                  num_batch_threads=1, pad_variable_length_inputs=True)
    with running_server(exported[0], batching=batching,
                        monitoring=MonitoringOptions(prometheus=True)) as running:
        yield running


def _users(prepared, offset: int, count: int) -> dict[str, tf.Tensor]:
    users = prepared.test.drop_duplicates("user_id").iloc[offset:offset + count]
    return {"user_id": tf.constant(users["user_id"].astype(str).tolist()),
            "age": tf.constant(users["age"].astype("float32").to_numpy()),
            "gender": tf.constant(users["gender"].tolist()),
            "occupation": tf.constant(users["occupation"].tolist()),
            "zip_prefix": tf.constant(users["zip_prefix"].tolist())}


def _mixed_requests(prepared, count: int, seed: int = 0) -> list[tuple]:
    """``(model, signature, inputs)``: 1-3 rows, per-row ``k`` in [1, 50],
    0-5 excluded ids, over both retrieval models and the towers."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        rows = 1 + i % 3
        features = _users(prepared, 3 * i, rows)
        k = tf.constant(rng.integers(1, 51, rows).astype(np.int32))
        model = ("retrieval", "retrieval_brute_force")[i % 2]
        if i % 5 == 4:
            out.append(("towers", "query", features))
        elif i % 3 == 0:
            out.append((model, "top_k", {**features, "k": k}))
        else:
            exclude = rng.integers(1, 2001, (rows, i % 6)).astype(str).astype(object)
            out.append((model, "top_k_exclude",
                        {**features, "k": k, "exclude": tf.constant(exclude)}))
    return out


def _concurrently(function, count: int) -> list:
    """``function(i)`` for ``i < count`` in threads released together."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait(WAIT)
        try:
            results[i] = function(i)
        except Exception as error:  # noqa: BLE001 - returned, compared below
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        if want[name].dtype == object:
            np.testing.assert_array_equal(got[name], want[name])
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def _proto(model: str, signature: str, inputs: dict) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, tensor in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(tensor.numpy(),
                                                           tensor.dtype))
    return request


def _runs(server) -> float:
    line = next(line for line in server.metrics.render().splitlines()
                if line.startswith(":tensorflow:serving:batching_session:"
                                   "wrapped_run_count "))
    return float(line.split()[-1])


def test_concurrent_requests_get_their_unbatched_answers_over_grpc(server, exported):
    requests = _mixed_requests(exported[1], 24)
    want = [server.manager.get(m).predict(s, x) for m, s, x in requests]
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    protos = [_proto(*request) for request in requests]
    before = _runs(server)
    responses = _concurrently(lambda i: stub.Predict(protos[i], timeout=WAIT),
                              len(protos))
    merged_runs = _runs(server) - before
    # A call without a deadline (gRPC reports ~9e18 s remaining) waits as long
    # as its batch takes; the client waits at most WAIT for it.
    no_deadline = stub.Predict.future(protos[0])
    responses.append(no_deadline.result(timeout=WAIT))
    want.append(want[0])
    channel.close()
    for response, expected in zip(responses, want, strict=True):
        assert not isinstance(response, Exception), response
        _assert_same({k: tf.make_ndarray(v) for k, v in response.outputs.items()},
                     expected)
    # 5 (model, signature) queues, 24 requests released together, 0.1 s timeout:
    # they were merged (each queue's requests in a few calls, not one each).
    assert merged_runs < len(protos) / 2, merged_runs


def test_k_widths_exclusions_and_output_filter_stay_per_request(server, exported):
    prepared = exported[1]
    servable = server.manager.get("retrieval_brute_force")
    batcher = server.batcher
    users = _users(prepared, 0, 2)
    cases = [({**users, "k": tf.constant([3, 1], tf.int32)}, ("ids",)),
             ({**users, "k": tf.constant([40, 2], tf.int32)}, ()),
             ({**users, "k": tf.constant([5, 5], tf.int32)}, ("scores",))]
    want = [servable.predict("top_k", x, f) for x, f in cases]
    got = _concurrently(lambda i: batcher.predict(servable, "top_k", *cases[i]), 3)
    for result, expected in zip(got, want, strict=True):
        _assert_same(result, expected)
    assert got[0]["ids"].shape == (2, 3) and got[1]["ids"].shape == (2, 40)
    assert list(got[2]) == ["scores"]


def test_a_bad_request_in_a_batch_fails_alone(server, exported):
    prepared = exported[1]
    servable = server.manager.get("retrieval")
    users = _users(prepared, 0, 1)
    cases = [{**users, "k": tf.constant([k], tf.int32)} for k in (5, 0, 7, 51, 9)]
    cases.append({**users, "k": tf.constant([2.0])})  # wrong dtype: never queued
    good = {0: 5, 2: 7, 4: 9}
    want = {i: servable.predict("top_k", cases[i]) for i in good}
    before = _runs(server)
    got = _concurrently(lambda i: server.batcher.predict(servable, "top_k", cases[i]),
                        len(cases))
    for i, result in enumerate(got):
        if i in good:
            assert not isinstance(result, Exception), (i, result)
            _assert_same(result, want[i])
        else:
            assert isinstance(result, ServingError), (i, result)
            assert result.code == "INVALID_ARGUMENT", (i, result)
    assert "k must be between 1 and max_k=50" in str(got[1])
    assert "must be int32, received float32" in str(got[5])
    # The 5 valid-looking ones merged: one call failed, then each ran alone.
    assert _runs(server) - before <= 3


def test_max_batch_size_timeout_and_queue_bound(server, exported):
    servable = server.manager.get("towers")
    users = _users(exported[1], 0, 8)
    rows = lambda n: {k: v[:n] for k, v in users.items()}  # noqa: E731
    timeout = 0.4
    batcher = Batcher(BatchingParameters(
        max_batch_size=4, batch_timeout_micros=int(timeout * 1e6),
        max_enqueued_batches=1, num_batch_threads=1)).start()
    try:
        with pytest.raises(ServingError, match="Task size 5 is larger than maximum "
                           "input batch size 4") as error:
            batcher.predict(servable, "query", rows(5))
        assert error.value.code == "INVALID_ARGUMENT"
        # A lone request waits for the timeout; a full batch does not.
        start = time.monotonic()
        batcher.predict(servable, "query", rows(1))
        assert time.monotonic() - start >= timeout
        start = time.monotonic()
        full = batcher.predict(servable, "query", rows(4))
        assert time.monotonic() - start < timeout
        _assert_same(full, servable.predict("query", rows(4)))
        # One batch may be queued: a request that needs a second is refused.
        waiting = threading.Thread(target=batcher.predict,
                                   args=(servable, "query", rows(1)))
        waiting.start()
        time.sleep(0.05)  # it has opened the queue's batch (1 row of 4)
        with pytest.raises(ServingError, match="queue .* is full") as error:
            batcher.predict(servable, "query", rows(4))
        assert error.value.code == "UNAVAILABLE"
        waiting.join(WAIT)
        # Single rows at once: batches of at most 4 rows.
        sizes_before = _sizes(batcher)
        results = _concurrently(
            lambda i: batcher.predict(servable, "query",
                                      {k: v[i:i + 1] for k, v in users.items()}), 3)
        assert all(not isinstance(r, Exception) for r in results), results
    finally:
        batcher.stop(time.monotonic() + 10)
    sizes = _sizes(batcher)
    assert sizes["count"] > sizes_before["count"]
    assert sizes["le4"] == sizes["count"]  # never more than max_batch_size rows
    with pytest.raises(ServingError, match="shutting down") as error:
        batcher.predict(servable, "query", rows(1))
    assert error.value.code == "UNAVAILABLE"


def _sizes(batcher: Batcher) -> dict[str, float]:
    prefix = ":tensorflow:serving:batching_session:processed_batch_size"
    lines = [line for line in batcher.metrics.render().splitlines()
             if line.startswith(prefix) and 'model_name="towers"' in line]
    count = sum(float(line.split()[-1]) for line in lines
                if line.startswith(prefix + "_count"))
    le4 = sum(float(line.split()[-1]) for line in lines if 'le="4"' in line)
    return {"count": count, "le4": le4}


def test_allowed_batch_sizes_pad_and_drop_the_padding(server, exported):
    servable = server.manager.get("retrieval_brute_force")
    users = _users(exported[1], 0, 3)
    inputs = {**users, "k": tf.constant([4, 2, 9], tf.int32),
              "exclude": tf.constant([["1"], [""], ["7"]])}
    batcher = Batcher(BatchingParameters(max_batch_size=8, allowed_batch_sizes=(2, 8),
                                         num_batch_threads=1)).start()
    try:
        got = batcher.predict(servable, "top_k_exclude", inputs)
    finally:
        batcher.stop(time.monotonic() + 10)
    _assert_same(got, servable.predict("top_k_exclude", inputs))
    text = batcher.metrics.render()
    assert ('processed_batch_size_sum{model_name="retrieval_brute_force",'
            'signature_name="top_k_exclude"} 8') in text
    assert ('padding_size_sum{model_name="retrieval_brute_force",'
            'signature_name="top_k_exclude"} 5') in text


# --------------------------------------------------------------------------- #
# The parameters files
# --------------------------------------------------------------------------- #


def test_batching_parameters_file_in_tf_serving_format(tmp_path):
    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: 64 }\n"
                    "batch_timeout_micros { value: 2000 }\n"
                    "max_enqueued_batches { value: 100 }\n"
                    "num_batch_threads { value: 2 }\n"
                    "allowed_batch_sizes: 8\nallowed_batch_sizes: 64\n"
                    "pad_variable_length_inputs: true\n")
    assert read_batching_parameters(path) == BatchingParameters(
        max_batch_size=64, batch_timeout_micros=2000, max_enqueued_batches=100,
        num_batch_threads=2, allowed_batch_sizes=(8, 64),
        pad_variable_length_inputs=True)
    path.write_text("")  # TF Serving's defaults
    assert read_batching_parameters(path).max_batch_size == 1000
    for text, message in [
            ("max_batch_sise { value: 3 }", 'no field named "max_batch_sise"'),
            ("max_batch_size: 3", "max_batch_size"),  # a wrapper, not a number
            ("max_batch_size { value: 0 }", "max_batch_size must be >= 1"),
            ("max_batch_size { value: 8 } allowed_batch_sizes: 4",
             "the last equal to max_batch_size"),
            ("max_batch_size { value: 8 } allowed_batch_sizes: 8 "
             "allowed_batch_sizes: 4", "increasing")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_batching_parameters(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_batching_parameters(tmp_path / "missing.txt")


def test_monitoring_config_file(tmp_path):
    path = tmp_path / "monitoring.txt"
    path.write_text('prometheus_config { enable: true, path: "/metrics" }\n')
    config = read_monitoring_config(path)
    assert config.prometheus and config.path == "/metrics"
    path.write_text("prometheus_config { enable: true }")
    assert read_monitoring_config(path).path == "/monitoring/prometheus/metrics"
    path.write_text("prometheus { enable: true }")
    with pytest.raises(ConfigError, match='no field named "prometheus"'):
        read_monitoring_config(path)


def test_cli_rejects_a_bad_batching_file_before_serving(tmp_path, exported):
    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: -1 }\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["serve", "--export-dir", str(exported[0]), "--grpc-port",
                         "0", "--rest-port", "0", "--batching-parameters-file",
                         str(path)])
    assert code == 2, err.getvalue()
    assert "max_batch_size must be >= 1, received -1" in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()


# --------------------------------------------------------------------------- #
# Prometheus metrics
# --------------------------------------------------------------------------- #


def _scrape(server) -> dict[str, list]:
    url = f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {family.name: family.samples
            for family in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample: str, **labels: str) -> float:
    return sum(s.value for s in families.get(family, [])
               if s.name == sample and all(s.labels.get(k) == v
                                           for k, v in labels.items()))


def test_prometheus_counters_move_by_the_requests_sent(server, exported):
    prepared = exported[1]
    users = _users(prepared, 0, 1)
    good = _proto("retrieval_brute_force", "top_k",
                  {**users, "k": tf.constant([3], tf.int32)})
    bad_dtype = _proto("retrieval_brute_force", "top_k",
                       {**users, "k": tf.constant([3.0])})
    bad_k = _proto("retrieval_brute_force", "top_k",
                   {**users, "k": tf.constant([0], tf.int32)})
    unknown = _proto("no_such_model", "top_k", users)
    count = ":tensorflow:serving:request_count"
    latency = ":tensorflow:serving:request_latency"
    before = _scrape(server)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    sent = [good] * 5 + [bad_dtype] * 2 + [bad_k] * 3 + [unknown]
    codes = _concurrently(lambda i: _grpc_code(stub, sent[i]), len(sent))
    channel.close()
    assert codes == ["OK"] * 5 + ["INVALID_ARGUMENT"] * 5 + ["NOT_FOUND"], codes
    body = {"signature_name": "top_k", "instances": [
        {**{k: v.numpy()[0].decode() if v.dtype == tf.string else float(v.numpy()[0])
            for k, v in users.items()}, "k": k} for k in (2, 4)]}
    statuses = [_rest(server, body) for _ in range(3)]
    statuses.append(_rest(server, {**body, "signature_name": "nope"}))
    assert statuses == [200, 200, 200, 400], statuses
    after = _scrape(server)

    def moved(family: str, sample: str, **labels: str) -> float:
        return (_value(after, family, sample, **labels)
                - _value(before, family, sample, **labels))

    brute = {"model_name": "retrieval_brute_force"}
    total = count + "_total"
    assert moved(count, total, status="OK", version="1", signature_name="top_k",
                 **brute) == 5 + 3
    assert moved(count, total, status="INVALID_ARGUMENT", **brute) == 5
    assert moved(count, total, status="FAILED_PRECONDITION", **brute) == 1
    assert moved(count, total, model_name="no_such_model", status="NOT_FOUND") == 1
    assert moved(latency, latency + "_count", entrypoint="GRPC", **brute) == 10
    assert moved(latency, latency + "_count", entrypoint="REST", **brute) == 4
    assert moved(latency, latency + "_sum", **brute) > 0
    # Batching: each request's rows and queuing delay, each merged call's rows.
    queued = ":tensorflow:serving:batching_session:queuing_latency"
    inputs = ":tensorflow:serving:batching_session:input_batch_size"
    labels = {"model_name": "retrieval_brute_force", "signature_name": "top_k"}
    assert moved(inputs, inputs + "_count", **labels) == 5 + 3 + 3
    assert moved(inputs, inputs + "_sum", **labels) == 5 + 3 + 3 * 2
    assert moved(queued, queued + "_count", **labels) == 5 + 3 + 3
    # Loads: every model once, at start; nothing unloaded yet.
    events = ":tensorflow:serving:model_event_count"
    for model in ("towers", "retrieval", "retrieval_brute_force"):
        assert _value(after, events, events + "_total", model_name=model,
                      event="load") == 1
    assert _value(after, events, events + "_total", event="unload") == 0
    loads = ":tensorflow:cc:saved_model:load_attempt_count"
    assert _value(after, loads, loads + "_total", status="success") == 3


def test_a_call_whose_deadline_passes_in_the_queue_is_dropped_not_run(tmp_path):
    """Batched gRPC calls are coroutines awaiting their batch: one whose
    deadline passes while it waits is cancelled (DEADLINE_EXCEEDED), its task
    is skipped when its batch is due, and the server answers the next call."""
    _scale_model(tmp_path / "scale" / "1", 2.0)
    batching = BatchingParameters(max_batch_size=8, batch_timeout_micros=1_000_000,
                                  num_batch_threads=1)
    with running_server(tmp_path, batching=batching,
                        monitoring=MonitoringOptions(prometheus=True)) as server:
        assert server._grpc.loop.is_running()  # the asyncio front
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "scale"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto([4.0], tf.float32))
        before, runs = _scrape(server), _runs(server)
        try:
            with pytest.raises(grpc.RpcError) as error:  # its batch waits 1 s
                stub.Predict(request, timeout=0.05)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(1.5)  # its batch was due: skipped, the model not called
            assert _runs(server) == runs
            response = stub.Predict(request, timeout=WAIT)
        finally:
            channel.close()
        after = _scrape(server)
        assert _runs(server) == runs + 1
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [8.0]
    count = ":tensorflow:serving:request_count"

    def moved(status: str) -> float:
        return (_value(after, count, count + "_total", status=status)
                - _value(before, count, count + "_total", status=status))

    assert (moved("CANCELLED"), moved("OK")) == (1, 1)


def test_metadata_status_and_unimplemented_on_the_batched_front(server):
    """The asyncio front answers the other RPCs as the thread-pool server does."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    try:
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = "towers"
        request.metadata_field.append("signature_def")
        metadata = stub.GetModelMetadata(request, timeout=WAIT)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        metadata.metadata["signature_def"].Unpack(signatures)
        assert "query" in signatures.signature_def
        request.model_spec.name = "no_such_model"
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelMetadata(request, timeout=WAIT)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = "towers"
        status = models.GetModelStatus(status_request, timeout=WAIT)
        assert [v.state for v in status.model_version_status] == [
            get_model_status_pb2.ModelVersionStatus.AVAILABLE]
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(classification_pb2.ClassificationRequest(), timeout=WAIT)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "use Predict" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            models.HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(), timeout=WAIT)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "restart" in error.value.details()
    finally:
        channel.close()


def _grpc_code(stub, request) -> str:
    try:
        stub.Predict(request, timeout=WAIT)
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def _rest(server, body: dict) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.rest_port}/v1/models/retrieval_brute_force:predict",
        data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            assert len(json.loads(response.read())["predictions"]) == 2
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


# --------------------------------------------------------------------------- #
# A version swap under batched load
# --------------------------------------------------------------------------- #


def _scale_model(path: pathlib.Path, factor: float) -> None:
    """A SavedModel ``{"y": factor * x}`` (x float32 ``[batch]``) at ``path``."""

    class Scale(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def call(self, x):
            return {"y": x * factor}

    module = Scale()
    tmp = path.parent / f".tmp-{path.name}"
    tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.call})
    tmp.rename(path)


def test_version_swap_under_batched_load_loses_no_request(tmp_path):
    _scale_model(tmp_path / "scale" / "1", 2.0)
    batching = BatchingParameters(max_batch_size=8, batch_timeout_micros=2000,
                                  num_batch_threads=1)
    answers: list[tuple[int, float, float]] = []  # (version, x, y)
    errors: list[str] = []
    stop = threading.Event()
    with running_server(tmp_path, batching=batching, poll_seconds=0.1,
                        rest_port=None) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def client(seed: int) -> None:
            x = float(seed)
            while not stop.is_set():
                request = predict_pb2.PredictRequest()
                request.model_spec.name = "scale"
                request.inputs["x"].CopyFrom(tf.make_tensor_proto([x], tf.float32))
                try:
                    response = stub.Predict(request, timeout=WAIT)
                except grpc.RpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")
                    continue
                answers.append((response.model_spec.version.value, x,
                                float(response.outputs["y"].float_val[0])))
                x += 8

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.3)
            _scale_model(tmp_path / "scale" / "2", 3.0)
            deadline = time.monotonic() + WAIT
            while not any(v == 2 for v, _, _ in answers[-50:]):
                assert time.monotonic() < deadline, "version 2 never served"
                time.sleep(0.05)
            time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(WAIT)
        channel.close()
        runs = _runs(server)
    assert errors == []
    assert {v for v, _, _ in answers} == {1, 2}
    # Every answer is its own row's, computed by the version it names.
    assert all(y == x * (2.0 if v == 1 else 3.0) for v, x, y in answers)
    assert runs < len(answers)  # merged
