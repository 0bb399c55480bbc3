"""Server-side request batching, as TF Serving's ``--enable_batching``.

Concurrent Predict requests to the same model, version and signature are
merged into one SavedModel call and the outputs split back per request. Each
(model, version, signature) has a queue of batches, as TF Serving's
``BasicBatchScheduler``: a request joins the newest batch of its queue if its
rows fit (``max_batch_size``), else opens a new batch; a queue holding
``max_enqueued_batches`` batches refuses it (``UNAVAILABLE``, safe to retry).
``num_batch_threads`` threads run batches: a batch runs when it is full, when a
newer batch was opened behind it, or when its first request has waited
``batch_timeout_micros`` (0: as soon as a thread is free; requests arriving
while the threads are busy merge).

What stays per request:

* Validation: every request is checked alone (names, dtypes, shapes, values,
  ``output_filter``) before it is queued, so a bad request fails alone. If the
  merged call itself fails (an error raised inside the graph, e.g. the
  retrieval models' ``k`` range check), each request of the batch is run
  alone: the request at fault gets its error, the others their answers.
* ``k`` and exclusions: the retrieval signatures take ``k`` int32 ``[batch]``
  (one value per row) and answer ``max(k)`` columns; a merged call answers
  ``max(k)`` over the batch, and each request gets its rows cut to its own
  ``max(k)`` columns (the rest is padding: ``""`` ids, ``-inf`` scores), which
  is what it gets alone. ``exclude`` ``[batch, n]`` lists of different lengths
  merge when ``pad_variable_length_inputs`` is set (padded with ``""``, which
  excludes nothing); otherwise only requests of the same shapes merge.
* ``allowed_batch_sizes``: a merged batch is padded up to the next allowed
  size by repeating its first row, as TF Serving does; those rows' outputs
  are dropped.

Requests with a scalar input, or whose outputs are not batch-major, run alone.
:meth:`Batcher.stop` refuses new requests and runs the queued ones.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ServingError
from tfdssm.serving import predict
from tfdssm.serving.config_files import BatchingParameters
from tfdssm.serving.metrics import Metrics

LOG = logging.getLogger("tfdssm.serving")
# The retrieval contract's per-row result count (see tfdssm.export.index): the
# outputs of a signature taking it are [batch, max(k)].
WIDTH_INPUT = "k"
QUEUE_FULL = ("The batch scheduling queue to which this request was submitted is "
              "full (max_enqueued_batches={} batches of up to {} rows); retry it, "
              "or raise max_enqueued_batches in --batching-parameters-file.")
DEADLINE_PASSED = ("the request's deadline passed while it waited for its batch; "
                   "retry with a longer deadline.")
STOPPING = ("tfdssm serve is shutting down and accepts no new requests; the "
            "request was not run: retry it.")


@dataclasses.dataclass(eq=False)
class _Task:
    """One request waiting in a queue."""

    signature: predict.Signature
    model: str
    signature_name: str
    inputs: Mapping[str, tf.Tensor]
    rows: int
    output_filter: tuple[str, ...]
    width: int | None  # its max(k), when the signature takes k
    enqueued: float
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict[str, np.ndarray] | None = None
    error: ServingError | None = None
    cancelled: bool = False
    # Called (in the batch thread) once the task is answered, e.g. to wake an
    # event loop awaiting it; None: the submitter waits on `done`.
    on_done: Callable[[_Task], None] | None = None

    def finish(self, result: dict[str, np.ndarray] | None = None,
               error: ServingError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)

    def outcome(self) -> dict[str, np.ndarray]:
        """The answer of a finished task.

        Raises:
            ServingError: the error it was finished with.
        """
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclasses.dataclass(eq=False)
class _Batch:
    tasks: list[_Task]
    rows: int
    created: float


class Batcher:
    """Merges concurrent requests (see the module docstring).

    Args:
        parameters: The batching parameters.
        metrics: Where batch sizes and queuing delays are recorded.
    """

    def __init__(self, parameters: BatchingParameters,
                 metrics: Metrics | None = None) -> None:
        self.parameters = parameters
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._queues: dict[tuple, collections.deque[_Batch]] = {}
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> Batcher:
        """Starts the ``num_batch_threads`` batch threads."""
        for i in range(self.parameters.num_batch_threads):
            thread = threading.Thread(target=self._loop, daemon=True,
                                      name=f"tfdssm-batch-{i}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, deadline: float) -> None:
        """Refuses new requests, runs the queued ones, stops the threads.

        Args:
            deadline: ``time.monotonic()`` after which the threads are no
                longer waited for (requests still queued then are answered
                ``UNAVAILABLE``).
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = [t for queue in self._queues.values() for batch in queue
                    for t in batch.tasks]
            self._queues.clear()
        for task in left:
            task.finish(error=ServingError(STOPPING, "UNAVAILABLE"))

    # ------------------------------------------------------------------ #
    # Submitting
    # ------------------------------------------------------------------ #

    def predict(
        self,
        servable: Any,
        signature_name: str,
        inputs: Mapping[str, tf.Tensor],
        output_filter: Sequence[str] = (),
        max_batch_size: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Validates one request, queues it, waits for its outputs.

        Args:
            servable: A :class:`tfdssm.serving.models.Servable`.
            signature_name: The signature (``""``: ``serving_default``).
            inputs: Its tensors by name.
            output_filter: Output names to return (default: all).
            max_batch_size: Most rows the request may have (``--max-batch-size``).
            timeout: Seconds to wait for the answer (the client's deadline;
                ``None`` or beyond ``threading.TIMEOUT_MAX``, as gRPC reports
                a call without a deadline: no limit).

        Returns:
            Output name -> numpy array, as :meth:`Servable.predict` returns.

        Raises:
            ServingError: the request's own validation or graph error;
                ``INVALID_ARGUMENT`` for more rows than ``max_batch_size`` of
                the batching parameters; ``UNAVAILABLE`` when its queue is
                full or the server is stopping; ``DEADLINE_EXCEEDED``.
        """
        task = self.submit(servable, signature_name, inputs, output_filter,
                           max_batch_size)
        if isinstance(task, dict):
            return task
        if timeout is not None and timeout >= threading.TIMEOUT_MAX:
            timeout = None  # gRPC's "no deadline" is ~9e18 s: Event.wait overflows
        if not task.done.wait(timeout):
            task.cancelled = True
            raise ServingError(DEADLINE_PASSED, "DEADLINE_EXCEEDED")
        return task.outcome()

    def submit(
        self,
        servable: Any,
        signature_name: str,
        inputs: Mapping[str, tf.Tensor],
        output_filter: Sequence[str] = (),
        max_batch_size: int | None = None,
        on_done: Callable[[_Task], None] | None = None,
    ) -> _Task | dict[str, np.ndarray]:
        """Validates one request and queues it, without waiting for it.

        Args:
            servable, signature_name, inputs, output_filter, max_batch_size: As
                :meth:`predict`'s.
            on_done: Called with the task, in a batch thread, once it is
                answered (its :meth:`_Task.outcome`); ``None``: wait on its
                ``done`` event.

        Returns:
            The queued task; or, for a request that cannot be batched (a
            scalar input), its outputs, computed at once in this thread.

        Raises:
            ServingError: as :meth:`predict`, except ``DEADLINE_EXCEEDED``.
        """
        signature = servable.signature(signature_name)
        output_filter = tuple(output_filter)
        signature.check(inputs, output_filter, max_batch_size)
        shapes = {name: tuple(value.shape) for name, value in inputs.items()}
        if not shapes or any(not shape for shape in shapes.values()):
            return signature.call(inputs, output_filter)  # a scalar: not batchable
        rows = next(iter(shapes.values()))[0]
        limit = self.parameters.max_batch_size
        if rows > limit:
            raise ServingError(
                f"Task size {rows} is larger than maximum input batch size {limit} "
                "(max_batch_size in --batching-parameters-file); send at most "
                f"{limit} rows per request.")
        width = None
        k = inputs.get(WIDTH_INPUT)
        if k is not None and len(k.shape) == 1 and predict.tf_dtype(k).is_integer:
            width = int(np.max(np.asarray(k)))
        # One queue per loaded version's signature: its queued tasks keep the
        # Signature alive, so its id names nothing else meanwhile.
        key: tuple = (id(signature), servable.name, servable.version)
        if not self.parameters.pad_variable_length_inputs:
            key += tuple(sorted((n, s[1:]) for n, s in shapes.items()))
        task = _Task(signature, servable.name,
                     signature_name or predict.DEFAULT_SIGNATURE, inputs, rows,
                     output_filter, width, time.monotonic(), on_done=on_done)
        self._enqueue(key, task)
        return task

    def _enqueue(self, key: tuple, task: _Task) -> None:
        limit = self.parameters.max_batch_size
        with self._cond:
            if self._stopping:
                raise ServingError(STOPPING, "UNAVAILABLE")
            queue = self._queues.setdefault(key, collections.deque())
            if queue and queue[-1].rows + task.rows <= limit:
                queue[-1].tasks.append(task)
                queue[-1].rows += task.rows
            elif len(queue) < self.parameters.max_enqueued_batches:
                queue.append(_Batch([task], task.rows, task.enqueued))
            else:
                raise ServingError(QUEUE_FULL.format(
                    self.parameters.max_enqueued_batches, limit), "UNAVAILABLE")
            self._cond.notify()

    # ------------------------------------------------------------------ #
    # Running
    # ------------------------------------------------------------------ #

    def _take(self) -> tuple[_Batch | None, float | None]:
        """The ready batch waiting longest (removed), else when one will be."""
        now = time.monotonic()
        timeout = self.parameters.batch_timeout_micros / 1e6
        best, best_key, wake = None, None, None
        for key, queue in self._queues.items():
            head = queue[0]
            ready = (self._stopping or len(queue) > 1 or timeout <= 0
                     or head.rows >= self.parameters.max_batch_size
                     or now - head.created >= timeout)
            if ready:
                if best is None or head.created < best.created:
                    best, best_key = head, key
            else:
                due = head.created + timeout - now
                wake = due if wake is None else min(wake, due)
        if best is not None:
            queue = self._queues[best_key]
            queue.popleft()
            if not queue:
                del self._queues[best_key]
        return best, wake

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    batch, wake = self._take()
                    if batch is not None:
                        break
                    if self._stopping and not self._queues:
                        return
                    self._cond.wait(wake)
            try:
                self._run(batch)
            except Exception as error:  # noqa: BLE001 - answer, log, keep going
                LOG.exception("tfdssm serve: internal error while running a batch")
                for task in batch.tasks:
                    if not task.done.is_set():
                        task.finish(error=ServingError(f"internal error: {error}",
                                                       "INTERNAL"))

    def _run(self, batch: _Batch) -> None:
        tasks = [t for t in batch.tasks if not t.cancelled]
        if not tasks:
            return
        signature = tasks[0].signature
        labels = (tasks[0].model, tasks[0].signature_name)
        now = time.monotonic()
        pool = self.parameters.thread_pool_name
        metrics = self.metrics
        for task in tasks:
            metrics.observe(metrics.queuing, (pool, *labels),
                            (now - task.enqueued) * 1e6)
            metrics.observe(metrics.input_size, labels, task.rows)
        rows = sum(t.rows for t in tasks)
        target = next((s for s in self.parameters.allowed_batch_sizes if s >= rows),
                      rows)
        metrics.observe(metrics.batch_size, labels, target)
        metrics.observe(metrics.padding, labels, target - rows)
        metrics.inc(metrics.runs, ())
        if len(tasks) == 1 and target == rows:
            self._alone(tasks[0])
            return
        try:
            outputs = signature.call(self._merge(tasks, target - rows))
        except ServingError:
            for task in tasks:  # the one at fault gets its error, the rest answers
                self._alone(task)
            return
        if any(not v.ndim or v.shape[0] != target for v in outputs.values()):
            LOG.debug("tfdssm serve: %s has outputs that are not batch-major; its "
                      "requests run alone", signature.where)
            for task in tasks:
                self._alone(task)
            return
        offset = 0
        for task in tasks:
            result = {}
            for name in task.output_filter or signature.outputs:
                value = outputs[name][offset:offset + task.rows]
                if task.width is not None and value.ndim >= 2:
                    value = value[:, :task.width]
                result[name] = value
            offset += task.rows
            task.finish(result)

    @staticmethod
    def _alone(task: _Task) -> None:
        try:
            task.finish(task.signature.call(task.inputs, task.output_filter))
        except ServingError as error:
            task.finish(error=error)

    def _merge(self, tasks: Sequence[_Task], padding: int) -> dict[str, np.ndarray]:
        """The tasks' inputs concatenated along the first dimension (inner
        dimensions padded to the longest), plus ``padding`` copies of the
        first row; numpy, converted to tensors once by the call."""
        merged = {}
        for name in tasks[0].inputs:
            parts = [np.asarray(t.inputs[name]) for t in tasks]
            if parts[0].ndim >= 2:
                longest = np.max([p.shape[1:] for p in parts], axis=0)
                fill = b"" if parts[0].dtype.hasobject else 0
                parts = [p if p.shape[1:] == tuple(longest) else np.pad(
                    p, [(0, 0), *[(0, int(n - d)) for n, d in
                                  zip(longest, p.shape[1:], strict=True)]],
                    constant_values=fill) for p in parts]
            if padding:
                parts.append(np.repeat(parts[0][:1], padding, axis=0))
            merged[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return merged


def run(
    batcher: Batcher | None,
    servable: Any,
    signature_name: str,
    inputs: Mapping[str, tf.Tensor],
    output_filter: Sequence[str] = (),
    max_batch_size: int | None = None,
    timeout: float | None = None,
) -> dict[str, np.ndarray]:
    """One Predict request: through ``batcher``, or alone when it is ``None``
    (see :meth:`Batcher.predict`)."""
    if batcher is None:
        return servable.predict(signature_name, inputs, output_filter, max_batch_size)
    return batcher.predict(servable, signature_name, inputs, output_filter,
                           max_batch_size, timeout)
