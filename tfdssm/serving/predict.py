"""Runs one Predict call on a loaded SavedModel, with TF Serving's checks.

Validation happens before the graph runs, in TF Serving's order, and every
failure is a :class:`tfdssm.errors.ServingError` whose ``code`` is the gRPC
status TF Serving uses:

* unknown signature: ``FAILED_PRECONDITION`` (``Serving signature key "x" not
  found.``, as TF Serving's ``predict_util.cc``), plus the available keys;
* missing or unexpected inputs, wrong dtype, wrong rank, inputs with different
  batch sizes, an empty batch, a batch over the server's limit, NaN or infinite
  numbers, a ``TensorProto`` that is malformed, carries its values in another
  dtype's field (``double_val`` for float32), or declares a shape whose
  expansion would exceed the request size limit, an unknown ``output_filter``
  name: ``INVALID_ARGUMENT``.

A gRPC request's ``TensorProto`` inputs are checked from their headers alone
(:func:`check_proto`: dtype, shape, rows, value counts) before any is expanded:
TensorFlow fills a declared shape by repeating the last value, so a request of
a few bytes could otherwise allocate gigabytes. Stock TF Serving fills a
float32 tensor sent in ``double_val`` with zeros; this server refuses it.
* errors raised inside the graph (e.g. the retrieval models' ``k`` range check)
  keep TensorFlow's code (``INVALID_ARGUMENT`` for ``tf.debugging.Assert``) with
  the message stripped of graph/traceback noise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from tfdssm.errors import ServingError

DEFAULT_SIGNATURE = "serving_default"
DEFAULT_MAX_BATCH_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One signature input: dtype and shape (``None`` = unknown rank/dim)."""

    name: str
    dtype: tf.DType
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        """E.g. ``string [batch]`` or ``int32 [batch, n]``."""
        if self.shape is None:
            return f"{self.dtype.name} (any shape)"
        dims = ["batch" if i == 0 and d is None else ("n" if d is None else str(d))
                for i, d in enumerate(self.shape)]
        return f"{self.dtype.name} [{', '.join(dims)}]"


def input_specs(signature_def: Any) -> dict[str, InputSpec]:
    """``{input name: InputSpec}`` of a ``SignatureDef`` proto."""
    out = {}
    for name, info in signature_def.inputs.items():
        shape = None
        if info.HasField("tensor_shape") and not info.tensor_shape.unknown_rank:
            shape = tuple(None if d.size < 0 else int(d.size)
                          for d in info.tensor_shape.dim)
        out[name] = InputSpec(name, tf.as_dtype(info.dtype), shape)
    return out


def find_signature(signature_defs: Mapping[str, Any], name: str, model: str) -> Any:
    """The ``SignatureDef`` called ``name`` (``""`` = ``serving_default``)."""
    key = name or DEFAULT_SIGNATURE
    if key not in signature_defs:
        available = ", ".join(
            sorted(k for k in signature_defs if not k.startswith("__")))
        raise ServingError(
            f'Serving signature key "{key}" not found. Model "{model}" has the '
            f"signatures: {available}. Set model_spec.signature_name (REST: "
            '"signature_name") to one of them.', "FAILED_PRECONDITION")
    return signature_defs[key]


def check_names(specs: Mapping[str, InputSpec], names: Any, where: str) -> None:
    """``INVALID_ARGUMENT`` unless ``names`` are exactly the inputs of ``specs``."""
    missing = sorted(set(specs) - set(names))
    extra = sorted(set(names) - set(specs))
    if missing or extra:
        expected = ", ".join(f"{n}: {specs[n].describe()}" for n in sorted(specs))
        raise ServingError(
            f"input size does not match {where}: it needs {{{expected}}}. "
            f"Missing but required: {{{', '.join(missing)}}}. "
            f"Sent extra: {{{', '.join(extra)}}}.")


def tf_dtype(value: tf.Tensor | np.ndarray) -> tf.DType:
    """The TensorFlow dtype of a tensor or of a numpy array (object: string)."""
    dtype = value.dtype
    if isinstance(dtype, tf.DType):
        return dtype
    return tf.string if dtype.hasobject else tf.as_dtype(dtype)


