"""``tfdssm serve --shards``: one retrieval API over N shard servers.

``tfdssm index --num-shards N`` writes N retrieval models
(``EXPORT_DIR/shards/<i>``), each an index over its part of the corpus and each
served by its own ``tfdssm serve`` (or TF Serving). The front speaks the same
TF Serving gRPC and REST APIs as they do: it sends every ``Predict`` to all
shards at once (gRPC), and merges their top-k per query row by score (ties: by
id), so the answer is the one a single index over the whole corpus gives.
``k`` and ``exclude`` (signatures ``top_k``, ``top_k_exclude``) are passed to
every shard (``k`` capped at each shard's size); the front accepts ``k`` up to
the largest shard's ``max_k``.

A shard that is down or does not answer within ``timeout_seconds``:

* default: the request fails with that shard's status, ``UNAVAILABLE`` or
  ``DEADLINE_EXCEEDED``, and a message naming the shard
  (``shard 1 (127.0.0.1:8601) did not answer: ...``), within the timeout;
* ``allow_partial=True`` (``--allow-partial``): the request is answered from
  the shards that did answer; the extra output ``shards_answered`` (int32
  ``[batch, num_shards]``, 1 = that shard's candidates are in the answer) says
  which. With this option every signature has that output (see
  ``GetModelMetadata``). Never partial without it; all shards down is an error.

Errors that are the request's own (``INVALID_ARGUMENT``, ``NOT_FOUND``) are
returned as the shards give them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfdssm.errors import ConfigError, ServingError
from tfdssm.serving import predict
from tfdssm.serving.models import AVAILABLE
from tfdssm.serving.server import DEFAULT_MAX_REQUEST_BYTES, Server, run_until_signal

LOG = logging.getLogger("tfdssm.serving")
MODELS = ("retrieval", "retrieval_brute_force")
ANSWERED = "shards_answered"
# A shard that did not answer (vs. an error about the request itself).
_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
         grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def parse_shards(text: str) -> list[str]:
    """``HOST:PORT,HOST:PORT`` -> addresses.

    >>> parse_shards("127.0.0.1:8600, 127.0.0.1:8601")
    ['127.0.0.1:8600', '127.0.0.1:8601']

    Raises:
        ConfigError: empty, a repeated address, or an entry without a port.
    """
    shards = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in shards if not s.rpartition(":")[2].isdigit()]
    if not shards or bad:
        raise ConfigError(f"--shards needs HOST:PORT,HOST:PORT,... (the shards' gRPC "
                          f"ports); received {text!r}.")
    if len(set(shards)) != len(shards):
        raise ConfigError(f"--shards names a shard twice: {text!r}.")
    return shards


class _Shard:
    """One shard server: its address and gRPC stub."""

    def __init__(self, index: int, address: str, max_bytes: int) -> None:
        self.index, self.address = index, address
        options = [("grpc.max_send_message_length", max_bytes),
                   ("grpc.max_receive_message_length", max_bytes)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def name(self) -> str:
        return f"shard {self.index} ({self.address})"


class ShardedServable:
    """A model served by every shard, answered by scatter-gather.

    Duck-types :class:`tfdssm.serving.models.Servable` for the gRPC and REST
    front ends: ``name``, ``version``, ``signature_defs``, ``tensors``,
    ``predict``.

    Args:
        name: Model name on the shards (``retrieval``, ``retrieval_brute_force``).
        shards: The shard connections.
        signature_defs: The shards' signatures (from ``GetModelMetadata``).
        version: The version reported to clients (the newest among the shards).
        timeout_seconds: Deadline of each shard call.
        allow_partial: Answer from the shards that answered (see the module).
    """

    def __init__(self, name: str, shards: Sequence[_Shard],
                 signature_defs: Mapping[str, Any], widths: Sequence[int],
                 version: int, timeout_seconds: float, allow_partial: bool) -> None:
        self.name, self.version = name, int(version)
        self.shards = list(shards)
        self.widths = list(widths)  # each shard's max_k (serving_default width)
        self.max_k = max(self.widths)
        self.timeout_seconds = float(timeout_seconds)
        self.allow_partial = allow_partial
        self.signature_defs = {}
        for key, signature_def in signature_defs.items():
            copy = type(signature_def)()
            copy.CopyFrom(signature_def)
            if key == predict.DEFAULT_SIGNATURE and "ids" in copy.outputs:
                for output in ("ids", "scores"):
                    copy.outputs[output].tensor_shape.dim[-1].size = self.max_k
            if allow_partial:
                info = copy.outputs[ANSWERED]
                info.name = ANSWERED
                info.dtype = tf.int32.as_datatype_enum
                info.tensor_shape.dim.add().size = -1
                info.tensor_shape.dim.add().size = len(self.shards)
            self.signature_defs[key] = copy

    def where(self, signature_name: str) -> str:
        key = signature_name or predict.DEFAULT_SIGNATURE
        return f'signature "{key}" of model "{self.name}" (sharded front)'

    def tensors(self, signature_name: str, protos: Any, max_bytes: int | None = None,
                max_batch_size: int | None = None,
                as_numpy: bool = False) -> dict[str, tf.Tensor | np.ndarray]:
        """The request's inputs, checked as a model server checks them (see
        :func:`tfdssm.serving.predict.tensors_from_protos` for ``as_numpy``)."""
        signature_def = predict.find_signature(self.signature_defs, signature_name,
                                               self.name)
        return predict.tensors_from_protos(
            protos, predict.input_specs(signature_def), self.where(signature_name),
            max_bytes, max_batch_size, as_numpy)

    def predict(self, signature_name: str, inputs: Mapping[str, tf.Tensor],
                output_filter: Sequence[str] = (),
                max_batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Sends the request to every shard and merges their top-k.

        Returns:
            ``ids`` string ``[batch, width]``, ``scores`` float32 ``[batch,
            width]`` (and ``shards_answered`` with ``allow_partial``).

        Raises:
            ServingError: the request is invalid, or a shard did not answer
                (without ``allow_partial``), naming the shard.
        """
        key = signature_name or predict.DEFAULT_SIGNATURE
        signature_def = predict.find_signature(self.signature_defs, key, self.name)
        where = self.where(key)
        predict.check_inputs(predict.input_specs(signature_def), inputs, where,
                             max_batch_size)
        outputs = list(signature_def.outputs)
        unknown = [n for n in output_filter if n not in outputs]
        if unknown:
            raise ServingError(f"output tensor alias not found in {where}: "
                               f"{unknown[0]}. Outputs expected to be in the set "
                               f"{{{', '.join(sorted(outputs))}}}.")
        arrays = {n: np.asarray(t.numpy() if hasattr(t, "numpy") else t)
                  for n, t in inputs.items()}
        batch = len(next(iter(arrays.values())))
        k = self._k(key, arrays, batch)
        answers = self._scatter(key, arrays, k)
        ids, scores, answered = self._merge(answers, k, batch, key)
        out = {"ids": ids, "scores": scores}
        if self.allow_partial:
            out[ANSWERED] = np.tile(answered.astype(np.int32), (batch, 1))
        wanted = list(output_filter) or outputs
        return {n: out[n] for n in wanted}

    def _k(self, key: str, arrays: Mapping[str, np.ndarray], batch: int) -> np.ndarray:
        if "k" not in arrays:
            return np.full([batch], self.max_k, np.int32)
        k = arrays["k"].astype(np.int64).reshape(-1)
        if len(k) != batch or batch == 0 or k.min() < 1 or k.max() > self.max_k:
            raise ServingError(
                f"k must be between 1 and max_k={self.max_k} (the largest shard's "
                f"max_k), one value per query row; received k={k.tolist()[:20]} for "
                f"{batch} row(s).")
        return k.astype(np.int32)

    def _request(self, key: str, arrays: Mapping[str, np.ndarray], k: np.ndarray,
                 width: int) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.name
        request.model_spec.signature_name = key
        for name, array in arrays.items():
            value = np.minimum(k, width) if name == "k" else array
            request.inputs[name].CopyFrom(predict.tensor_to_proto(value))
        return request

    def _scatter(self, key: str, arrays: Mapping[str, np.ndarray],
                 k: np.ndarray) -> list[Any]:
        """Each shard's response (``None`` for a shard that did not answer)."""
        calls = []
        for shard, width in zip(self.shards, self.widths, strict=True):
            request = self._request(key, arrays, k, width)
            calls.append(shard.stub.Predict.future(request,
                                                   timeout=self.timeout_seconds))
        answers: list[Any] = []
        failures = []
        for shard, call in zip(self.shards, calls, strict=True):
            try:
                answers.append(call.result())
            except grpc.RpcError as error:
                code = error.code()
                if code not in _DOWN:  # the request's own error: every shard says it
                    for other in calls:
                        other.cancel()
                    raise ServingError(f"{shard.name()}: {error.details()}",
                                       code.name) from None
                failures.append((shard, code, error.details()))
                answers.append(None)
        if failures and (not self.allow_partial or len(failures) == len(self.shards)):
            shard, code, details = failures[0]
            names = ", ".join(s.name() for s, _, _ in failures)
            raise ServingError(
                f"{shard.name()} did not answer within {self.timeout_seconds:g} s "
                f"({code.name}: {details}); shard(s) not answering: {names}. Restart "
                "them, or serve the front with --allow-partial to answer from the "
                "others.", code.name)
        for shard, code, details in failures:
            LOG.warning("tfdssm serve: %s did not answer (%s: %s); partial answer",
                        shard.name(), code.name, details)
        return answers

    def _merge(self, answers: Sequence[Any], k: np.ndarray, batch: int,
               key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids_parts, score_parts = [], []
        for answer in answers:
            if answer is None:
                continue
            ids_parts.append(tf.make_ndarray(answer.outputs["ids"]).astype(object)
                             .reshape(batch, -1))
            score_parts.append(tf.make_ndarray(answer.outputs["scores"])
                               .reshape(batch, -1))
        all_ids = np.concatenate(ids_parts, axis=1)
        all_scores = np.concatenate(score_parts, axis=1).astype(np.float32)
        width = self.max_k if key == predict.DEFAULT_SIGNATURE else int(k.max())
        ids = np.full([batch, width], b"", dtype=object)
        scores = np.full([batch, width], -np.inf, dtype=np.float32)
        for row in range(batch):
            order = np.lexsort((all_ids[row], -all_scores[row]))[:k[row]]
            found = all_scores[row][order] > -np.inf
            order = order[found]
            ids[row, :len(order)] = all_ids[row][order]
            scores[row, :len(order)] = all_scores[row][order]
        answered = np.asarray([a is not None for a in answers])
        return ids, scores, answered


class ShardManager:
    """The front's "models": :class:`ShardedServable` per model name.

    Duck-types the parts of :class:`tfdssm.serving.models.ModelManager` the
    gRPC and REST front ends use.
    """

    def __init__(self, shards: Sequence[str], timeout_seconds: float = 5.0,
                 allow_partial: bool = False,
                 max_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        if timeout_seconds <= 0:
            raise ConfigError(f"--shard-timeout must be > 0 s, received "
                              f"{timeout_seconds}.")
        self.shards = [_Shard(i, a, max_bytes) for i, a in enumerate(shards)]
        self.timeout_seconds = timeout_seconds
        self.allow_partial = allow_partial
        self._servables: dict[str, ShardedServable] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._servables)

    def load_all(self) -> None:
        """Asks every shard for its retrieval models' signatures (waiting up to
        the timeout for each).

        Raises:
            ServingError: a shard is unreachable (unless ``allow_partial`` and
                another one answers), or the shards serve different signatures.
        """
        for name in MODELS:
            metadata, missing = [], []
            for shard in self.shards:
                try:
                    metadata.append(self._metadata(shard, name))
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        metadata.append(None)
                        continue
                    missing.append(f"{shard.name()}: {error.code().name} "
                                   f"({error.details()})")
            if missing and not (self.allow_partial and len(missing) < len(self.shards)):
                raise ServingError("cannot reach the shard servers: "
                                   f"{'; '.join(missing)}. Start them first "
                                   "(tfdssm serve --export-dir EXPORT_DIR/shards/<i> "
                                   "--grpc-port PORT).",
                                   "UNAVAILABLE")
            found = [m for m in metadata if m is not None]
            if not found:
                continue
            if len(found) < len(metadata) - len(missing):
                raise ServingError(f"model {name!r} is served by some shards only; "
                                   "serve every shard's export directory.",
                                   "FAILED_PRECONDITION")
            self._servables[name] = self._servable(name, found)
        if not self._servables:
            raise ServingError(f"the shards serve none of the models {list(MODELS)}; "
                               "serve the directories `tfdssm index --num-shards` "
                               "wrote (EXPORT_DIR/shards/<i>).", "NOT_FOUND")

    def _metadata(self, shard: _Shard, name: str) -> tuple[int, dict]:
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = name
        request.metadata_field.append("signature_def")
        response = shard.stub.GetModelMetadata(
            request, timeout=self.timeout_seconds, wait_for_ready=True)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return response.model_spec.version.value, dict(signatures.signature_def)

    def _servable(self, name: str, found: Sequence[tuple[int, dict]]
                  ) -> ShardedServable:
        signatures = found[0][1]
        keys = sorted(signatures)
        for _, other in found[1:]:
            if sorted(other) != keys:
                raise ServingError(f"the shards' {name!r} models have different "
                                   f"signatures ({keys} vs {sorted(other)}); index "
                                   "them in one `tfdssm index --num-shards` run.",
                                   "FAILED_PRECONDITION")
        widths = []
        for _, other in found:
            dims = other[predict.DEFAULT_SIGNATURE].outputs["ids"].tensor_shape.dim
            widths.append(int(dims[-1].size))
        widths += [max(widths)] * (len(self.shards) - len(widths))  # unreachable ones
        version = max(v for v, _ in found)
        return ShardedServable(name, self.shards, signatures, widths, version,
                               self.timeout_seconds, self.allow_partial)

    def get(self, name: str, version: int | None = None) -> ShardedServable:
        servable = self._servables.get(name)
        if servable is None:
            raise ServingError(f"Servable not found for request: Latest({name}). This "
                               f"front serves {sorted(self._servables)}.", "NOT_FOUND")
        if version is not None and version != servable.version:
            raise ServingError(f"Servable not found for request: Specific({name}, "
                               f"{version}). The front serves version "
                               f"{servable.version} (the shards' newest).", "NOT_FOUND")
        return servable

    def status(self, name: str, version: int | None = None
               ) -> list[tuple[int, int, str]]:
        servable = self.get(name, version)
        return [(servable.version, AVAILABLE, "")]

    def served(self) -> dict[str, int | None]:
        return {n: s.version for n, s in self._servables.items()}

    def start(self) -> None:
        """Nothing to poll: each shard server watches its own versions."""

    def stop(self) -> None:
        for shard in self.shards:
            shard.channel.close()


class FrontServer(Server):
    """:class:`tfdssm.serving.server.Server` over a :class:`ShardManager`.

    Args:
        shards: ``["HOST:PORT", ...]`` or ``"HOST:PORT,HOST:PORT"``.
        grpc_port, rest_port, host, max_request_bytes, workers, max_batch_size:
            As :class:`tfdssm.serving.server.Server`.
        timeout_seconds: Deadline of each shard call.
        allow_partial: Answer from the shards that answered.

    >>> FrontServer("127.0.0.1:1,127.0.0.1:2", grpc_port=0).manager.shards[1].name()
    'shard 1 (127.0.0.1:2)'
    """

    def __init__(self, shards: str | Sequence[str], grpc_port: int = 8500,
                 rest_port: int | None = 8501, host: str = "127.0.0.1",
                 timeout_seconds: float = 5.0, allow_partial: bool = False,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 workers: int = 8,
                 max_batch_size: int = predict.DEFAULT_MAX_BATCH_SIZE) -> None:
        addresses = parse_shards(shards) if isinstance(shards, str) else list(shards)
        # No batching or Prometheus metrics in the front (each shard has its own).
        self._configure(grpc_port, rest_port, host, max_request_bytes, workers,
                        max_batch_size)
        self.manager = ShardManager(addresses, timeout_seconds, allow_partial,
                                    max_request_bytes)
        self.models = []

    def describe(self) -> str:
        shards = ", ".join(s.address for s in self.manager.shards)
        return f"front over shards {shards}; {super().describe()}"


def serve_front(shards: str, log: Callable[[str], None] | None = None,
                grace_seconds: float = 10.0, **kwargs: Any) -> int:
    """Runs a :class:`FrontServer` until SIGTERM/SIGINT (see
    :func:`tfdssm.serving.server.serve`)."""
    return run_until_signal(lambda: FrontServer(shards, **kwargs),
                            log or (lambda message: LOG.info("%s", message)),
                            grace_seconds)


__all__ = ["ANSWERED", "FrontServer", "ShardManager", "ShardedServable",
           "parse_shards", "serve_front"]
