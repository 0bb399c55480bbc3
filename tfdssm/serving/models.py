"""Loaded models, their versions, and the watcher that picks up new versions.

A model pinned by its config (``model_version_policy { specific { versions: N }
}``, what ``tfdssm train`` writes: see :mod:`tfdssm.export.serving_config`)
serves exactly that version; the pinned models form one set, replaced as a
whole: when the config changes (it is re-read on every poll, as TF Serving does
with ``--model_config_file_poll_wait_seconds``), every newly pinned version is
loaded and warmed up first, and only when all of them are ready are they
swapped in together, so requests never see models of two exports at once
(until then the previous set keeps serving; at start-up, what loads is served).
Versions an export wrote but never committed are not loaded.

Unpinned models follow TF Serving's default policy: each serves its newest version.
A background thread polls every model's base path (every ``poll_seconds``);
when a newer version directory appears (TF Serving's rules, see
:mod:`tfdssm.export.versioning`: ``007`` is version 7, ``²`` or a number
above int64 is no version and is ignored), it is loaded and warmed up (its
``assets.extra/tf_serving_warmup_requests`` replayed) *before* it replaces
the old one, then the old one is dropped: requests already running on it
finish, new requests go to the new version. A version that fails to load is
reported in the model status and retried at most :data:`MAX_LOAD_ATTEMPTS`
times while its directory stays the same, and again whenever what it holds
changes (a slow ``cp -r`` filling a directory that appeared empty); the
previous version keeps serving. Nothing under one base path affects another
model, and no directory content makes loading or polling raise.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2

from tfdssm.errors import ServingError
from tfdssm.export import warmup
from tfdssm.export.versioning import fingerprint, version_dirs
from tfdssm.serving import predict
from tfdssm.serving.metrics import Metrics

LOG = logging.getLogger("tfdssm.serving")
MAX_LOAD_ATTEMPTS = 3

# tensorflow.serving.ModelVersionStatus.State
START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50


@dataclasses.dataclass
class Servable:
    """One loaded version of a model.

    Attributes:
        name: Model name (from ``models.config``).
        version: Integer version.
        path: The version directory.
        loaded: ``tf.saved_model.load`` result.
        signature_defs: ``{key: SignatureDef}`` as in ``saved_model.pb``.
    """

    name: str
    version: int
    path: pathlib.Path
    loaded: Any
    signature_defs: dict[str, Any]
    _signatures: dict[str, predict.Signature] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False)

    def predict(
        self,
        signature_name: str,
        inputs: dict[str, tf.Tensor],
        output_filter: Sequence[str] = (),
        max_batch_size: int | None = None,
    ) -> dict[str, Any]:
        """Validates and runs one request (see :func:`tfdssm.serving.predict.run`)."""
        return predict.run_signature(self.signature(signature_name), inputs,
                                     output_filter, max_batch_size)

    def signature(self, signature_name: str) -> predict.Signature:
        """The signature (``""``: ``serving_default``), prepared on first use.

        Raises:
            ServingError: ``FAILED_PRECONDITION`` for an unknown or uncallable
                signature (never cached).
        """
        key = signature_name or predict.DEFAULT_SIGNATURE
        signature = self._signatures.get(key)
        if signature is None:  # two threads may both prepare it: the same result
            signature = self._signatures[key] = self._prepare(key)
        return signature

    def _prepare(self, key: str) -> predict.Signature:
        signature_def = predict.find_signature(self.signature_defs, key, self.name)
        function = self.loaded.signatures.get(key)
        if function is None:
            raise ServingError(
                f'signature "{key}" of model "{self.name}" is not callable (only '
                "Predict signatures are).", "FAILED_PRECONDITION")
        return predict.Signature.of(function, signature_def, self.where(key))

    def where(self, signature_name: str) -> str:
        """``signature "x" of model "y" (version n)``, for messages."""
        key = signature_name or predict.DEFAULT_SIGNATURE
        return f'signature "{key}" of model "{self.name}" (version {self.version})'

    def tensors(
        self,
        signature_name: str,
        protos: Any,
        max_bytes: int | None = None,
        max_batch_size: int | None = None,
        as_numpy: bool = False,
    ) -> dict[str, Any]:
        """A request's ``TensorProto`` inputs as tensors (or numpy arrays),
        checked against the signature and the limits before any is expanded
        (see :func:`tfdssm.serving.predict.tensors_from_protos`)."""
        key = signature_name or predict.DEFAULT_SIGNATURE
        signature = self._signatures.get(key)
        if signature is not None:
            specs, where = signature.specs, signature.where
        else:  # not callable signatures too: their error comes from predict()
            signature_def = predict.find_signature(self.signature_defs, key, self.name)
            specs, where = predict.input_specs(signature_def), self.where(key)
        return predict.tensors_from_protos(protos, specs, where, max_bytes,
                                           max_batch_size, as_numpy)


def load_servable(name: str, version: int, path: pathlib.Path) -> Servable:
    """Loads a SavedModel version and replays its warm-up requests.

    Raises:
        ServingError: unreadable SavedModel, missing ScaNN ops, failed warm-up.
    """
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except (OSError, ValueError, DecodeError) as error:
        raise ServingError(f"{path} is not a SavedModel: {error}",
                           "NOT_FOUND") from None
    if _uses_scann(proto):
        try:
            import scann  # noqa: F401, PLC0415 - registers the Scann>* TF ops
        except ImportError as error:
            raise ServingError(
                f"model {name!r} uses ScaNN ops, which need `pip install "
                f"'scann[tf]==1.4.2'` ({error}).", "FAILED_PRECONDITION") from None
    try:
        loaded = tf.saved_model.load(str(path))
    except (tf.errors.OpError, ValueError, OSError) as error:
        raise ServingError(f"cannot load {path}: {error}",
                           "FAILED_PRECONDITION") from None
    servable = Servable(name, version, path, loaded,
                        dict(proto.meta_graphs[0].signature_def))
    for request in warmup.read_warmup(path):
        try:
            inputs = servable.tensors(request.model_spec.signature_name, request.inputs)
            servable.predict(request.model_spec.signature_name, inputs)
        except ServingError as error:
            raise ServingError(f"warm-up request failed on {path}: {error}",
                               "FAILED_PRECONDITION") from None
    return servable


def _uses_scann(proto: saved_model_pb2.SavedModel) -> bool:
    graph = proto.meta_graphs[0].graph_def
    nodes = list(graph.node)
    for function in graph.library.function:
        nodes.extend(function.node_def)
    return any(node.op.startswith("Scann>") for node in nodes)


@dataclasses.dataclass
class _Model:
    name: str
    base_path: pathlib.Path
    current: Servable | None = None
    states: dict[int, tuple[int, str]] = dataclasses.field(default_factory=dict)
    # version -> (failed attempts, fingerprint of the directory they saw)
    failures: dict[int, tuple[int, tuple]] = dataclasses.field(default_factory=dict)
    reported: set[str] = dataclasses.field(default_factory=set)  # ignored names
    pinned: int | None = None  # the config's specific version, else the newest
    pending: Servable | None = None  # a pinned version loaded, not yet swapped in


class ModelManager:
    """Serves the newest version of each model and watches for new ones.

    Args:
        models: ``[(name, base path)]`` or ``[(name, base path, pinned version or
            None)]``, e.g. from
            :func:`tfdssm.export.serving_config.read_model_specs`.
        poll_seconds: How often to look for new versions.
        reload: Called on every poll; returns the models again (a changed
            config: new pins) or ``None`` (unchanged).
        metrics: Where loads, failed loads and unloads are counted.
    """

    def __init__(self, models: Sequence[tuple], poll_seconds: float = 1.0,
                 reload: Callable[[], Sequence[tuple] | None] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self._models = {spec[0]: _Model(spec[0], pathlib.Path(spec[1]),
                                        pinned=spec[2] if len(spec) > 2 else None)
                        for spec in models}
        self._reload = reload
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.poll_seconds = float(poll_seconds)
        self._unknown: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def load_all(self) -> None:
        """Loads every model's pinned (else newest) version (blocking; errors are
        logged, never raised: a model that cannot load is reported in its status)."""
        self.refresh_all(reload=False)

    def served(self) -> dict[str, int | None]:
        """``{model: the version serving now, or None}``, one consistent snapshot."""
        with self._lock:
            return {name: None if m.current is None else m.current.version
                    for name, m in self._models.items()}

    def refresh_all(self, reload: bool = True) -> None:
        """Re-reads the config (``reload``), then brings every model to its
        pinned (as one set) or newest version. Never raises."""
        with self._refresh_lock:
            if reload and self._reload is not None:
                try:
                    specs = self._reload()
                except Exception as error:  # noqa: BLE001 - keep serving
                    LOG.error("tfdssm serve: cannot re-read the model config; "
                              "serving on: %s", error)
                    specs = None
                self._apply(specs or ())
            for model in self._models.values():
                if model.pinned is None:
                    try:
                        self._refresh(model)
                    except Exception:  # noqa: BLE001 - one model never stops others
                        LOG.exception("tfdssm serve: error while loading %s",
                                      model.name)
            try:
                self._refresh_set()
            except Exception:  # noqa: BLE001
                LOG.exception("tfdssm serve: error while loading the pinned models")

    def _apply(self, specs: Sequence[tuple]) -> None:
        for spec in specs:
            name, pinned = spec[0], spec[2] if len(spec) > 2 else None
            model = self._models.get(name)
            if model is None:
                if name not in self._unknown:
                    self._unknown.add(name)
                    LOG.warning("tfdssm serve: the config now names model %r; "
                                "restart the server to serve it", name)
                continue
            if model.pinned != pinned:
                LOG.info("tfdssm serve: the config pins model %r to version %s", name,
                         pinned if pinned is not None else "latest")
                model.pinned = pinned

    def start(self) -> None:
        """Starts the polling thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="tfdssm-watcher",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops polling and drops every loaded version."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            for model in self._models.values():
                if model.current is not None:
                    self.metrics.model_event(model.name, model.current.version,
                                             "unload")
                model.current = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh_all()

    def refresh(self, name: str) -> bool:
        """Loads the newest version of ``name`` if it is not the one served.

        Returns:
            Whether a new version was swapped in.
        """
        with self._refresh_lock:
            model = self._models[name]
            if model.pinned is None:
                return self._refresh(model)
            before = model.current
            self._refresh_set()
            return model.current is not before

    def _versions(self, model: _Model) -> dict[int, pathlib.Path]:
        ignored: list[str] = []
        found = version_dirs(model.base_path, ignored)
        for entry in sorted(set(ignored) - model.reported):
            model.reported.add(entry)
            LOG.warning("tfdssm serve: %s is not a version of model %r (a version "
                        "directory is named with ASCII digits, at most %d); ignored",
                        model.base_path / entry[:40], model.name, 2**63 - 1)
        return found

    def _refresh_set(self) -> bool:
        """Loads the pinned versions not serving yet; swaps them in together."""
        pinned = [m for m in self._models.values() if m.pinned is not None]
        changed = [m for m in pinned
                   if m.current is None or m.current.version != m.pinned]
        if not changed:
            return False
        ready = {}
        for model in changed:
            servable = self._prepare(model)
            if servable is not None:
                ready[model.name] = servable
        first = all(m.current is None for m in pinned)
        if not ready or (len(ready) < len(changed) and not first):
            return False  # the previous set serves on, whole
        with self._lock:
            for model in changed:
                if model.name not in ready:
                    continue
                old, model.current = model.current, ready[model.name]
                model.pending = None
                model.states[model.current.version] = (AVAILABLE, "")
                if old is not None and old.version != model.current.version:
                    model.states[old.version] = (END, "")
                    self.metrics.model_event(model.name, old.version, "unload")
        LOG.info("tfdssm serve: serving %s", {m.name: m.current.version
                                              for m in pinned if m.current})
        return True

    def _prepare(self, model: _Model) -> Servable | None:
        """The pinned version of ``model`` loaded (cached until swapped in)."""
        version = model.pinned
        path = self._versions(model).get(version)
        if path is None:
            if model.states.get(version, (None,))[0] != START:
                LOG.warning("tfdssm serve: model %r version %d (pinned by the config) "
                            "is not under %s", model.name, version, model.base_path)
            model.states.pop(0, None)
            model.states[version] = (START, "")
            return None
        pending = model.pending
        if pending is not None and pending.version == version and pending.path == path:
            return pending
        model.pending = self._load(model, version, path)
        return model.pending

    def _load(self, model: _Model, version: int, path: pathlib.Path) -> Servable | None:
        """Loads one version with the retry rules of the module docstring."""
        name = model.name
        seen = (str(path), fingerprint(path))
        attempts, before = model.failures.get(version, (0, None))
        if before != seen:
            attempts = 0  # new, or its directory changed since it failed: retry
        if attempts >= MAX_LOAD_ATTEMPTS:
            return None
        model.states.pop(0, None)
        model.states[version] = (LOADING, "")
        start = time.perf_counter()
        try:
            servable = load_servable(name, version, path)
        except Exception as error:  # noqa: BLE001 - any failure: keep the old one
            model.failures[version] = (attempts + 1, seen)
            model.states[version] = (END, str(error))
            self.metrics.model_event(name, version, "load_failed", str(path))
            LOG.error("tfdssm serve: model %r version %d failed to load (attempt %d; "
                      "retried when %s changes): %s", name, version, attempts + 1,
                      path, error)
            return None
        model.failures.pop(version, None)
        self.metrics.model_event(name, version, "load", str(path))
        LOG.info("tfdssm serve: model %r version %d loaded in %.1fs", name, version,
                 time.perf_counter() - start)
        return servable

    def _refresh(self, model: _Model) -> bool:
        name = model.name
        found = self._versions(model)
        if not found:
            if model.current is None and not model.states:
                LOG.warning("tfdssm serve: no versions of model %r under %s yet",
                            name, model.base_path)
                model.states[0] = (START, "")
            return False
        newest = max(found)
        path = found[newest]
        current = model.current
        if current is not None and current.version == newest and current.path == path:
            return False
        servable = self._load(model, newest, path)
        if servable is None:
            return False
        with self._lock:
            old, model.current = model.current, servable
            model.states[newest] = (AVAILABLE, "")
            if old is not None and old.version != newest:
                model.states[old.version] = (END, "")
        if old is not None:
            self.metrics.model_event(name, old.version, "unload")
            LOG.info("tfdssm serve: model %r version %d unloaded", name, old.version)
        return True

    def get(self, name: str, version: int | None = None) -> Servable:
        """The served version of ``name`` (``version``: must be that one).

        Raises:
            ServingError: ``NOT_FOUND`` for an unknown model or version.
        """
        model = self._models.get(name)
        if model is None:
            raise ServingError(
                f"Servable not found for request: Latest({name}). This server has "
                f"the models {sorted(self._models)}.", "NOT_FOUND")
        with self._lock:
            current = model.current
        if current is None:
            raise ServingError(
                f"Servable not found for request: Latest({name}): no version of "
                f"{name!r} is loaded (looked in {model.base_path}).", "NOT_FOUND")
        if version is not None and version != current.version:
            raise ServingError(
                f"Servable not found for request: Specific({name}, {version}). "
                f"Model {name!r} serves version {current.version}.", "NOT_FOUND")
        return current

    def status(
        self, name: str, version: int | None = None
    ) -> list[tuple[int, int, str]]:
        """``[(version, state, error message)]``, newest first (TF Serving states).

        Raises:
            ServingError: ``NOT_FOUND`` for an unknown model or version.
        """
        model = self._models.get(name)
        if model is None:
            raise ServingError(f"Could not find any versions of model {name}; this "
                               f"server has {sorted(self._models)}.", "NOT_FOUND")
        with self._lock:
            states = sorted(model.states.items(), reverse=True)
        if version is not None:
            states = [s for s in states if s[0] == version]
            if not states:
                raise ServingError(f"Could not find version {version} of model {name}.",
                                   "NOT_FOUND")
        return [(v, state, error) for v, (state, error) in states]