def check_inputs(
    specs: Mapping[str, InputSpec],
    inputs: Mapping[str, tf.Tensor],
    where: str,
    max_batch_size: int | None = None,
) -> None:
    """Checks names, dtypes, ranks, values and batch sizes (see the module
    docstring).

    Args:
        specs: The signature's inputs.
        inputs: Received tensors (or numpy arrays, as
            :func:`tensors_from_protos` decodes them with ``as_numpy``) by name.
        where: ``signature "x" of model "y"``, for messages.
        max_batch_size: Most rows a request may have (``None``: no limit).

    Raises:
        ServingError: ``INVALID_ARGUMENT`` naming what was wrong.
    """
    check_names(specs, inputs, where)
    batch: dict[str, int] = {}
    for name, spec in specs.items():
        tensor = inputs[name]
        dtype = tf_dtype(tensor)
        if dtype != spec.dtype:
            raise ServingError(
                f'input "{name}" of {where} must be {spec.dtype.name}, received '
                f"{dtype.name}. Expected {spec.describe()}.")
        shape = tuple(tensor.shape)
        if spec.shape is not None:
            fits = len(shape) == len(spec.shape) and all(
                want is None or want == got
                for want, got in zip(spec.shape, shape, strict=True))
            if not fits:
                raise ServingError(
                    f'input "{name}" of {where} must have shape {spec.describe()}, '
                    f"received shape {list(shape)}.")
        if shape:
            batch[name] = shape[0]
        if spec.dtype.is_floating:
            finite = np.isfinite(np.asarray(tensor))
            if not finite.all():
                position = np.argwhere(~finite)[0].tolist()
                raise ServingError(
                    f'input "{name}" of {where} holds NaN or infinite values (first '
                    f"at index {position}); send finite numbers.")
    if len(set(batch.values())) > 1:
        sizes = ", ".join(f"{n}: {b}" for n, b in sorted(batch.items()))
        raise ServingError(
            f"inputs of {where} must have the same batch size (first dimension); "
            f"received {sizes}.")
    if batch and not next(iter(batch.values())):
        raise ServingError(
            f"empty batch: the inputs of {where} have 0 rows; send at least one.")
    rows = max(batch.values(), default=0)
    if max_batch_size is not None and rows > max_batch_size:
        raise ServingError(
            f"the batch of {rows} rows is larger than the maximum batch size "
            f"{max_batch_size} of this server (tfdssm serve --max-batch-size); "
            "split the request into smaller batches.")


