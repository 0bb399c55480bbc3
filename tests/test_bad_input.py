"""Bad input, table-driven: one table of cases, three surfaces.

Every case says what it sends to the surfaces where it applies:

* **CLI** (``tfdssm ...`` in process): exit 2 (argparse errors too), no
  ``Traceback``, and one ``tfdssm: error:`` line naming the file, column or
  argument; a failed ``train`` leaves no export directory behind.
* **library**: an exception of the expected type (all derive from
  :class:`tfdssm.errors.TfdssmError`) whose message names the same thing.
* **server** (gRPC and REST against one in-process ``tfdssm serve``): the gRPC
  code / HTTP status and a message naming the input; a good request sent right
  after every bad one still succeeds.

Some inputs are valid and must simply work (empty and whitespace-only text,
non-UTF-8 bytes in a request, a 1 MB text under the request size limit): those
rows expect success. Hashing of arbitrary Unicode is property-tested in
``tests/test_hashing.py`` (``test_any_unicode_hashes_deterministically_in_range``,
``test_any_bytes_hash_like_the_reference``); the 1 MB-text truncation property
is here.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import scann  # noqa: F401 - registers ScaNN's ops for loading `retrieval` in-process
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_helpers import running_server, trained_export, user_features
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfdssm import cli, export
from tfdssm.client import Client
from tfdssm.data import readers
from tfdssm.data import readers as data
from tfdssm.errors import (
    ConfigError,
    DataError,
    DataWarning,
    ExportError,
    ServingError,
    TfdssmError,
)
from tfdssm.export import index
from tfdssm.features import NumericFeature, TextFeature
from tfdssm.recipes import pairs
from tfdssm.retrieve import LocalRetriever
from tfdssm.serving.server import Server
from tfdssm.text.normalize import TextNormalizer, normalize_code_points_py, prefix_bytes
from tfdssm.training import run as train

MAX_BYTES = 2 * 1024 * 1024  # the test server's request size limit
MAX_BATCH = 64  # and its batch limit
MB = 1024 * 1024
TINY = ["--hidden", "16", "--dim", "8", "--buckets", "500", "--epochs", "1",
        "--batch-size", "16", "--quiet",
        # The pairs defaults' hybrid export and BM25 mining are tested in
        # test_hybrid.py / test_negatives.py; here they would only cost CI time.
        "--no-hybrid", "--hard-negatives", "none"]


# --------------------------------------------------------------------------- #
# The environment every case draws on
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Env:
    """Files, exports and a running server shared by the cases."""

    tmp: pathlib.Path
    pairs_dir: pathlib.Path  # a tiny pairs export (10 documents)
    pairs_prepared: Any
    broken_dir: pathlib.Path  # the same with a corrupt towers/1
    served_dir: pathlib.Path  # the MovieLens-like export the server serves
    served_prepared: Any
    server: Server

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def users(self, rows: int = 2) -> dict[str, list]:
        return user_features(self.served_prepared, rows)

    def file(self, name: str) -> pathlib.Path:
        return self.tmp / name


def _write_files(tmp: pathlib.Path, frame: pd.DataFrame) -> None:
    frame.to_csv(tmp / "pairs.csv", index=False)
    (tmp / "empty.csv").write_bytes(b"")
    (tmp / "header.csv").write_text("query,doc,doc_id\n")
    (tmp / "latin.csv").write_bytes("query,doc\ncafé,d\n".encode("latin-1"))
    nan_id = frame.copy()
    nan_id.loc[4, "doc_id"] = None
    nan_id.to_csv(tmp / "nan_id.csv", index=False)
    nan_doc = frame.copy()
    nan_doc.loc[5, "doc"] = np.nan
    nan_doc.to_csv(tmp / "nan_doc.csv", index=False)
    dup = frame.copy()
    dup.loc[0, "doc"] = "something else entirely"
    dup.to_csv(tmp / "dup_id.csv", index=False)
    frame[["query", "doc", "doc_id", "doc"]].to_csv(tmp / "dup_header.csv", index=False)
    lists = frame.copy()
    lists["doc"] = lists["doc"].str.split()
    lists.to_parquet(tmp / "lists.parquet", index=False)
    (tmp / "a_file").write_text("not a directory")
    (tmp / "not_an_export").mkdir()


@pytest.fixture(scope="module")
def env(tmp_path_factory, pairs_export, pairs_frame):
    tmp = tmp_path_factory.mktemp("bad_input")
    _write_files(tmp, pairs_frame(60))
    pairs_dir, pairs_prepared, _ = pairs_export
    broken = tmp / "broken_export"
    shutil.copytree(pairs_dir, broken)
    (broken / "towers" / "1" / "saved_model.pb").write_bytes(b"half-written")
    served_dir, served_prepared, _ = trained_export()
    with running_server(served_dir, max_request_bytes=MAX_BYTES,
                        max_batch_size=MAX_BATCH, poll_seconds=60) as server:
        yield Env(tmp, pathlib.Path(pairs_dir), pairs_prepared, broken,
                  pathlib.Path(served_dir), served_prepared, server)


# --------------------------------------------------------------------------- #
# Surface helpers
# --------------------------------------------------------------------------- #


def run_cli(argv: list) -> tuple[int, str, str]:
    """``tfdssm ARGV`` in process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def tensor(values: Any, dtype: tf.DType | None = None) -> tensor_pb2.TensorProto:
    array = np.asarray(values, dtype=object if dtype == tf.string else None)
    return tf.make_tensor_proto(array, dtype)


def raw_tensor(dtype: int, dims: list[int], **fields) -> tensor_pb2.TensorProto:
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape)
    for name, values in fields.items():
        if name == "float8_val":  # bytes, one per value
            proto.float8_val = bytes(values)
        else:
            getattr(proto, name).extend(values)
    return proto


