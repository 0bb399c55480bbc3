"""TF Serving's REST API over a :class:`~tfdssm.serving.models.ModelManager`.

Endpoints (paths case-insensitive, as TF Serving's):

* ``GET  /v1/models/NAME[/versions/V]``: model status, e.g.
  ``{"model_version_status": [{"version": "1", "state": "AVAILABLE",
  "status": {"error_code": "OK", "error_message": ""}}]}``;
* ``GET  /v1/models/NAME[/versions/V]/metadata``: ``{"model_spec": ...,
  "metadata": {"signature_def": {"signature_def": {...}}}}``;
* ``POST /v1/models/NAME[/versions/V]:predict``: see
  :mod:`tfdssm.serving.json_codec`;
* ``GET  /monitoring/prometheus/metrics`` (the path of the monitoring config,
  when it enables Prometheus): :mod:`tfdssm.serving.metrics` in Prometheus'
  text format.

Errors are ``{"error": "..."}`` with TF Serving's HTTP codes (400 for
``INVALID_ARGUMENT`` and ``FAILED_PRECONDITION``, 404 ``NOT_FOUND``, 413 for a
body over the size limit, 501 ``UNIMPLEMENTED``, 503 ``UNAVAILABLE``). Each
connection serves one request (HTTP/1.0 style), so shutting down drains cleanly.

A body over ``--max-request-bytes`` is answered 413 without being kept: with
``Expect: 100-continue`` the 413 comes before the body is sent (and a body
within the limit gets ``100 Continue`` at once, so curl does not wait a
second); without it, the body is read and discarded (up to
:data:`MAX_DISCARD_BYTES`, in small chunks) so that a client that sends the
whole body before reading sees the 413 rather than a reset connection.

Stopping (:meth:`RestServer.stop_accepting`, then ``server_close``) loses no
request that reached the server: the connections waiting in the listener's
queue when the stop comes (the accept loop may lag behind under load) are
accepted and served like the others, later ones are answered 503 ("shutting
down"; safe to retry), then the listener closes (later connections are
refused) and ``server_close`` waits for the requests being served.
"""

from __future__ import annotations

import http.server
import logging
import re
import socket
import threading
import time
from typing import Any

from google.protobuf import json_format

from tfdssm.errors import ServingError
from tfdssm.export.versioning import parse_version
from tfdssm.serving import batching, grpc_server, json_codec, predict
from tfdssm.serving import metrics as metrics_lib
from tfdssm.serving.models import ModelManager

LOG = logging.getLogger("tfdssm.serving")
HTTP_CODES = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
              "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501,
              "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499,
              "REQUEST_TOO_LARGE": 413}
MAX_DISCARD_BYTES = 64 * 1024 * 1024  # most of an oversized body read to answer 413
_DISCARD_SECONDS = 10.0  # and for how long
_DISCARD_IDLE_SECONDS = 1.0  # and how long to wait for more of it
_CHUNK = 64 * 1024
_MODEL = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
_LABEL = re.compile(r"(?i)/v1/models/[^/:]+/labels/")
_STATUS = re.compile(rf"(?i){_MODEL}/?")
_METADATA = re.compile(rf"(?i){_MODEL}/metadata")
_METHOD = re.compile(rf"(?i){_MODEL}:(?P<method>predict|classify|regress)")


class RestServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server that joins its handler threads on close."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128  # connections the listener queues (the default is 5)

    def __init__(self, address: tuple[str, int], manager: ModelManager,
                 max_body_bytes: int,
                 max_batch_size: int | None = predict.DEFAULT_MAX_BATCH_SIZE,
                 batcher: batching.Batcher | None = None,
                 metrics: metrics_lib.Metrics | None = None,
                 metrics_path: str | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.manager = manager
        self.batcher = batcher
        self.metrics = metrics or metrics_lib.Metrics()
        self.metrics_path = metrics_path  # None: no metrics endpoint
        self.max_body_bytes = int(max_body_bytes)
        self.max_batch_size = max_batch_size
        self.draining = False  # set by stop_accepting: connections now are late
        self.late: set[socket.socket] = set()  # accepted late: answered 503
        super().__init__(address, _Handler)

    def stop_accepting(self, deadline: float) -> None:
        """Stops the accept loop and closes the listener, losing no connection.

        Connections queued in the listener before this call are served as
        usual; ones queued after it are answered 503; then the listener closes
        (later connections are refused). To tell them apart, this connects to
        the listener itself: the queue is first in, first out.

        Args:
            deadline: ``time.monotonic()`` after which queued connections are
                no longer waited for.
        """
        self.shutdown()  # serve_forever returns
        try:
            marker = (self._connect_to_self(deadline)
                      if deadline > time.monotonic() else None)
            if marker is not None:
                with marker:
                    self._accept_until(marker.getsockname(), deadline)
            else:  # no marker: whatever is queued now came first
                self._accept_queued()
            self.draining = True
            self._accept_queued()
        finally:
            self.socket.close()

    def _connect_to_self(self, deadline: float) -> socket.socket | None:
        host, port = self.server_address[:2]
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        try:
            return socket.create_connection(
                (host, port), timeout=max(0.1, deadline - time.monotonic()))
        except OSError as error:
            LOG.warning("tfdssm serve: REST cannot connect to itself (%s); serving "
                        "the connections queued now, refusing later ones", error)
            return None

    def _accept_until(self, marker: tuple, deadline: float) -> None:
        """Accepts and serves connections up to the one from ``marker``."""
        while (remaining := deadline - time.monotonic()) > 0:
            self.socket.settimeout(min(remaining, 1.0))
            try:
                request, address = self.get_request()
            except (TimeoutError, ConnectionAbortedError):
                continue
            except OSError as error:
                LOG.warning("tfdssm serve: REST cannot accept (%s); refusing the "
                            "queued connections", error)
                return
            if tuple(address[:2]) == tuple(marker[:2]):
                request.close()
                return
            self._serve(request, address)
        LOG.warning("tfdssm serve: grace period over before every queued REST "
                    "connection was accepted; the rest are refused")

    def _accept_queued(self, limit: int = 1024) -> None:
        """Accepts and serves (or refuses, once draining) what is queued now."""
        self.socket.setblocking(False)
        for _ in range(limit):
            try:
                request, address = self.get_request()
            except OSError:  # BlockingIOError: none left
                return
            self._serve(request, address)

    def _serve(self, request: socket.socket, address: Any) -> None:
        """``socketserver``'s handling of an accepted connection (a thread)."""
        request.setblocking(True)
        if self.draining:  # decided now: the handler thread may start later
            self.late.add(request)
        if not self.verify_request(request, address):
            self.shutdown_request(request)
            return
        try:
            self.process_request(request, address)
        except Exception:  # noqa: BLE001 - as socketserver: log, close, go on
            self.handle_error(request, address)
            self.shutdown_request(request)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RestServer
    server_version = "tfdssm-serve"
    timeout = 30  # seconds a client may take to send a request

    def parse_request(self) -> bool:
        """``BaseHTTPRequestHandler.parse_request``, plus ``Expect: 100-continue``
        (which the base class honours for HTTP/1.1 servers only)."""
        if not super().parse_request():
            return False
        expect = self.headers.get("Expect", "").strip().lower()
        if expect != "100-continue" or self.request_version < "HTTP/1.1":
            return True
        if self.request in self.server.late:
            self._send(503, {"error": grpc_server.SHUTTING_DOWN})
            return False
        try:
            self._body_size()
        except ServingError as error:  # the final answer now: no body will come
            self._send(HTTP_CODES.get(error.code, 400), {"error": str(error)})
            return False
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.wfile.flush()
        return True

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _dispatch(self, handler: Any) -> None:
        path = self.path.split("?", 1)[0]
        if self.request in self.server.late:  # arrived after the stop: never run
            if self.command == "POST":
                self._discard_body()
            self._send(503, {"error": grpc_server.SHUTTING_DOWN})
            return
        try:
            status, body = handler(path)
        except ServingError as error:
            status, body = HTTP_CODES.get(error.code, 500), {"error": str(error)}
        except Exception as error:  # noqa: BLE001 - answer, log, keep serving
            LOG.exception("tfdssm serve: internal error on %s %s", self.command, path)
            status, body = 500, {"error": f"internal error: {error}"}
        self._send(status, body)

    def _get(self, path: str) -> tuple[int, Any]:
        manager = self.server.manager
        if self.server.metrics_path is not None and path == self.server.metrics_path:
            return 200, _Text(self.server.metrics.render(), metrics_lib.CONTENT_TYPE)
        if _LABEL.match(path):
            raise ServingError("tfdssm serve has no version labels; use "
                               "/versions/<number> or no version (the newest).")
        match = _METADATA.fullmatch(path)
        if match:
            servable = manager.get(match["name"], _version(match["version"]))
            response = grpc_server.metadata_response(servable)
            return 200, metadata_json(response)
        match = _STATUS.fullmatch(path)
        if match:
            response = grpc_server.status_response(
                manager, match["name"], _version(match["version"]))
            return 200, json_format.MessageToDict(
                response, preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True)
        raise _malformed(self.command, path)

    def _post(self, path: str) -> tuple[int, Any]:
        if _LABEL.match(path):
            raise ServingError("tfdssm serve has no version labels; use "
                               "/versions/<number> or no version (the newest).")
        match = _METHOD.fullmatch(path)
        if not match:
            raise _malformed(self.command, path)
        if match["method"].lower() != "predict":
            raise ServingError(f"tfdssm serve implements :predict only, not "
                               f":{match['method']}.", "UNIMPLEMENTED")
        start = time.perf_counter()
        version: int | str = match["version"] or ""
        signature, status = predict.DEFAULT_SIGNATURE, "OK"
        try:
            request = json_codec.parse_body(self._read_body())
            servable = self.server.manager.get(match["name"],
                                               _version(match["version"]))
            version = servable.version
            signature = request.get("signature_name") or signature  # a str: checked
            signature_def = predict.find_signature(servable.signature_defs, signature,
                                                   servable.name)
            inputs, fmt = json_codec.request_inputs(
                request, predict.input_specs(signature_def), self.server.max_batch_size)
            outputs = batching.run(self.server.batcher, servable, signature, inputs,
                                   max_batch_size=self.server.max_batch_size)
            return 200, json_codec.response_body(outputs, fmt)
        except ServingError as error:
            status = error.code if error.code in HTTP_CODES else "INVALID_ARGUMENT"
            status = "RESOURCE_EXHAUSTED" if status == "REQUEST_TOO_LARGE" else status
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.server.metrics.request(match["name"], version, signature, status,
                                        "REST", (time.perf_counter() - start) * 1e6)

    def _body_size(self) -> int:
        """The Content-Length, checked against the limit (nothing is read).

        Raises:
            ServingError: no or a bad Content-Length (``INVALID_ARGUMENT``), or
                a body over ``--max-request-bytes`` (413).
        """
        length = self.headers.get("Content-Length")
        if length is None:
            raise ServingError("the request has no Content-Length header; send the "
                               "JSON body with a length.", "INVALID_ARGUMENT")
        text = length.strip()
        size = int(text) if text.isascii() and text.isdigit() and len(text) < 20 else -1
        if size < 0:
            raise ServingError(f"bad Content-Length {length[:40]!r}: send the body's "
                               "size in bytes.")
        if size > self.server.max_body_bytes:
            raise ServingError(
                f"the request body is {size} bytes; this server accepts at most "
                f"{self.server.max_body_bytes} (tfdssm serve --max-request-bytes). "
                "Send smaller batches.", "REQUEST_TOO_LARGE")
        return size

    def _read_body(self) -> bytes:
        try:
            size = self._body_size()
        except ServingError as error:
            if error.code == "REQUEST_TOO_LARGE":
                self._discard_body()
            raise
        return self.rfile.read(size)

    def _discard_body(self) -> None:
        """Reads and drops the body (up to :data:`MAX_DISCARD_BYTES`, 10 s, or
        1 s without data), so that closing does not reset the connection
        before the client has read the answer."""
        try:
            left = min(int(self.headers.get("Content-Length", "0")), MAX_DISCARD_BYTES)
        except ValueError:
            return
        deadline = time.monotonic() + _DISCARD_SECONDS
        try:
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                # A client that waits for the answer first sends nothing more.
                self.connection.settimeout(min(remaining, _DISCARD_IDLE_SECONDS))
                chunk = self.rfile.read1(min(left, _CHUNK))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:  # the idle timeout too
            pass

    def _send(self, status: int, body: Any) -> None:
        if isinstance(body, _Text):
            payload, content_type = body.text.encode("utf-8"), body.content_type
        else:
            payload, content_type = json_codec.dumps(body), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    def finish(self) -> None:
        super().finish()
        self.server.late.discard(self.request)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        LOG.debug("tfdssm serve REST: " + format, *args)


class _Text:
    """A non-JSON answer (the metrics)."""

    def __init__(self, text: str, content_type: str) -> None:
        self.text, self.content_type = text, content_type


def _version(text: str | None) -> int | None:
    """A path's version segment as TF Serving reads it (``007`` is 7).

    Raises:
        ServingError: ``INVALID_ARGUMENT`` for anything but a non-negative
            int64 in ASCII digits (``²``, 5,000 digits, ``-1``).
    """
    if text is None:
        return None
    number = parse_version(text)
    if number is None:
        shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
        raise ServingError(f"Failed to convert version: {shown} to numeric. A "
                           "version is a non-negative 64-bit integer in ASCII digits, "
                           "e.g. /versions/3.")
    return number


def _malformed(method: str, path: str) -> ServingError:
    return ServingError(
        f"Malformed request: {method} {path}. Use GET /v1/models/NAME[/metadata] or "
        "POST /v1/models/NAME[/versions/V]:predict.",
        "INVALID_ARGUMENT" if path.lower().startswith("/v1/") else "NOT_FOUND")


def metadata_json(response: Any) -> dict[str, Any]:
    """A ``GetModelMetadataResponse`` as TF Serving's REST metadata JSON."""
    from tensorflow_serving.apis import get_model_metadata_pb2  # noqa: PLC0415

    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    spec = response.model_spec
    return {
        "model_spec": {"name": spec.name, "signature_name": "",
                       "version": str(spec.version.value)},
        "metadata": {"signature_def": json_format.MessageToDict(
            signatures, preserving_proto_field_name=True)},
    }


def start_rest(
    manager: ModelManager, host: str = "127.0.0.1", port: int = 8501,
    max_body_bytes: int = 64 * 1024 * 1024,
    max_batch_size: int | None = predict.DEFAULT_MAX_BATCH_SIZE,
    batcher: batching.Batcher | None = None,
    metrics: metrics_lib.Metrics | None = None,
    metrics_path: str | None = None,
) -> tuple[RestServer, threading.Thread, int]:
    """Starts the REST server in a thread; returns it, the thread and the port.

    ``batcher`` merges concurrent predictions (``None``: each runs alone);
    ``metrics`` counts them and, with ``metrics_path``, is served there.

    Raises:
        ServingError: the address cannot be bound.
    """
    try:
        server = RestServer((host, port), manager, max_body_bytes, max_batch_size,
                            batcher, metrics, metrics_path)
    except OSError as error:
        raise ServingError(f"cannot listen for REST on {host}:{port} ({error}); choose "
                           "another --rest-port or stop the process using it.",
                           "UNAVAILABLE") from None
    thread = threading.Thread(target=server.serve_forever,
                              kwargs={"poll_interval": 0.2}, name="tfdssm-rest",
                              daemon=True)
    thread.start()
    return server, thread, server.server_address[1]