@dataclasses.dataclass(frozen=True)
class Signature:
    """A signature prepared once per (model, version, signature): what
    :func:`run` would otherwise derive from the ``SignatureDef`` per request.

    Attributes:
        function: ``loaded.signatures[name]``.
        signature_def: Its ``SignatureDef`` proto.
        specs: ``input_specs(signature_def)``.
        outputs: The output names, in the ``SignatureDef``'s order.
        where: ``signature "x" of model "y"``, for messages.
    """

    function: Any
    signature_def: Any
    specs: Mapping[str, InputSpec]
    outputs: tuple[str, ...]
    where: str
    flat_order: tuple[str, ...] | None = None

    @classmethod
    def of(cls, function: Any, signature_def: Any, where: str) -> Signature:
        specs = input_specs(signature_def)
        return cls(function, signature_def, specs, tuple(signature_def.outputs),
                   where, _flat_order(function, specs))

    def check(self, inputs: Mapping[str, tf.Tensor], output_filter: Sequence[str] = (),
              max_batch_size: int | None = None) -> None:
        """Everything :func:`run` checks before calling the graph.

        Raises:
            ServingError: ``INVALID_ARGUMENT`` naming what was wrong.
        """
        check_inputs(self.specs, inputs, self.where, max_batch_size)
        for name in output_filter:
            if name not in self.outputs:
                raise ServingError(
                    f"output tensor alias not found in {self.where}: {name}. Outputs "
                    f"expected to be in the set {{{', '.join(sorted(self.outputs))}}}.")
        if len(set(output_filter)) != len(output_filter):
            raise ServingError(
                f"duplicate output tensor alias in {list(output_filter)}.")

    def call(self, inputs: Mapping[str, tf.Tensor],
             output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Calls the graph on checked inputs (see :meth:`check`).

        Raises:
            ServingError: an error raised inside the graph, with TensorFlow's
                code and a cleaned message.
        """
        function = self.function
        inputs = {name: as_tensor(value, self.specs[name].dtype)
                  for name, value in inputs.items()}
        try:
            if self.flat_order is not None:  # inputs checked: skip the re-binding
                result = function._call_flat([inputs[n] for n in self.flat_order],
                                             function.captured_inputs)
            else:
                result = function(**inputs)
        except tf.errors.OpError as error:
            code = _GRPC_CODES.get(type(error).__name__, "INTERNAL")
            raise ServingError(clean_tf_message(error.message), code) from None
        return {name: result[name].numpy() for name in output_filter or self.outputs}


def as_tensor(value: tf.Tensor | np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """``tf.constant(value, dtype)`` for a numpy array, without its Python layers.

    ``tf.constant`` copies the array and then creates the ``EagerTensor``
    (about 20 us an input, most of it Python); the server's arrays are its own
    and never written after decoding, so the tensor is created directly (about
    13 us). Tensors pass through; anything the direct path refuses takes
    ``tf.constant`` (which raises its usual error).

    Args:
        value: An array (or a tensor, returned as is).
        dtype: The signature input's dtype.
    """
    if isinstance(value, tf.Tensor):
        return value
    if _EAGER_TENSOR is not None:
        try:
            context = _EAGER_CONTEXT()
            context.ensure_initialized()
            return _EAGER_TENSOR(value, context.device_name, dtype.as_datatype_enum)
        except (TypeError, ValueError):
            pass
    return tf.constant(value, dtype)


def _eager_tensor_type() -> tuple[Any, Any]:
    """TensorFlow's ``EagerTensor`` class and ``context.context``, else Nones."""
    try:
        from tensorflow.python.eager import context  # noqa: PLC0415
        from tensorflow.python.framework import ops  # noqa: PLC0415
    except ImportError:  # pragma: no cover - another TensorFlow layout
        return None, None
    tensor, current = getattr(ops, "EagerTensor", None), getattr(context, "context",
                                                                 None)
    return (tensor, current) if tensor is not None and current is not None else (
        None, None)


_EAGER_TENSOR, _EAGER_CONTEXT = _eager_tensor_type()


def _flat_order(function: Any,
                specs: Mapping[str, InputSpec]) -> tuple[str, ...] | None:
    """The order in which a loaded signature's ``_call_flat`` takes its inputs.

    ``function(**inputs)`` binds the keyword arguments to the traced signature
    and casts each tensor against its spec, about 0.1-0.2 ms a call in Python;
    a request's inputs have been checked against the ``SignatureDef`` already,
    so they are passed in the flat order directly. ``None`` (call it the
    usual way) when this TensorFlow's signature functions do not look as
    expected: keyword-only inputs named as the ``SignatureDef``'s, and a
    ``_call_flat(tensors, captured_inputs)`` method.
    """
    keywords = getattr(function, "_arg_keywords", None)
    if (not callable(getattr(function, "_call_flat", None))
            or getattr(function, "_num_positional_args", None) != 0
            or keywords is None or sorted(keywords) != sorted(specs)
            or len(keywords) != len(specs)):
        return None
    return tuple(keywords)


def run(
    function: Any,
    signature_def: Any,
    inputs: Mapping[str, tf.Tensor],
    where: str,
    output_filter: Sequence[str] = (),
    max_batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Validates ``inputs`` and calls a loaded signature function.

    Args:
        function: ``loaded.signatures[name]``.
        signature_def: Its ``SignatureDef`` proto.
        inputs: Received tensors by name.
        where: ``signature "x" of model "y"``, for messages.
        output_filter: Output names to return (default: all).
        max_batch_size: Most rows a request may have (``None``: no limit).

    Returns:
        Output name -> numpy array.
    """
    return run_signature(Signature.of(function, signature_def, where), inputs,
                         output_filter, max_batch_size)


def run_signature(
    signature: Signature,
    inputs: Mapping[str, tf.Tensor],
    output_filter: Sequence[str] = (),
    max_batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`run` with the signature prepared beforehand."""
    signature.check(inputs, output_filter, max_batch_size)
    return signature.call(inputs, output_filter)


def clean_tf_message(message: str) -> str:
    """A TensorFlow error message without graph locations and Python frames.

    >>> clean_tf_message("Graph execution error:\\n\\nDetected at node x defined at"
    ...     " (most recent call last):\\n  File a.py\\n\\nassertion failed: "
    ...     "[k must be <= 10; received k =] [50 3]\\n\\t [[{{node x}}]]")
    'k must be <= 10; received k = 50 3'
    """
    found = re.search(r"assertion failed: (.*?)(?:\n|\s*\[\[|$)", message, re.S)
    if found:
        text = found.group(1).strip()
        text = re.sub(r"\]\s+\[", " ", text)
        return text.removeprefix("[").removesuffix("]")
    lines = []
    for line in message.splitlines():
        stripped = line.strip()
        if (not stripped or stripped.startswith(("File ", "Detected at node", "[[{{"))
                or stripped == "Graph execution error:"):
            continue
        lines.append(stripped)
    return " ".join(lines).split(" [[")[0] or message


_GRPC_CODES = {
    "InvalidArgumentError": "INVALID_ARGUMENT",
    "NotFoundError": "NOT_FOUND",
    "FailedPreconditionError": "FAILED_PRECONDITION",
    "OutOfRangeError": "OUT_OF_RANGE",
    "ResourceExhaustedError": "RESOURCE_EXHAUSTED",
    "UnimplementedError": "UNIMPLEMENTED",
    "UnavailableError": "UNAVAILABLE",
    "DeadlineExceededError": "DEADLINE_EXCEEDED",
    "CancelledError": "CANCELLED",
}


# The value field of each dtype a request may carry (TF's ``ProtoHelper``).
_INT_VAL = ("int32", "int16", "int8", "uint8", "uint16", "qint32", "qint16", "qint8",
            "quint16", "quint8", "int4", "uint4", "int2", "uint2")
VALUE_FIELDS: dict[str, str] = {
    "float32": "float_val", "float64": "double_val", "int64": "int64_val",
    "uint32": "uint32_val", "uint64": "uint64_val", "bool": "bool_val",
    "string": "string_val", "float16": "half_val", "bfloat16": "half_val",
    "complex64": "scomplex_val", "complex128": "dcomplex_val",
    "float8_e5m2": "float8_val", "float8_e4m3fn": "float8_val",
    **dict.fromkeys(_INT_VAL, "int_val"),
}
_ALL_FIELDS = frozenset(VALUE_FIELDS.values())
# What a string value costs on the wire at least: a field tag and a length byte.
# A tensor is charged what a request carrying every one of its values would
# send (string bytes + 2 per value; numbers at their in-memory size).
STRING_VALUE_OVERHEAD = 2


class ProtoCheck(NamedTuple):
    """What :func:`check_proto` learned about a ``TensorProto`` (nothing expanded).

    A named tuple: made for every input of every request, it costs a fifth of
    a frozen dataclass.

    Attributes:
        dtype: Its dtype.
        shape: Its declared shape.
        elements: Elements the shape declares.
        carried: Values the proto carries (the rest repeat the last one).
        expanded_bytes: Bytes of the expanded tensor, as charged against
            ``--max-request-bytes`` (see :data:`STRING_VALUE_OVERHEAD`).
    """

    dtype: tf.DType
    shape: tuple[int, ...]
    elements: int
    carried: int
    expanded_bytes: int


def check_proto(
    name: str,
    proto: tensor_pb2.TensorProto,
    spec: InputSpec | None = None,
    where: str = "the request",
    max_batch_size: int | None = None,
) -> ProtoCheck:
    """Validates a request ``TensorProto`` from its header and value counts alone.

    Nothing is expanded: a ``TensorProto`` may carry one value and declare a
    shape that TensorFlow fills by repeating it, so a request of a few bytes
    could otherwise make the server allocate gigabytes before any limit applies.

    Args:
        name: The input name, for messages.
        proto: The received tensor.
        spec: The signature's input (``None``: dtype and shape not checked).
        where: ``signature "x" of model "y"``, for messages.
        max_batch_size: Most rows (first dimension) it may declare.

    Returns:
        Its dtype, shape, element counts and expanded size.

    Raises:
        ServingError: ``INVALID_ARGUMENT``: a negative dimension, a dtype a
            request cannot carry or that is not the signature's, a shape that
            is not the signature's, more rows than ``max_batch_size``, values in
            a field of another dtype (``double_val`` for a float32 input: TF
            would read zeros), more values than the shape holds, or
            ``tensor_content`` of the wrong size.
    """
    dims = tuple([d.size for d in proto.tensor_shape.dim])
    if dims and min(dims) < 0:
        raise ServingError(f'input "{name}" has a negative dimension in its shape '
                           f"{list(dims)}; send a fully defined shape.")
    info = _PROTO_DTYPES.get(proto.dtype) or _proto_dtype(name, proto.dtype)
    dtype, field, itemsize, pair = info
    if spec is not None:
        if dtype != spec.dtype:
            raise ServingError(
                f'input "{name}" of {where} must be {spec.dtype.name}, received '
                f"{dtype.name}. Expected {spec.describe()}.")
        if spec.shape is not None and not _fits(spec.shape, dims):
            raise ServingError(
                f'input "{name}" of {where} must have shape {spec.describe()}, '
                f"received shape {list(dims)}.")
    if max_batch_size is not None and dims and dims[0] > max_batch_size:
        raise ServingError(
            f'the batch of {dims[0]} rows (input "{name}") is larger than the maximum '
            f"batch size {max_batch_size} of this server (tfdssm serve "
            "--max-batch-size); split the request into smaller batches.")
    elements = math.prod(dims)
    for descriptor, _ in proto.ListFields():  # the set fields only
        if descriptor.name != field and descriptor.name in _ALL_FIELDS:
            foreign = sorted(f.name for f, _ in proto.ListFields()
                             if f.name in _ALL_FIELDS and f.name != field)
            raise ServingError(
                f'input "{name}" is {dtype.name} but carries its values in '
                f"{', '.join(foreign)}; a {dtype.name} tensor holds them in {field} "
                "or tensor_content (TensorFlow would read zeros). Build it with "
                f"tf.make_tensor_proto(values, tf.{dtype.name}).")
    content = proto.tensor_content
    if content:
        if not itemsize or len(content) != elements * itemsize:
            raise ServingError(
                f'input "{name}" is not a valid TensorProto: its tensor_content has '
                f"{len(content)} bytes, its shape {list(dims)} of "
                f"{dtype.name} needs {elements * itemsize}; build it with "
                "tf.make_tensor_proto.")
        return ProtoCheck(dtype, dims, elements, elements, elements * itemsize)
    values = getattr(proto, field)
    carried = len(values) // (2 if pair else 1)
    if carried > elements:
        raise ServingError(
            f'input "{name}" is not a valid TensorProto: it carries {carried} values '
            f"for its shape {list(dims)} of {elements} elements; build it with "
            "tf.make_tensor_proto.")
    if not itemsize:  # string
        payload = sum(map(len, values))
        if carried < elements:
            payload += (elements - carried) * (len(values[-1]) if carried else 0)
        size = payload + STRING_VALUE_OVERHEAD * elements
    else:
        size = elements * itemsize
    return ProtoCheck(dtype, dims, elements, carried, size)


def _fits(want: tuple[int | None, ...], dims: tuple[int, ...]) -> bool:
    """Whether ``dims`` is a shape of the spec shape ``want``."""
    if len(want) != len(dims):
        return False
    for expected, got in zip(want, dims):  # noqa: B905 - lengths checked
        if expected is not None and expected != got:
            return False
    return True


# dtype enum -> (dtype, value field, item size (0: string), two numbers a value)
# of every dtype a request may carry, filled on first sight (see _proto_dtype).
_PROTO_DTYPES: dict[int, tuple[tf.DType, str, int, bool]] = {}


def _proto_dtype(name: str, enum: int) -> tuple[tf.DType, str, int, bool]:
    """:data:`_PROTO_DTYPES`'s entry of ``enum`` (``name``: the input, for
    messages).

    Raises:
        ServingError: ``INVALID_ARGUMENT``: not a dtype a request can carry.
    """
    try:
        dtype = tf.as_dtype(enum)
    except TypeError:
        raise ServingError(f'input "{name}" has an unknown dtype (enum value '
                           f"{enum}); send a TensorFlow dtype.") from None
    field = VALUE_FIELDS.get(dtype.name)
    if field is None or dtype._is_ref_dtype:
        raise ServingError(f'input "{name}" has dtype {dtype.name}, which a request '
                           "cannot carry; send the signature's dtype.")
    itemsize = 0 if dtype == tf.string else np.dtype(dtype.as_numpy_dtype).itemsize
    info = _PROTO_DTYPES[enum] = (dtype, field, itemsize,
                                  field in ("scomplex_val", "dcomplex_val"))
    return info


def tensors_from_protos(
    protos: Mapping[str, tensor_pb2.TensorProto],
    specs: Mapping[str, InputSpec] | None = None,
    where: str = "the request",
    max_bytes: int | None = None,
    max_batch_size: int | None = None,
    as_numpy: bool = False,
) -> dict[str, tf.Tensor | np.ndarray]:
    """Checks every input with :func:`check_proto`, then expands them.

    Args:
        protos: The request's inputs.
        specs: The signature's inputs (``None``: not checked against them).
        where: ``signature "x" of model "y"``, for messages.
        max_bytes: Most bytes all inputs may take once expanded.
        max_batch_size: Most rows an input may declare.
        as_numpy: Return the common dtypes (float32/64, int32/64, bool,
            string) as numpy arrays (strings: object arrays of bytes), which
            :class:`Signature` converts when it runs them, and a batch converts
            once for all its requests.

    Raises:
        ServingError: ``INVALID_ARGUMENT`` before anything is expanded.
    """
    if specs is not None:
        check_names(specs, protos, where)
    total = 0
    checks = {}
    for name, proto in protos.items():
        spec = None if specs is None else specs.get(name)
        check = checks[name] = check_proto(name, proto, spec, where, max_batch_size)
        total += check.expanded_bytes
        if max_bytes is not None and total > max_bytes:
            raise ServingError(
                f'input "{name}" declares shape {list(check.shape)} of '
                f"{check.dtype.name} = {check.elements} elements (it carries "
                f"{check.carried}; TensorFlow repeats the last one), "
                f"{check.expanded_bytes} bytes once expanded; this server accepts at "
                f"most {max_bytes} bytes per request (tfdssm serve "
                "--max-request-bytes). Send the values themselves, in smaller "
                "batches.")
    return {name: _decode(name, proto, checks[name], as_numpy)
            for name, proto in protos.items()}


def tensor_from_proto(
    name: str, proto: tensor_pb2.TensorProto, max_elements: int | None = None
) -> tf.Tensor:
    """An eager tensor from a request ``TensorProto`` (bad protos: INVALID_ARGUMENT).

    Requests should go through :func:`tensors_from_protos`, which bounds the
    expansion first.

    Args:
        name: The input name, for messages.
        proto: The received tensor.
        max_elements: Most elements the tensor may declare (``None``: no limit).
    """
    check = check_proto(name, proto)
    if max_elements is not None and check.elements > max_elements:
        raise ServingError(
            f'input "{name}" declares shape {list(check.shape)} = {check.elements} '
            f"elements; at most {max_elements} are accepted. Send smaller batches.")
    return _decode(name, proto, check)


# dtype enum -> numpy dtype of the request dtypes _decode reads itself
# (tf.make_ndarray costs ~0.1 ms a tensor, most of a small request's decoding).
_DIRECT = {
    types_pb2.DT_FLOAT: np.dtype(np.float32), types_pb2.DT_DOUBLE: np.dtype(np.float64),
    types_pb2.DT_INT32: np.dtype(np.int32), types_pb2.DT_INT64: np.dtype(np.int64),
    types_pb2.DT_BOOL: np.dtype(np.bool_), types_pb2.DT_STRING: np.dtype(object),
}


def _decode(name: str, proto: tensor_pb2.TensorProto, check: ProtoCheck,
            as_numpy: bool = False) -> tf.Tensor | np.ndarray:
    """The tensor of a proto that :func:`check_proto` accepted (a numpy
    array with ``as_numpy``, for the dtypes read directly).

    A proto carrying every value (in ``tensor_content`` or its typed field) of
    a common dtype is read directly; others (broadcast, padded, empty, other
    dtypes) take ``tf.make_ndarray``, whose results the direct path matches.
    """
    dtype = _DIRECT.get(proto.dtype)
    if dtype is not None and check.elements and check.carried == check.elements:
        content = proto.tensor_content
        if content:  # its size was checked
            array = np.frombuffer(content, dtype).reshape(check.shape)
        elif dtype.hasobject:
            array = np.empty(check.elements, object)
            array[:] = list(proto.string_val)
            array = array.reshape(check.shape)
        else:
            field = getattr(proto, VALUE_FIELDS[check.dtype.name])
            array = np.fromiter(field, dtype, check.elements).reshape(check.shape)
        return array if as_numpy else as_tensor(array, check.dtype)
    try:
        return tf.constant(tf.make_ndarray(proto), dtype=check.dtype)
    except Exception as error:  # noqa: BLE001 - any malformed proto is the client's
        raise ServingError(
            f'input "{name}" is not a valid TensorProto ({type(error).__name__}: '
            f"{error}); build it with tf.make_tensor_proto.") from None


def tensor_to_proto(
    array: np.ndarray, out: tensor_pb2.TensorProto | None = None
) -> tensor_pb2.TensorProto:
    """A ``TensorProto`` with typed value fields (``float_val``, ``string_val``...).

    TF Serving answers with typed fields rather than ``tensor_content``, and
    clients that read ``response.outputs["scores"].float_val`` rely on it.

    Args:
        array: The values.
        out: An empty proto to fill in place (e.g. ``response.outputs[name]``,
            which saves a copy); default: a new one.

    >>> tensor_to_proto(np.array([[1.5]], np.float32)).float_val
    [1.5]
    """
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto() if out is None else out
    shape = proto.tensor_shape
    shape.SetInParent()  # present even for a scalar
    for size in array.shape:
        shape.dim.add().size = int(size)
    if array.dtype == object or array.dtype.kind in "SU":
        proto.dtype = types_pb2.DT_STRING
        values = array.ravel().tolist()
        if not all(type(v) is bytes for v in values):
            values = [v if isinstance(v, bytes) else str(v).encode("utf-8")
                      for v in values]
        proto.string_val.extend(values)
        return proto
    typed = _TYPED_FIELDS.get(array.dtype)
    if typed is None:
        proto.CopyFrom(tf.make_tensor_proto(array))
        return proto
    proto.dtype = typed[0]
    getattr(proto, typed[1]).extend(array.ravel().tolist())
    return proto


# numpy dtype -> (dtype enum, typed value field) of tensor_to_proto's answers.
_TYPED_FIELDS = {
    np.dtype(np.float32): (types_pb2.DT_FLOAT, "float_val"),
    np.dtype(np.float64): (types_pb2.DT_DOUBLE, "double_val"),
    np.dtype(np.int32): (types_pb2.DT_INT32, "int_val"),
    np.dtype(np.int16): (types_pb2.DT_INT16, "int_val"),
    np.dtype(np.int8): (types_pb2.DT_INT8, "int_val"),
    np.dtype(np.uint8): (types_pb2.DT_UINT8, "int_val"),
    np.dtype(np.int64): (types_pb2.DT_INT64, "int64_val"),
    np.dtype(np.bool_): (types_pb2.DT_BOOL, "bool_val"),
}
