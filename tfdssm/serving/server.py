"""``tfdssm serve``: gRPC + REST over every model of an export directory.

In a test or a notebook::

    with Server("saved_models/movielens", grpc_port=0, rest_port=0) as server:
        client = tfdssm.client.Client(f"127.0.0.1:{server.grpc_port}")

:func:`serve` runs until SIGTERM or SIGINT, then stops accepting requests, lets
in-flight ones finish (up to ``grace_seconds``) and exits.

What happens to a request on stop (:meth:`Server.stop`):

* Received before the stop (gRPC calls gRPC core holds but grpcio has not taken
  yet, and REST connections queued in the listener, included): it runs and is
  answered, unless ``grace_seconds`` pass first; then gRPC cancels it
  (``CANCELLED``) and a REST request still runs to its end.
* Received after: refused, never run. gRPC answers ``UNAVAILABLE``
  ("tfdssm serve is shutting down ...", which gRPC clients and load balancers
  retry), or, once the port has closed, the client's channel fails with
  ``UNAVAILABLE`` itself; REST answers 503, or the connection is refused. The
  one exception: a gRPC call reaching gRPC core in the instant its shutdown
  begins can still be cancelled by it (``CANCELLED``; it did not run).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tfdssm.errors import ConfigError
from tfdssm.export import serving_config as config
from tfdssm.serving import aio_server, grpc_server, rest
from tfdssm.serving.batching import Batcher
from tfdssm.serving.config_files import BatchingParameters, MonitoringOptions
from tfdssm.serving.metrics import Metrics
from tfdssm.serving.models import AVAILABLE, ModelManager
from tfdssm.serving.predict import DEFAULT_MAX_BATCH_SIZE

LOG = logging.getLogger("tfdssm.serving")
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# gRPC worker threads (unbatched; with batching, calls are coroutines on one
# event loop, see tfdssm.serving.aio_server). Every call also needs grpcio's
# one serving thread (and the GIL) to be taken, fed its message and finished,
# so past a few workers more threads only contend: 32 clients on 2 cores,
# MovieLens export, measured in alternating runs (docs/serving.md): 4 workers
# 668-702 req/s against 532 with 8 (p99 69-74 ms against 91).
DEFAULT_WORKERS = 4


def _config_watcher(
    export_dir: str | os.PathLike, config_file: str | os.PathLike | None
) -> tuple[Callable[[], list | None], list]:
    """A ``reload`` for :class:`ModelManager` (the config's models again when the
    file changed since the last call: a new export committed, else ``None``),
    and the models now."""
    path = config_file or os.path.join(export_dir, config.CONFIG_FILE)
    last: list[Any] = [object()]  # never equal: the first call reads

    def changed() -> list | None:
        try:
            stat = os.stat(path)
            key: Any = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            key = None
        if key == last[0]:
            return None
        specs = config.read_model_specs(export_dir, config_file)
        last[0] = key
        return specs

    return changed, changed() or []


class Server:
    """The model server (start with :meth:`start`, stop with :meth:`stop`).

    Args:
        export_dir: An export directory (``models.config`` names the models;
            without it every ``<model>/<version>`` subdirectory is served).
        grpc_port: gRPC port (0: any free port; see :attr:`grpc_port`).
        rest_port: REST port (0: any free port), ``None`` for no REST.
        host: Address to bind (default loopback only).
        poll_seconds: How often to look for new versions.
        max_request_bytes: Largest gRPC message / REST body accepted.
        model_config_file: A TF Serving model config to use instead of
            ``export_dir/models.config``.
        workers: gRPC worker threads (default :data:`DEFAULT_WORKERS`, 4).
            Not used with batching: gRPC then runs on grpcio's asyncio server
            (:mod:`tfdssm.serving.aio_server`), where waiting requests hold
            no thread.
        max_batch_size: Most rows a request may have.
        batching: Merge concurrent requests with these parameters (see
            :mod:`tfdssm.serving.batching`); ``None``: each request runs alone.
        monitoring: Serve Prometheus metrics on the REST port (see
            :mod:`tfdssm.serving.metrics`); ``None``: no metrics endpoint.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        grpc_port: int = 8500,
        rest_port: int | None = 8501,
        host: str = "127.0.0.1",
        poll_seconds: float = 1.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        model_config_file: str | os.PathLike | None = None,
        workers: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batching: BatchingParameters | None = None,
        monitoring: MonitoringOptions | None = None,
    ) -> None:
        if poll_seconds <= 0:
            raise ConfigError(f"poll interval must be > 0 s, received {poll_seconds}.")
        self._configure(grpc_port, rest_port, host, max_request_bytes, workers,
                        max_batch_size, batching, monitoring)
        watcher, specs = _config_watcher(export_dir, model_config_file)
        self.models = [(name, path) for name, path, _ in specs]
        self.manager = ModelManager(specs, poll_seconds, watcher, self.metrics)

    def _configure(
        self,
        grpc_port: int,
        rest_port: int | None,
        host: str,
        max_request_bytes: int,
        workers: int | None,
        max_batch_size: int,
        batching: BatchingParameters | None = None,
        monitoring: MonitoringOptions | None = None,
    ) -> None:
        """Checks and keeps what every server has, whatever serves its models
        (``self.manager``, set by the caller): ports, limits, batching, metrics."""
        for label, port in (("--grpc-port", grpc_port), ("--rest-port", rest_port)):
            if port is not None and not 0 <= int(port) <= 65535:
                raise ConfigError(
                    f"{label} must be between 0 and 65535, received {port}.")
        if max_request_bytes < 1024:
            raise ConfigError(f"--max-request-bytes must be >= 1024, received "
                              f"{max_request_bytes}.")
        if max_batch_size < 1:
            raise ConfigError(f"--max-batch-size must be >= 1, received "
                              f"{max_batch_size}.")
        if monitoring is not None and monitoring.prometheus and rest_port is None:
            raise ConfigError("the monitoring config enables Prometheus metrics, "
                              "which are served on the REST port; set --rest-port.")
        self.metrics = Metrics()
        self.batching, self.monitoring = batching, monitoring
        self.batcher: Batcher | None = None
        self.host = host
        self.workers = workers or DEFAULT_WORKERS
        self.max_request_bytes = int(max_request_bytes)
        self.max_batch_size = int(max_batch_size)
        self.grpc_port, self.rest_port = grpc_port, rest_port
        self._grpc: Any = None
        self._rest: Any = None
        self._rest_thread: threading.Thread | None = None

    def start(self) -> Server:
        """Loads every model's pinned (else newest) version, then starts listening
        and polling."""
        self.manager.load_all()
        try:
            if self.batching is not None:
                self.batcher = Batcher(self.batching, self.metrics).start()
            if self.batcher is not None:  # requests wait for batches on a loop
                self._grpc, self.grpc_port = aio_server.start_aio_grpc(
                    self.manager, self.batcher, self.host, self.grpc_port,
                    self.max_request_bytes, self.max_batch_size, self.metrics)
            else:
                self._grpc, self.grpc_port = grpc_server.start_grpc(
                    self.manager, self.host, self.grpc_port,
                    self.max_request_bytes, self.workers, self.max_batch_size,
                    metrics=self.metrics)
            if self.rest_port is not None:
                path = (self.monitoring.path if self.monitoring is not None
                        and self.monitoring.prometheus else None)
                self._rest, self._rest_thread, self.rest_port = rest.start_rest(
                    self.manager, self.host, self.rest_port, self.max_request_bytes,
                    self.max_batch_size, self.batcher, self.metrics, path)
        except Exception:
            self.stop(grace_seconds=0)
            raise
        self.manager.start()
        return self

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stops accepting requests, drains the ones received, unloads the models.

        Every request received before this call runs to its end, unless
        ``grace_seconds`` pass first; later ones are refused (see the module
        docstring).
        """
        deadline = time.monotonic() + max(0.0, grace_seconds)
        rest_stopping = None
        if self._rest is not None:  # later requests: 503, or refused
            rest_stopping = threading.Thread(
                target=_logged(self._rest.stop_accepting), args=(deadline,),
                name="tfdssm-rest-stop")
            rest_stopping.start()  # at the same time: its loop takes up to 0.2 s
        if self._grpc is not None:  # later calls: UNAVAILABLE
            self._grpc.stop(max(0.0, deadline - time.monotonic()))
            self._grpc = None
        if self._rest is not None:
            rest_stopping.join()
            self._rest.server_close()  # joins running handlers
            self._rest = None
        if self.batcher is not None:  # every admitted request has been answered
            self.batcher.stop(max(deadline, time.monotonic() + 1.0))
            self.batcher = None
        self.manager.stop()

    def describe(self) -> str:
        """One line: models, versions and addresses."""
        loaded = []
        for name in self.manager.names:
            states = self.manager.status(name)
            versions = [str(v) for v, state, _ in states if state == AVAILABLE]
            loaded.append(f"{name} (version {', '.join(versions) or 'none'})")
        rest_text = (f", REST on http://{self.host}:{self.rest_port}"
                     if self.rest_port is not None else "")
        extras = ""
        if self.batching is not None:
            extras += (f"; batching up to {self.batching.max_batch_size} rows, "
                       f"{self.batching.batch_timeout_micros} us timeout")
        if self.monitoring is not None and self.monitoring.prometheus:
            extras += f"; Prometheus metrics at {self.monitoring.path}"
        return (f"serving {', '.join(loaded)}; gRPC on {self.host}:{self.grpc_port}"
                f"{rest_text}{extras}")

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _logged(function: Callable[..., Any]) -> Callable[..., None]:
    def run(*args: Any) -> None:
        try:
            function(*args)
        except Exception:  # noqa: BLE001 - a thread: log it, the stop goes on
            LOG.exception("tfdssm serve: error while stopping")

    return run


def _log(message: str) -> None:
    LOG.info("%s", message)


def serve(
    export_dir: str | os.PathLike,
    log: Callable[[str], None] = _log,
    grace_seconds: float = 10.0,
    **kwargs: Any,
) -> int:
    """Runs a :class:`Server` until SIGTERM/SIGINT (main thread only).

    Args:
        export_dir: The export directory.
        log: Where progress lines go (default: the ``tfdssm.serving`` logger,
            info; printed to stderr unless logging is set up); the first says
            ``... gRPC on HOST:PORT, REST on http://HOST:PORT ...``.
        grace_seconds: How long in-flight requests may run after a stop signal.
        **kwargs: :class:`Server` arguments.

    Returns:
        0 after a clean shutdown.
    """
    return run_until_signal(lambda: Server(export_dir, **kwargs), log, grace_seconds)


def run_until_signal(
    make_server: Callable[[], Server],
    log: Callable[[str], None] = _log,
    grace_seconds: float = 10.0,
) -> int:
    """Starts ``make_server()``, serves until SIGTERM/SIGINT, then drains and
    stops it (main thread only; see :func:`serve`).

    Returns:
        0 after a clean shutdown.
    """
    if not LOG.hasHandlers():  # `tfdssm serve` sets up the `tfdssm` logger
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
    stop = threading.Event()

    def on_signal(number: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = make_server().start()
        log(f"tfdssm serve: {server.describe()}; Ctrl-C or SIGTERM to stop")
        while not stop.wait(0.5):
            pass
        log("tfdssm serve: shutting down (draining in-flight requests)")
        start = time.perf_counter()
        server.stop(grace_seconds)
        log(f"tfdssm serve: stopped in {time.perf_counter() - start:.1f}s")
        return 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