def predict_request(model: str, signature: str, inputs: dict,
                    version: int | None = None) -> predict_pb2.PredictRequest:
    """A PredictRequest; inputs are TensorProtos or values (strings stay strings,
    ``age`` float32, ``k`` int32)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for name, value in inputs.items():
        if not isinstance(value, tensor_pb2.TensorProto):
            dtype = {"age": tf.float32, "k": tf.int32}.get(name, tf.string)
            value = tensor(value, dtype)
        request.inputs[name].CopyFrom(value)
    return request


def user_inputs(e: Env, rows: int = 2, k: int | None = 3, **changes) -> dict:
    inputs: dict[str, Any] = dict(e.users(rows))
    if k is not None:
        inputs["k"] = k if isinstance(k, tensor_pb2.TensorProto) else [k] * rows
    inputs.update(changes)
    return {n: v for n, v in inputs.items() if v is not None}


def http(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    """One raw HTTP/1.1 exchange (so bodies and headers can be anything)."""
    head = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    if body is not None and "Content-Length" not in head:
        head["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")  # as read
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head_bytes + (body or b""))
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload)


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def rest_rows(e: Env, rows: int = 1, signature: str = "top_k", k: Any = 3,
              **changes) -> bytes:
    users = e.users(rows)
    instances = []
    for i in range(rows):
        row = {n: v[i] for n, v in users.items()}
        if k is not None:
            row["k"] = k
        row.update(changes)
        instances.append({n: v for n, v in row.items() if v is not _DROP})
    return body({"signature_name": signature, "instances": instances})


_DROP = object()


# --------------------------------------------------------------------------- #
# The table
# --------------------------------------------------------------------------- #

Argv = Callable[[Env], list]
OK = "OK"


@dataclasses.dataclass(frozen=True)
class Case:
    """One kind of bad (or awkward) input and what each surface must answer.

    Attributes:
        id: The case name (the test id).
        cli: ``(argv(env), exit code, fragments of the message)``.
        library: ``(call(env), exception type or None for success, fragments)``.
        grpc: ``(request(env), status code name or "OK", fragments)``; ``model``
            of the request is the served MovieLens-like export.
        rest: ``(method, path, body(env) or None, HTTP status, fragments)``.
        rest_headers: Extra (or replacing) HTTP headers for the REST request.
    """

    id: str
    cli: tuple[Argv, int, tuple[str, ...]] | None = None
    library: tuple[Callable[[Env], Any], type | None, tuple[str, ...]] | None = None
    grpc: tuple[Callable[[Env], Any], str, tuple[str, ...]] | None = None
    rest: tuple[str, str, Callable[[Env], bytes] | None, int,
                tuple[str, ...]] | None = None
    rest_headers: dict[str, str] | None = None


def _train(data_file: str, *extra: str) -> Argv:
    return lambda e: ["train", "--pipeline", "pairs", "--data", e.file(data_file),
                      "--candidate-id-column", "doc_id", "--export-dir",
                      e.file(f"out_{data_file}"), *TINY, *extra]


def _evaluate(data_file: str) -> Argv:
    return lambda e: ["evaluate", "--export-dir", e.pairs_dir, "--data",
                      e.file(data_file)]


def _query_server(*extra: str) -> Argv:
    def argv(e: Env) -> list:
        features = [f"--feature={n}={v[0]}" for n, v in e.users(1).items()]
        return ["query", "--server", e.grpc_target, *features, *extra]
    return argv


def _towers_of(e: Env) -> Any:
    return e.pairs_prepared.model.query_tower


def _embed(e: Env, texts: list[str]) -> np.ndarray:
    return _towers_of(e)({"query": tf.constant(texts)}).numpy()


def _empty_texts(e: Env) -> None:
    vectors = _embed(e, ["", " ", "   \t\n ", "\u3000", "kiwi"])
    assert vectors.shape == (5, 8) and np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)  # no words at all


def _megabyte_text(e: Env) -> None:
    text = "kiwi and lemon tart " * (MB // 20)
    start = time.perf_counter()
    big, prefix = _embed(e, [text, text[:2000]])
    assert time.perf_counter() - start < 5
    np.testing.assert_array_equal(big, prefix)  # truncated in-graph, nothing else


def _nan_text_cells(e: Env) -> None:
    frame = pd.DataFrame({"query": ["a", None, np.nan, ""]})
    with pytest.warns(DataWarning, match=r"'query' has 3 missing or empty cell\(s\)"):
        arrays = data.to_feature_arrays(frame, [TextFeature("query")], "the table")
    assert arrays["query"].tolist() == ["a", "", "", ""]


def _client(e: Env, call: Callable[[Client], Any]) -> Any:
    with Client(e.grpc_target, timeout=30) as client:
        return call(client)


def _conflicting_corpus_export(e: Env) -> None:
    corpus = e.pairs_prepared.corpus.copy()
    corpus.loc[1, "doc_id"] = corpus.loc[0, "doc_id"]
    target = e.tmp / "conflict_export"
    try:
        export.export_model(e.pairs_prepared.model, target, corpus=corpus)
    finally:
        assert not target.exists() or not any(target.iterdir())  # nothing written


def _duplicate_rows_export(e: Env) -> dict:
    corpus = e.pairs_prepared.corpus
    doubled = pd.concat([corpus, corpus.head(3)], ignore_index=True)
    with pytest.warns(DataWarning, match=r"repeats 3 candidate\(s\)"):
        info = export.export_model(e.pairs_prepared.model, e.tmp / "dup_rows_export",
                                   corpus=doubled, tflite=False)
    assert info["num_candidates"] == len(corpus) == 10
    assert info["retrieval_brute_force"]["num_candidates"] == 10
    saved = pd.read_parquet(e.tmp / "dup_rows_export" / export.CORPUS_FILE)
    assert saved["doc_id"].is_unique
    return info


def _duplicate_ids_to_index(e: Env) -> None:
    spec = {"x": tf.TensorSpec([None, 2], tf.float32, name="x")}
    index.BruteForceRetrieval(lambda f: f["x"], spec, np.eye(3, 2, dtype=np.float32),
                              ["a", "b", "a"])


def _duplicate_config(e: Env) -> pathlib.Path:
    path = e.tmp / "duplicate.config"
    path.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{e.served_dir / base}" '
        'model_platform: "tensorflow" }\n'
        for name, base in (("towers", "towers"), ("retrieval", "retrieval"),
                           ("towers", "retrieval_brute_force"))) + "}\n")
    return path


def _odd_version_dirs(e: Env) -> None:
    """A model base holding every kind of name: only real versions count, the
    server starts and serves ``007`` as version 7 from ``007``."""
    root = e.tmp / "odd_versions"
    shutil.rmtree(root, ignore_errors=True)
    towers = root / "towers"
    shutil.copytree(e.pairs_dir / "towers" / "1", towers / "007")
    for name in ("\u00b2", "99999999999999999999", "9" * 200,
                 "-3", "1a", "\u0661", ".8"):
        (towers / name).mkdir()
    (towers / "12").write_text("a file, not a directory")
    with running_server(root, rest_port=None, poll_seconds=0.2) as server:
        assert server.manager.status("towers") == [(7, 30, "")]
        assert server.manager.get("towers", 7).path == towers / "007"
        with Client(f"127.0.0.1:{server.grpc_port}", timeout=30) as client:
            out = client.predict("towers", {"query": ["kiwi"]}, "query")
        assert next(iter(out.values())).shape == (1, 8)
        time.sleep(0.5)  # a few polls over the odd names
        assert server.manager.status("towers") == [(7, 30, "")]


def _resolve(*steps: str) -> Callable[[Env], Any]:
    return lambda e: e.server.manager.get(os.path.join(*steps))


CASES = [
    # ---------------------------------------------------------------- files
    Case("missing file",
         cli=(_train("nope.csv"), 2, ("nope.csv", "does not exist")),
         library=(lambda e: data.read_table(e.file("nope.csv")), DataError,
                  ("nope.csv", "does not exist"))),
    Case("empty file",
         cli=(_train("empty.csv"), 2, ("empty.csv", "is empty", "header row")),
         library=(lambda e: data.read_table(e.file("empty.csv")), DataError,
                  ("empty.csv", "is empty"))),
    Case("header but no rows",
         cli=(_train("header.csv"), 2, ("header.csv", "no rows")),
         library=(lambda e: data.make_dataset(e.file("header.csv"),
                                              [TextFeature("query")]),
                  DataError, ("no rows",))),
    Case("evaluation data with no rows",
         cli=(_evaluate("header.csv"), 2, ("header.csv", "no rows"))),
    Case("misspelt column",
         cli=(_train("pairs.csv", "--query-column", "qury"), 2,
              ("'qury'", "available columns", "'query'", "pairs.csv")),
         library=(lambda e: pairs.prepare(e.file("pairs.csv"), "qury", "doc"),
                  DataError, ("'qury'", "pairs.csv", "'query'", "case-sensitive"))),
    Case("misspelt candidate id column",
         cli=(_train("pairs.csv", "--candidate-id-column", "docid"), 2,
              ("'docid'", "'doc_id'")),
         library=(lambda e: readers.corpus_of(pd.read_csv(e.file("pairs.csv")),
                                            "docid", ["doc"]),
                  DataError, ("'docid'", "'doc_id'"))),
    Case("missing column in a request",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, gender=None, gendr=["M", "F"])), "INVALID_ARGUMENT",
               ("Missing but required: {gender}", "Sent extra: {gendr}")),
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, gender=_DROP, gendr="M"), 400,
               ("missing ['gender']", "unexpected ['gendr']"))),
    # ---------------------------------------------------------------- cells
    Case("missing candidate id cell",
         cli=(_train("nan_id.csv"), 2,
              ("nan_id.csv", "'doc_id'", "missing or empty", "data row 5")),
         library=(lambda e: readers.corpus_of(
             pd.read_csv(e.file("nan_id.csv"), dtype=str), "doc_id", ["doc"]),
             DataError, ("'doc_id'", "1 missing or empty", "data row 5"))),
    Case("missing candidate id in evaluation data",
         cli=(_evaluate("nan_id.csv"), 2, ("nan_id.csv", "'doc_id'", "data row 5"))),
    Case("NaN text cell under one candidate id",
         cli=(_train("nan_doc.csv"), 2, ("'D5'", "'doc_id'", "'doc'", "missing cell"))),
    Case("NaN text cells are empty text (warning)",
         library=(_nan_text_cells, None, ())),
    Case("NaN numeric cell",
         library=(lambda e: data.to_feature_arrays(
             pd.DataFrame({"age": [31, None, 40]}), [NumericFeature("age")], "users"),
             DataError, ("'age'", "finite numbers", "data row 2"))),
    # -------------------------------------------- silent misreads (issue 17.4)
    Case("CSV header naming a column twice",
         cli=(_train("dup_header.csv"), 2,
              ("dup_header.csv", "'doc'", "more than once", "Rename")),
         library=(lambda e: data.read_table(e.file("dup_header.csv")), DataError,
                  ("dup_header.csv", "'doc'", "columns [2, 4]"))),
    Case("Parquet list column as the text",
         cli=(_train("lists.parquet"), 2,
              ("lists.parquet", "'doc'", "holds lists", "join")),
         library=(lambda e: data.to_feature_arrays(
             data.read_table(e.file("lists.parquet")), [TextFeature("doc")], "docs"),
             DataError, ("docs column 'doc'", "holds lists", "data row 1", "join"))),
    Case("NaN number in a request",
         grpc=(lambda e: predict_request("towers", "query", user_inputs(
             e, k=None, age=np.array([30.0, np.nan], np.float32))),
             "INVALID_ARGUMENT", ('"age"', "NaN or infinite", "[1]")),
         rest=("POST", "/v1/models/towers:predict",
               lambda e: rest_rows(e, signature="query", k=None, age=float("nan")),
               400, ('"age"', "NaN or infinite"))),
    Case("null text in a request",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, user_id=None), 400,
               ('"user_id"', "null", 'send ""'))),
    # ------------------------------------------------------------- encoding
    Case("non-UTF-8 file",
         cli=(_train("latin.csv"), 2, ("latin.csv", "UTF-8", "iconv")),
         library=(lambda e: data.read_table(e.file("latin.csv")), DataError,
                  ("latin.csv", "UTF-8"))),
    Case("non-UTF-8 bytes in a request are replaced (U+FFFD)",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, occupation=[b"\xff\xfe caf\xe9", b"\xed\xa0\x80"])), OK, ()),
         rest=("POST", "/v1/models/towers:predict",
               lambda e: b'{"signature_name": "query", "inputs": ' + json.dumps(
                   {**e.users(1), "occupation": [{"b64": "//4="}]}).encode() + b"}",
               200, ())),
    Case("lone surrogate in JSON",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e).replace(b'"gender": "', b'"gender": "\\ud800', 1),
               200, ())),
    Case("non-UTF-8 request body",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e).replace(b'"gender": "', b'"gender": "\xff', 1),
               400, ("not valid JSON", "utf-8"))),
    # ------------------------------------------------------- strings, sizes
    Case("empty and whitespace-only strings",
         library=(_empty_texts, None, ()),
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, user_id=["", "   \t "], occupation=["", "\n"])), OK, ()),
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, 2, user_id=" ", zip_prefix=""), 200, ())),
    Case("1 MB text under the request limit",
         library=(_megabyte_text, None, ()),
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, rows=1, occupation=["x" * MB])), OK, ()),
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, occupation="y" * MB), 200, ())),
    Case("request over the size limit",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, rows=1, occupation=["x" * (MAX_BYTES + 1)])),
             "RESOURCE_EXHAUSTED", ("larger than max",)),
         # The body is refused on its Content-Length, before it is read.
         rest=("POST", "/v1/models/retrieval:predict", None, 413,
               (f"at most {MAX_BYTES}", "--max-request-bytes")),
         rest_headers={"Content-Length": str(MAX_BYTES + 1)}),
    # Over the limit: the body is read and dropped so the client sees the 413
    # (not a reset); with Expect: 100-continue the 413 comes before the body.
    Case("request body over the size limit, sent whole",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: b" " * (MAX_BYTES + 1), 413, (f"at most {MAX_BYTES}",))),
    Case("request over the size limit with Expect: 100-continue",
         rest=("POST", "/v1/models/retrieval:predict", None, 413,
               (f"at most {MAX_BYTES}",)),
         rest_headers={"Content-Length": str(50 * MAX_BYTES),
                       "Expect": "100-continue"}),
    Case("batch over the batch limit",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, rows=MAX_BATCH + 1)), "INVALID_ARGUMENT",
             (f"batch of {MAX_BATCH + 1} rows", f"maximum batch size {MAX_BATCH}",
              "--max-batch-size")),
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, MAX_BATCH + 1), 400,
               (f"maximum batch size {MAX_BATCH}",))),
    # A TensorProto's shape is filled by repeating its last value: a tiny
    # request may declare gigabytes. Shapes, rows and the expanded size are
    # checked before anything is expanded (peak RSS: test_reliability).
    Case("tensor declaring more elements than it carries",
         grpc=(lambda e: predict_request("retrieval", "top_k_exclude", user_inputs(
             e, rows=1, exclude=raw_tensor(types_pb2.DT_STRING, [1, 2**30],
                                           string_val=[b"x"]))),
             "INVALID_ARGUMENT",
             ('"exclude"', "1073741824 elements", "it carries 1",
              f"at most {MAX_BYTES} bytes", "--max-request-bytes"))),
    Case("numeric tensor declaring more rows than it carries",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, rows=1, k=raw_tensor(types_pb2.DT_INT32, [2**33], int_val=[3]))),
             "INVALID_ARGUMENT",
             ('"k"', "batch of 8589934592 rows", "--max-batch-size"))),
    Case("1 MiB string repeated over 5000 rows",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, rows=1, user_id=raw_tensor(types_pb2.DT_STRING, [5000],
                                           string_val=[b"u" * MB]))),
             "INVALID_ARGUMENT",
             ('"user_id"', "batch of 5000 rows", "--max-batch-size"))),
    Case("1 MiB string repeated within the batch limit",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, rows=MAX_BATCH, user_id=raw_tensor(types_pb2.DT_STRING, [MAX_BATCH],
                                                   string_val=[b"u" * MB]))),
             "INVALID_ARGUMENT",
             ('"user_id"', f"{MAX_BATCH} elements", "it carries 1",
              "--max-request-bytes"))),
    Case("1 MiB string repeated with the wrong rank",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, rows=1, user_id=raw_tensor(types_pb2.DT_STRING, [1, 5000],
                                           string_val=[b"u" * MB]))),
             "INVALID_ARGUMENT", ('"user_id"', "[1, 5000]", "string [batch]"))),
    Case("a short tensor repeated within the limits (TensorFlow's rule)",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, rows=2, k=raw_tensor(types_pb2.DT_INT32, [2], int_val=[3]))),
             OK, ())),
    Case("columnar batch over the batch limit",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: body({"signature_name": "top_k", "inputs": {
                   **{n: v * 5000 for n, v in e.users(1).items()}, "k": [3] * 5000}}),
               400, ("batch of 5000 rows", f"maximum batch size {MAX_BATCH}"))),
    # ------------------------------------------------ dtypes, shapes, protos
    Case("wrong dtype",
         library=(lambda e: _client(e, lambda c: c.predict(
             "towers", {**e.users(1), "age": ["thirty"]}, "query")),
             DataError, ("'age'", "float32")),
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, k=tensor([3.0, 3.0], tf.float32))), "INVALID_ARGUMENT",
             ('input "k"', "must be int32, received float32")),
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, k="5"), 400, ('"k"', "expects integers"))),
    Case("wrong shape",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, k=tensor([[3], [3]], tf.int32))), "INVALID_ARGUMENT",
             ('input "k"', "int32 [batch]", "[2, 1]")),
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: body({"signature_name": "top_k_exclude", "inputs": {
                   **e.users(2), "k": [1, 1], "exclude": [["1"], ["2", "3"]]}}),
               400, ('"exclude" is ragged', 'pad with ""'))),
    Case("scalar instead of a batch",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: body({"signature_name": "top_k", "inputs": {
                   n: v[0] for n, v in {**e.users(1), "k": [2]}.items()}}),
               400, ("must have shape", "received shape []"))),
    Case("malformed TensorProto",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, k=raw_tensor(types_pb2.DT_RESOURCE, [2]))), "INVALID_ARGUMENT",
             ('input "k"', "dtype resource"))),
    # TF reads a float32 tensor's values from float_val only: double_val was
    # read as zeros. Values in another dtype's field are refused.
    Case("float32 input sent in double_val",
         grpc=(lambda e: predict_request("towers", "query", user_inputs(
             e, k=None, age=raw_tensor(types_pb2.DT_FLOAT, [2],
                                       double_val=[30.0, 40.0]))),
               "INVALID_ARGUMENT", ('"age"', "float32", "double_val", "float_val",
                                    "tf.make_tensor_proto"))),
    Case("int32 input sent in int64_val",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, k=raw_tensor(types_pb2.DT_INT32, [2], int64_val=[3, 3]))),
               "INVALID_ARGUMENT", ('"k"', "int32", "int64_val", "int_val"))),
    Case("float64 tensor for a float32 input",
         grpc=(lambda e: predict_request("towers", "query", user_inputs(
             e, k=None, age=tensor([30.0, 40.0], tf.float64))),
               "INVALID_ARGUMENT", ('"age"', "must be float32, received float64"))),
    Case("more values than the shape holds",
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(
             e, k=raw_tensor(types_pb2.DT_INT32, [2], int_val=[3, 3, 3]))),
               "INVALID_ARGUMENT", ('"k"', "carries 3 values", "2 elements"))),
    Case("tensor bytes that do not fit the dtype",
         grpc=(lambda e: _with_content(predict_request("retrieval", "top_k",
                                                       user_inputs(e))),
               "INVALID_ARGUMENT", ('input "k"', "not a valid TensorProto"))),
    Case("number out of the dtype's range",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, k=2**40), 400,
               ('"k"', "out of the range of int32"))),
    # Python's int() refuses more than 4300 digits (ValueError): was a 500.
    Case("integer with thousands of digits in k",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, k=7).replace(b'"k": 7', b'"k": ' + b"9" * 5000),
               400, ('"k"', "5000 digits", "out of the range of int32"))),
    Case("integer with thousands of digits in a float input",
         rest=("POST", "/v1/models/towers:predict",
               lambda e: rest_rows(e, signature="query", k=None, age=7).replace(
                   b'"age": 7', b'"age": -' + b"9" * 5000), 400,
               ('"age"', "NaN or infinite"))),
    Case("integer with thousands of digits as an instance",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: b'{"signature_name": "top_k", "instances": [' + b"9" * 5000
               + b"]}", 400, ("instance 0", "5000 digits"))),
    Case("deeply nested JSON",
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: b'{"instances": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
               400, ("nested too deeply",))),
    Case("negative Content-Length",
         rest=("POST", "/v1/models/retrieval:predict", None, 400,
               ("bad Content-Length '-5'",)), rest_headers={"Content-Length": "-5"}),
    Case("no Content-Length",
         rest=("POST", "/v1/models/retrieval:predict", None, 400,
               ("no Content-Length",)), rest_headers={"Transfer-Encoding": "chunked"}),
    # ---------------------------------------------- model, version, signature
    Case("unknown model",
         cli=(_query_server("--model", "nope"), 2,
              ("argument --model", "invalid choice")),
         library=(lambda e: _client(e, lambda c: c.predict("nope", {}, "query")),
                  ServingError, ("NOT_FOUND", "nope")),
         grpc=(lambda e: predict_request("nope", "", user_inputs(e, k=None)),
               "NOT_FOUND", ("Latest(nope)", "'towers'")),
         rest=("POST", "/v1/models/nope:predict", lambda e: rest_rows(e), 404,
               ("Latest(nope)",))),
    Case("unknown version",
         library=(lambda e: export.load_towers(e.pairs_dir, version=9), ExportError,
                  ("version 9", "[1]")),
         grpc=(lambda e: predict_request("towers", "query", user_inputs(e, k=None),
                                         version=7),
               "NOT_FOUND", ("Specific(towers, 7)", "serves version 1")),
         rest=("POST", "/v1/models/towers/versions/7:predict",
               lambda e: rest_rows(e, signature="query", k=None), 404,
               ("Specific(towers, 7)",))),
    # TF Serving reads a version with safe_strto64: ASCII digits, int64.
    Case("version with leading zeros is that version",
         rest=("POST", "/v1/models/towers/versions/001:predict",
               lambda e: rest_rows(e, signature="query", k=None), 200, ())),
    Case("version that str.isdigit accepts but int does not",
         rest=("GET", "/v1/models/towers/versions/\u00b2", None, 400,
               ("Failed to convert version: \u00b2",))),
    Case("version with 5000 digits",
         rest=("POST", "/v1/models/towers/versions/" + "9" * 5000 + ":predict",
               lambda e: rest_rows(e, signature="query", k=None), 400,
               ("Failed to convert version", "5000 characters"))),
    Case("version above int64",
         rest=("GET", "/v1/models/towers/versions/99999999999999999999/metadata",
               None, 400, ("Failed to convert version: 99999999999999999999",))),
    Case("model config naming a model twice",
         cli=(lambda e: ["serve", "--export-dir", e.served_dir, "--grpc-port", "0",
                         "--rest-port", "0", "--model-config-file",
                         _duplicate_config(e)], 2,
              ("'towers'", "more than once", "entries 1 and 3")),
         library=(lambda e: Server(e.served_dir,
                                   model_config_file=_duplicate_config(e)),
                  ExportError, ("'towers'", "more than once"))),
    Case("version directories that are not versions",
         library=(_odd_version_dirs, None, ())),
    Case("unknown signature",
         library=(lambda e: _client(
             e, lambda c: c.predict("towers", e.users(1), "nope")),
                  ServingError, ("'nope'", "query")),
         grpc=(lambda e: predict_request("retrieval", "nope", user_inputs(e)),
               "FAILED_PRECONDITION", ('signature key "nope" not found', "top_k")),
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: rest_rows(e, signature="nope"), 400,
               ('signature key "nope" not found',))),
    # ----------------------------------------------------------- batches, k
    Case("empty batch",
         library=(lambda e: LocalRetriever(e.pairs_dir).top_k({"query": []}, k=2),
                  DataError, ("empty batch",)),
         grpc=(lambda e: predict_request("retrieval", "top_k", {
             n: v[:0] for n, v in user_inputs(e).items()}), "INVALID_ARGUMENT",
             ("empty batch", "0 rows")),
         rest=("POST", "/v1/models/retrieval:predict",
               lambda e: body({"signature_name": "top_k", "instances": []}), 400,
               ("empty batch",))),
    Case("k = 0",
         cli=(lambda e: ["query", "--export-dir", e.pairs_dir, "--k", "0", "kiwi"], 2,
              ("argument --k", "must be >= 1")),
         library=(lambda e: LocalRetriever(e.pairs_dir).top_k({"query": ["a"]}, k=0),
                  ConfigError, ("k must be between 1", "received 0")),
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(e, k=0)),
               "INVALID_ARGUMENT", ("k must be between 1 and max_k=50", "k = 0 0")),
         rest=("POST", "/v1/models/retrieval_brute_force:predict",
               lambda e: rest_rows(e, k=-1), 400, ("k must be between 1",))),
    Case("k larger than the corpus / max_k",
         cli=(lambda e: ["query", "--export-dir", e.pairs_dir, "--k", "11", "kiwi"], 2,
              ("corpus size 10", "received 11")),
         library=(lambda e: _client(e, lambda c: c.top_k(e.users(1), k=51)),
                  ServingError, ("INVALID_ARGUMENT", "max_k=50")),
         grpc=(lambda e: predict_request("retrieval", "top_k", user_inputs(e, k=2001)),
               "INVALID_ARGUMENT", ("max_k=50", "2001")),
         rest=("POST", "/v1/models/retrieval:predict", lambda e: rest_rows(e, k=51),
               400, ("max_k=50", "received k = 51"))),
    Case("k too large through tfdssm query --server",
         cli=(_query_server("--k", "999"), 2,
              ("INVALID_ARGUMENT", "k must be between 1 and max_k=50", "999"))),
    Case("exclude rows do not match the query rows",
         library=(lambda e: LocalRetriever(e.pairs_dir).top_k(
             {"query": ["a"]}, k=2, exclude=[["D1"], ["D2"]]), DataError,
             ("exclude has 2 rows for 1",))),
    Case("a long exclusion list is cheap",
         grpc=(lambda e: predict_request("retrieval", "top_k_exclude", user_inputs(
             e, rows=MAX_BATCH,
             exclude=[[str(i) for i in range(1000, 4000)]] * MAX_BATCH)),
             OK, ())),
    # ---------------------------------------------------------- candidates
    Case("duplicate candidate ids with different features",
         cli=(_train("dup_id.csv"), 2, ("dup_id.csv", "'D0'", "'doc_id'",
                                        "different values")),
         library=(_conflicting_corpus_export, DataError,
                  ("the corpus", "'doc_id'", "different values"))),
    Case("duplicate candidate rows are merged",
         library=(_duplicate_rows_export, None, ())),
    Case("duplicate ids given to an index builder",
         library=(_duplicate_ids_to_index, ExportError,
                  ("'a' appears twice", "rows 0 and 2", "unique_candidates"))),
    # ------------------------------------------------------- export dirs
    Case("directory that is not an export",
         cli=(lambda e: ["evaluate", "--export-dir", e.file("not_an_export"),
                         "--data", e.file("pairs.csv")], 2,
              ("not_an_export", "is not a tfdssm export", "--export-dir")),
         library=(lambda e: LocalRetriever(e.file("not_an_export")), ExportError,
                  ("not_an_export", "export.json not found"))),
    Case("query on a directory that is not an export",
         cli=(lambda e: ["query", "--export-dir", e.file("not_an_export"), "kiwi"], 2,
              ("is not a tfdssm export",))),
    Case("tflite on a directory that is not an export",
         cli=(lambda e: ["tflite", "--export-dir", e.file("not_an_export")], 2,
              ("is not a tfdssm export",))),
    Case("serve a directory with nothing to serve",
         cli=(lambda e: ["serve", "--export-dir", e.file("not_an_export"),
                         "--grpc-port", "0", "--rest-port", "0"], 2,
              ("nothing to serve", "not_an_export")),
         library=(lambda e: Server(e.file("not_an_export")), ExportError,
                  ("nothing to serve",))),
    Case("export dir that is a file",
         cli=(lambda e: ["serve", "--export-dir", e.file("a_file"), "--grpc-port", "0",
                         "--rest-port", "0"], 2, ("a_file", "is not a directory")),
         library=(lambda e: export.export_model(e.pairs_prepared.model,
                                                e.file("a_file")),
                  ExportError, ("a_file", "not a directory"))),
    # ----------------------------------- arguments checked up front (17.5)
    Case("train --export-dir naming an existing file",
         cli=(lambda e: [*_train("pairs.csv")(e)[:-len(TINY) - 2], "--export-dir",
                         e.file("a_file"), *TINY], 2,
              ("--export-dir", "a_file", "not a directory")),
         library=(lambda e: train.run(e.pairs_prepared, e.file("a_file")), ExportError,
                  ("a_file", "not a directory"))),
    Case("train --export-dir under a file",
         cli=(lambda e: [*_train("pairs.csv")(e)[:-len(TINY) - 2], "--export-dir",
                         e.file("a_file") / "sub", *TINY], 2,
              ("a_file", "is a file, not a directory"))),
    Case("absurd --max-length (out of memory)",
         cli=(_train("pairs.csv", "--max-length", "10000000"), 2,
              ("argument --max-length", "between 1 and 1,000,000", "10000000")),
         library=(lambda e: pairs.prepare(e.file("pairs.csv"), "query", "doc",
                                          max_length=10_000_000),
                  ConfigError, ("max_length", "1,000,000", "10000000", "1024"))),
    Case("absurd --max-length (overflow)",
         cli=(_train("pairs.csv", "--max-length", "100000000000000000000"), 2,
              ("argument --max-length", "between 1 and 1,000,000")),
         library=(lambda e: pairs.prepare(e.file("pairs.csv"), "query", "doc",
                                          max_length=10**20),
                  ConfigError, ("max_length", "100000000000000000000"))),
    Case("batch size x max_length beyond memory",
         cli=(_train("pairs.csv", "--max-length", "1000000", "--batch-size",
                     "100000"), 2, ("GiB", "available", "--max-length")),
         library=(lambda e: train.run(e.pairs_prepared, e.file("out_mem"),
                                      batch_size=10**9),
                  ConfigError, ("batch size 1000000000", "GiB", "--batch-size"))),
    Case("half-written SavedModel",
         cli=(lambda e: ["query", "--export-dir", e.broken_dir, "kiwi"], 2,
              ("towers/1", "not a loadable SavedModel", "tfdssm train")),
         library=(lambda e: export.load_towers(e.broken_dir), ExportError,
                  ("towers/1", "not a loadable SavedModel"))),
    Case("bad serve arguments",
         cli=(lambda e: ["serve", "--export-dir", e.pairs_dir, "--max-batch-size", "0"],
              2, ("argument --max-batch-size", "must be >= 1"))),
    # ---------------------------------------------------- path traversal
    Case("model name with path traversal",
         cli=(_query_server("--model", "../x"), 2, ("argument --model",)),
         library=(_resolve("..", "..", "etc"), ServingError,
                  ("Latest(../../etc)", "has the models")),
         grpc=(lambda e: predict_request("../../etc/passwd", "",
                                         user_inputs(e, k=None)),
               "NOT_FOUND", ("Latest(../../etc/passwd)",)),
         rest=("GET", "/v1/models/..%2F..%2Fetc", None, 404,
               ("..%2F..%2Fetc",))),
    Case("path traversal in a REST path",
         rest=("GET", "/v1/models/../../etc/passwd", None, 400,
               ("Malformed request",))),
    Case("path traversal in a REST version",
         rest=("POST", "/v1/models/towers/versions/..%2F..%2F1:predict",
               lambda e: rest_rows(e, signature="query", k=None), 400,
               ("Failed to convert version",))),
    Case("path traversal in a REST model for predict",
         rest=("POST", "/v1/models/..%2Ftowers:predict",
               lambda e: rest_rows(e, signature="query", k=None), 404,
               ("Latest(..%2Ftowers)",))),
]


def _with_content(request: predict_pb2.PredictRequest) -> predict_pb2.PredictRequest:
    """``k`` with 3 bytes of ``tensor_content`` for two int32 values."""
    request.inputs["k"].CopyFrom(raw_tensor(types_pb2.DT_INT32, [2]))
    request.inputs["k"].tensor_content = b"\x01\x02\x03"
    return request


def _cases(surface: str) -> list:
    return [pytest.param(c, id=c.id) for c in CASES if getattr(c, surface)]


def test_the_table_covers_every_surface():
    assert len(CASES) >= 45
    for surface in ("cli", "library", "grpc", "rest"):
        assert len(_cases(surface)) >= 12, surface


# --------------------------------------------------------------------------- #
# The surfaces
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case", _cases("cli"))
def test_cli(case: Case, env: Env):
    make_argv, want_code, fragments = case.cli
    argv = make_argv(env)
    code, out, err = run_cli(argv)
    assert code == want_code, (argv, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    if lines and lines[-1].startswith("tfdssm: error: "):  # ours: one line, last
        assert sum(line.startswith("tfdssm: error") for line in lines) == 1, err
    else:  # argparse: usage, then "tfdssm <command>: error: argument ..."
        assert re.match(r"tfdssm( \w+)?: error: argument ", lines[-1]), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    if argv[0] == "train":  # a failed train leaves no export dir (nor a file's)
        target = pathlib.Path(argv[len(argv) - 1 - argv[::-1].index("--export-dir") + 1])
        assert not target.exists() or target == env.file("a_file")


@pytest.mark.parametrize("case", _cases("library"))
def test_library(case: Case, env: Env):
    call, want, fragments = case.library
    if want is None:
        call(env)
        return
    assert issubclass(want, TfdssmError)
    with pytest.raises(want) as caught:
        call(env)
    assert isinstance(caught.value, TfdssmError)
    message = str(caught.value)
    assert "Traceback" not in message and "\n" not in message.strip(), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def _good_grpc(stub, env: Env) -> None:
    response = stub.Predict(predict_request("retrieval", "top_k",
                                            user_inputs(env, rows=1, k=2)), timeout=30)
    assert tf.make_ndarray(response.outputs["ids"]).shape == (1, 2)


@pytest.fixture(scope="module")
def stub(env):
    channel = grpc.insecure_channel(
        env.grpc_target, options=[("grpc.max_send_message_length", -1)])
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("case", _cases("grpc"))
def test_grpc(case: Case, env: Env, stub):
    make_request, want, fragments = case.grpc
    request = make_request(env)
    if want == OK:
        response = stub.Predict(request, timeout=60)
        for output in response.outputs.values():
            array = tf.make_ndarray(output)
            assert array.size and (array.dtype == object or np.isfinite(array).any())
    else:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, timeout=60)
        details = caught.value.details()
        assert caught.value.code().name == want, details
        assert "Traceback" not in details
        for fragment in fragments:
            assert fragment in details, (fragment, details)
    _good_grpc(stub, env)  # the server keeps serving


@pytest.mark.parametrize("case", _cases("rest"))
def test_rest(case: Case, env: Env):
    method, path, make_body, want, fragments = case.rest
    port = env.server.rest_port
    payload = None if make_body is None else make_body(env)
    status, answer = http(port, method, path, payload, case.rest_headers)
    assert status == want, answer
    if want == 200:
        assert "predictions" in answer or "outputs" in answer
    else:
        assert set(answer) == {"error"}
        for fragment in fragments:
            assert fragment in answer["error"], (fragment, answer["error"])
    status, answer = http(port, "POST", "/v1/models/retrieval:predict",
                          rest_rows(env, k=2))
    assert status == 200 and len(answer["predictions"][0]["ids"]) == 2


# --------------------------------------------------------------------------- #
# Properties behind the rows above
# --------------------------------------------------------------------------- #

_AWKWARD = st.sampled_from(
    ["a", "e", "\u0301", "\u0300", "\u1100", "\u1161", "\u11a8", "\ufb01", "ß", " ",
     "\ud800", "\x00", "\uff21", "\u0344", "ǅ", "\u0345", "İ", "\U0001f600", "\n"])


@settings(max_examples=150, deadline=None)
@given(text=st.lists(_AWKWARD, max_size=400).map("".join),
       tail=st.binary(max_size=40), max_length=st.integers(1, 16))
def test_long_texts_are_cut_before_decoding_without_changing_the_result(
        text, tail, max_length):
    """The in-graph byte cut (``prefix_bytes``) never changes the first
    ``max_length`` normalised code points, whatever follows (combining marks,
    Hangul jamo, expansions, invalid UTF-8)."""
    normalizer = TextNormalizer()
    raw = text.encode("utf-8", "surrogatepass") + tail
    assert len(raw) <= 2000 or prefix_bytes(max_length) < len(raw)
    want = normalize_code_points_py(raw)[:max_length]
    want += [0] * (max_length - len(want))
    got = normalizer(tf.constant([raw]), max_length).numpy()[0].tolist()
    assert got == want


def test_a_64_mb_text_costs_what_a_short_one_does():
    normalizer = TextNormalizer()
    big = tf.constant([b"word " * (64 * MB // 5)])
    normalizer(tf.constant([b"warm up"]), 256)
    start = time.perf_counter()
    out = normalizer(big, 256)
    assert time.perf_counter() - start < 2.0  # was 22 s and 5 GB before the cut
    assert out.numpy()[0, :5].tolist() == [ord(c) for c in "word "]


def test_exclusion_is_exact_and_linear():
    """``index.excluded``: exact membership (no false positives), and a request
    with 3000 exclusions per row costs milliseconds, not seconds."""
    rng = np.random.default_rng(0)
    ids = np.array([[f"id{i}" for i in rng.integers(0, 500, 40)] for _ in range(8)],
                   dtype=object)
    exclude = np.array([[f"id{i}" for i in rng.integers(0, 500, 30)] + ["", ""]
                        for _ in range(8)], dtype=object)
    got = index.excluded(tf.constant(ids), tf.constant(exclude)).numpy()
    want = [[i in set(row_ex) - {""} for i in row] for row, row_ex in zip(
        ids, exclude, strict=True)]
    assert got.tolist() == want
    assert index.excluded(tf.constant(ids), tf.zeros([8, 0], tf.string)).numpy(
        ).sum() == 0
    many = tf.constant([[f"x{i}" for i in range(3000)]] * 64)
    retrieved = tf.constant([[f"x{i}" for i in range(0, 6000, 2)]] * 64)
    start = time.perf_counter()
    hits = index.excluded(retrieved, many).numpy()
    assert time.perf_counter() - start < 2.0
    assert hits[:, :1500].all() and not hits[:, 1500:].any()


def test_one_megabyte_cell_trains(pairs_frame):
    frame = pairs_frame(60)
    frame.loc[0, "query"] = "apple " * (MB // 6)
    prepared = pairs.prepare(frame, "query", "doc", "doc_id", num_buckets=500,
                             hidden=(16,), dim=8)
    result = train.run(prepared, None, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(result["history"]["loss"]).all()
    assert result["metrics"]["num_candidates"] == 10


# --------------------------------------------------------------------------- #
# Path traversal never touches the file system outside the export
# --------------------------------------------------------------------------- #

_FS_EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.remove",
              "os.rmdir", "os.rename", "shutil.rmtree", "os.chdir", "glob.glob"}
_SEEN: list | None = None


def _audit(event: str, args: tuple) -> None:
    if _SEEN is not None and event in _FS_EVENTS and args:
        _SEEN.append((event, args[0]))


sys.addaudithook(_audit)


def test_path_traversal_touches_nothing_outside_the_export(env, stub):
    global _SEEN
    root = env.served_dir.resolve()
    users = user_inputs(env, k=None)
    _SEEN = []
    try:
        for name in ("../x", "../../etc/passwd", "/etc/passwd", "..", ".",
                     "towers/../../x", "%2e%2e%2fx"):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(predict_request(name, "query", users), timeout=30)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, name
        for path in ("/v1/models/..%2F..%2Fetc", "/v1/models/%2e%2e",
                     "/v1/models/..%2F..%2Fetc/metadata",
                     "/v1/models/towers/versions/..%2F1"):
            status, _ = http(env.server.rest_port, "GET", path)
            assert status in (400, 404), path
    finally:
        seen, _SEEN = _SEEN, None
    for event, target in seen:
        if isinstance(target, int):
            continue  # a file descriptor
        path = pathlib.Path(os.fsdecode(target)).resolve()
        assert path.is_relative_to(root), (event, str(path))


# --------------------------------------------------------------------------- #
# Expanded sizes and Expect: 100-continue (issue 17)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", sorted(
    __import__("tfdssm.serving.predict", fromlist=["x"]).VALUE_FIELDS))
def test_every_dtype_is_bounded_before_it_is_expanded(dtype: str):
    """For each dtype a request may carry: one value declaring 2**36 elements is
    refused at once naming the limit; a short repeat within it expands as
    TensorFlow expands it; a value in another dtype's field is refused."""
    from tfdssm.serving.predict import VALUE_FIELDS, tensors_from_protos

    tf_dtype = tf.as_dtype(dtype)
    field = VALUE_FIELDS[dtype]
    value = {"string_val": b"ab", "bool_val": True, "half_val": 15360,
             "float8_val": 56}.get(field, 1)
    values = [value, value] if field in ("scomplex_val", "dcomplex_val") else [value]
    huge = raw_tensor(tf_dtype.as_datatype_enum, [64, 2**30], **{field: values})
    start = time.perf_counter()
    with pytest.raises(ServingError, match="--max-request-bytes") as caught:
        tensors_from_protos({"x": huge}, max_bytes=MAX_BYTES, max_batch_size=MAX_BATCH)
    assert time.perf_counter() - start < 0.5
    assert '"x"' in str(caught.value) and "68719476736 elements" in str(caught.value)
    small = raw_tensor(tf_dtype.as_datatype_enum, [2, 3], **{field: values})
    got = tensors_from_protos({"x": small}, max_bytes=MAX_BYTES)["x"].numpy()
    want = tf.make_ndarray(small)  # quantized / float8 dtypes: compare bytes
    assert got.shape == want.shape == (2, 3)
    assert got.tolist() == want.tolist() if dtype == "string" else (
        got.tobytes() == want.tobytes())
    other = "int64_val" if field != "int64_val" else "int_val"
    foreign = raw_tensor(tf_dtype.as_datatype_enum, [2], **{other: [1, 2]})
    with pytest.raises(ServingError, match=f"{other}.*{field}"):
        tensors_from_protos({"x": foreign})


