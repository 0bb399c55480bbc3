"""Tests for tfdssm.client (the official stubs, wrapped) and `tfdssm query --server`."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import io
import pathlib
import re
import socket

import numpy as np
import pytest
import scann  # noqa: F401 - registers ScaNN's ops for loading `retrieval` in-process
import tensorflow as tf
from serving_helpers import running_server, trained_export, user_features

from tfdssm import cli
from tfdssm.client import Client
from tfdssm.errors import DataError, ServingError


@pytest.fixture(scope="module")
def exported():
    export_dir, prepared, _ = trained_export()
    return pathlib.Path(export_dir), prepared


@pytest.fixture(scope="module")
def client(exported):
    with running_server(exported[0], rest_port=None) as server:
        with Client(f"127.0.0.1:{server.grpc_port}", timeout=30) as connected:
            yield connected


@pytest.fixture(scope="module")
def direct(exported):
    return {name: tf.saved_model.load(str(exported[0] / name / "1"))
            for name in ("towers", "retrieval", "retrieval_brute_force")}


def _feed(features: dict) -> dict[str, tf.Tensor]:
    return {k: tf.constant(v, tf.float32 if k == "age" else tf.string)
            for k, v in features.items()}


def test_top_k_matches_the_savedmodels(client, direct, exported):
    users = user_features(exported[1], 3)
    for model in ("retrieval", "retrieval_brute_force"):
        ids, scores = client.top_k(users, k=7, model=model)
        want = direct[model].signatures["top_k"](**_feed(users),
                                                 k=tf.constant([7, 7, 7]))
        assert ids.shape == scores.shape == (3, 7) and scores.dtype == np.float32
        assert ids.tolist() == [[b.decode() for b in r] for r in want["ids"].numpy()]
        np.testing.assert_allclose(scores, want["scores"].numpy(), atol=1e-6)


def test_top_k_converts_types_from_the_signature(client, exported):
    users = user_features(exported[1], 2)
    as_text = {k: [str(v) for v in values] for k, values in users.items()}
    as_ints = {**users, "age": [int(a) for a in users["age"]]}
    ids_text, _ = client.top_k(as_text, k=3)   # "30.0" -> float32 30.0
    ids_int, _ = client.top_k(as_ints, k=3)
    ids, _ = client.top_k(users, k=3)
    assert ids_text.tolist() == ids.tolist()
    assert ids_int.shape == (2, 3)


def test_exclude_shared_and_per_row(client, exported):
    users = user_features(exported[1], 2)
    ids, _ = client.top_k(users, k=10)
    shared, _ = client.top_k(users, k=10, exclude=[ids[0][0], ids[1][0]])
    assert ids[0][0] not in shared[0] and ids[1][0] not in shared[1]
    per_row, _ = client.top_k(users, k=10, exclude=[[ids[0][1]], []])
    assert per_row[0].tolist() == [i for i in ids[0] if i != ids[0][1]] + [
        per_row[0][-1]]
    assert per_row[1].tolist() == ids[1].tolist()
    with pytest.raises(DataError, match="exclude has 3 rows for 2 query rows"):
        client.top_k(users, k=3, exclude=[["a"], ["b"], ["c"]])


def test_embed_matches_the_towers(client, direct, exported):
    _, prepared = exported
    users = user_features(prepared, 2)
    vectors = client.embed(users)
    want = direct["towers"].signatures["query"](**_feed(users))["embedding"].numpy()
    np.testing.assert_allclose(vectors, want, atol=1e-6)
    movies = {c: prepared.corpus[c].astype(str).head(3).tolist()
              for c in ("movie_id", "title", "genres", "year")}
    assert client.embed(movies, side="candidate").shape == (3, 16)
    with pytest.raises(DataError, match="side must be"):
        client.embed(movies, side="doc")


def test_status_inputs_and_errors(client, exported):
    assert client.status("towers") == [(1, "AVAILABLE")]
    assert client.query_inputs("retrieval") == {
        "user_id": tf.string, "age": tf.float32, "gender": tf.string,
        "occupation": tf.string, "zip_prefix": tf.string}
    users = user_features(exported[1], 1)
    with pytest.raises(ServingError, match="INVALID_ARGUMENT: k must be between") as e:
        client.top_k(users, k=51)
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ServingError, match="NOT_FOUND") as e:
        client.top_k(users, k=1, model="nope")
    with pytest.raises(DataError, match=r"missing \['age'\]"):
        client.predict("towers", {k: v for k, v in users.items() if k != "age"},
                       "query")
    with pytest.raises(DataError, match="same number of values"):
        client.top_k({**users, "age": [1.0, 2.0]}, k=1)
    with pytest.raises(DataError, match="exactly one query input"):
        client.query_features({}, ["some text"])
    with pytest.raises(DataError, match=r"missing \['gender'"):
        client.query_features({k: v for k, v in users.items() if k != "gender"})
    assert client.top_k(users, k=2)[0].shape == (1, 2)  # still serving


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_a_clear_error():
    with Client(f"127.0.0.1:{_free_port()}", timeout=2) as client:
        with pytest.raises(ServingError, match="cannot reach a model server") as e:
            client.status("towers")
    assert e.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def _run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_query_server_prints_ranked_ids(client, exported):
    users = user_features(exported[1], 1)
    flags = [f"--feature={k}={v[0]}" for k, v in users.items()]
    code, out, err = _run_cli(["query", "--server", client.target, "--k", "5",
                               "--exclude", "1", *flags])
    assert code == 0, err
    rows = re.findall(r"^\s*(\d+)\. (\S+)\s+(-?\d+\.\d{4})$", out, re.M)
    ids, scores = client.top_k(users, k=5, exclude=["1"])
    assert [r[1] for r in rows] == ids[0].tolist()
    assert [float(r[2]) for r in rows] == pytest.approx(scores[0], abs=1e-4)
    assert out.startswith("# user_id=")
    code, _, err = _run_cli(["query", "--server", client.target, "some text"])
    assert code == 2 and "exactly one query input" in err
    code, _, err = _run_cli(["query", "--server", client.target, "--k", "60", *flags])
    assert code == 2 and "k must be between 1 and max_k=50" in err
    with pytest.raises(SystemExit):  # --server and --export-dir are exclusive
        _run_cli(["query", "--server", client.target, "--export-dir", "x", *flags])


def test_a_rest_port_gets_a_hint_not_just_an_http2_error():
    """gRPC sent to an HTTP/1.1 server (TF Serving's REST port, 8501) fails with
    'Failed parsing HTTP/2'; the error says it is the REST port and where gRPC is."""
    import http.server  # noqa: PLC0415
    import threading  # noqa: PLC0415

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # noqa: D401 - keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        target = f"127.0.0.1:{server.server_address[1]}"
        code, out, err = _run_cli(["query", "--server", target, "--timeout", "5",
                                   "--feature", "user_id=1"])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 2 and out == ""
    assert "Failed parsing HTTP/2" in err, err
    assert "this looks like the REST port (HTTP/1.1); gRPC is on port" in err
    assert "default 8500" in err and len(err.strip().splitlines()) == 1