def _exchange_with_expect(port: int, payload: bytes, length: int | None = None):
    """Sends the head with ``Expect: 100-continue``, reads the interim answer,
    then (after a 100) the body: ``(interim status line, final status, body)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/models/retrieval:predict HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {length or len(payload)}\r\nExpect: 100-continue\r\n"
            "Connection: close\r\n\r\n".encode())
        first = b""
        while b"\r\n\r\n" not in first:
            chunk = sock.recv(1 << 16)
            assert chunk, first
            first += chunk
        interim, _, rest = first.partition(b"\r\n\r\n")
        if not interim.startswith(b"HTTP/1.1 100"):
            answer = first
        else:
            sock.sendall(payload)
            answer = rest
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, data = answer.partition(b"\r\n\r\n")
    return interim.split(b"\r\n")[0], int(head.split()[1]), json.loads(data)


def test_expect_100_continue_is_answered_before_the_body(env):
    port = env.server.rest_port
    start = time.perf_counter()
    interim, status, answer = _exchange_with_expect(port, rest_rows(env, k=2))
    assert interim == b"HTTP/1.1 100 Continue"
    assert status == 200 and len(answer["predictions"][0]["ids"]) == 2
    assert time.perf_counter() - start < 1.0  # curl waited 1 s for the 100
    interim, status, answer = _exchange_with_expect(port, b"", 10 * MAX_BYTES)
    assert status == 413 and f"at most {MAX_BYTES}" in answer["error"]
