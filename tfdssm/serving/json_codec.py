"""TF Serving's REST JSON formats <-> tensors.

Request bodies (``POST .../models/NAME[/versions/V]:predict``)::

    {"signature_name": "top_k",                       # optional
     "instances": [{"query": "cheap flights", "k": 5}, ...]}   # row format
    {"signature_name": "top_k",
     "inputs": {"query": ["cheap flights"], "k": [5]}}          # columnar format

In the row format each instance is an object with every input; a signature with
a single input also takes bare values (``"instances": ["a", "b"]``). In the
columnar format ``inputs`` is an object of batch-major lists (or a bare list for
a single-input signature). Values are converted to the signature's dtypes: JSON
strings for ``DT_STRING`` (``{"b64": "..."}`` for binary), numbers for floats,
integers for ints. Responses: ``{"predictions": [...]}`` for rows (per row, the
value of the single output or an object of all outputs) and ``{"outputs": ...}``
for columns (the single output's value or an object of outputs). Non-finite
floats are written as ``NaN``, ``Infinity``, ``-Infinity``, as TF Serving does.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ServingError
from tfdssm.serving.predict import InputSpec
from tfdssm.text.normalize import to_valid_unicode

ROW, COLUMNAR = "row", "columnar"
MAX_DEPTH = 32  # nesting of an input's lists
# Digits of the largest integer any dtype holds (uint64: 18446744073709551615).
MAX_INT_DIGITS = 20


class LongInteger:
    """A JSON integer with more digits than any integer dtype holds.

    ``json`` would convert it with ``int()``, which refuses more than
    ``sys.get_int_max_str_digits()`` (4300) digits with a ``ValueError``, and
    would spend quadratic time below that; the text is kept instead and the
    input it is sent for reports it (out of range for integers, ``float()`` of
    it for floats).
    """

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def digits(self) -> int:
        return len(self.text.lstrip("-"))

    def __repr__(self) -> str:
        return f"{self.text[:12]}... ({self.digits} digits)"


def _parse_int(text: str) -> int | LongInteger:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return LongInteger(text)
    return int(text)


def _show(value: Any) -> str:
    """``value`` as JSON for messages (a :class:`LongInteger` as its repr)."""
    return json.dumps(value, default=repr)


def parse_body(body: bytes) -> dict[str, Any]:
    """The request object, with clear errors for bad JSON or a missing key."""
    try:
        request = json.loads(body.decode("utf-8") or "null", parse_int=_parse_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ServingError(f"the request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise ServingError("the request body is nested too deeply; inputs are "
                           f"lists of at most {MAX_DEPTH} levels.") from None
    if not isinstance(request, dict):
        raise ServingError('the request body must be a JSON object like {"instances": '
                           f"[...]}}, received {type(request).__name__}.")
    if ("instances" in request) == ("inputs" in request):
        raise ServingError('the request needs exactly one of "instances" (row format) '
                           'or "inputs" (columnar format).')
    unknown = sorted(set(request) - {"instances", "inputs", "signature_name"})
    if unknown:
        raise ServingError(f"unknown key(s) {unknown} in the request; expected "
                           '"signature_name" and "instances" or "inputs".')
    name = request.get("signature_name", "")
    if not isinstance(name, str):
        raise ServingError(
            f'"signature_name" must be a string, received {_show(name)}.')
    return request


def request_inputs(
    request: Mapping[str, Any],
    specs: Mapping[str, InputSpec],
    max_batch_size: int | None = None,
) -> tuple[dict[str, tf.Tensor], str]:
    """Typed input tensors from a parsed request, and its format (row/columnar).

    Args:
        request: The parsed body (:func:`parse_body`).
        specs: The signature's inputs.
        max_batch_size: Most rows a request may have, checked on the JSON
            lists before anything is converted.
    """
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list):
            raise ServingError('"instances" must be a list with one entry per row.')
        if not instances:
            raise ServingError('empty batch: "instances" is an empty list; send at '
                               "least one row.")
        _check_rows(len(instances), '"instances"', max_batch_size)
        if len(specs) == 1 and (not isinstance(instances[0], dict)
                                or _is_b64(instances[0])):
            (name,) = specs
            columns = {name: instances}
        else:
            columns = _columns_of(instances, specs)
        return {n: to_tensor(v, specs[n], n) for n, v in columns.items()}, ROW
    inputs = request["inputs"]
    if not isinstance(inputs, dict):
        if len(specs) != 1:
            raise ServingError('"inputs" must be an object of input name -> values, '
                               f"with the inputs {sorted(specs)}.")
        inputs = {next(iter(specs)): inputs}
    for name, value in inputs.items():
        if isinstance(value, list):
            _check_rows(len(value), f'input "{name}"', max_batch_size)
    return {n: to_tensor(v, specs[n], n) if n in specs else _untyped(v, n)
            for n, v in inputs.items()}, COLUMNAR


def _check_rows(rows: int, what: str, max_batch_size: int | None) -> None:
    if max_batch_size is not None and rows > max_batch_size:
        raise ServingError(
            f"the batch of {rows} rows ({what}) is larger than the maximum batch size "
            f"{max_batch_size} of this server (tfdssm serve --max-batch-size); split "
            "the request into smaller batches.")


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _columns_of(instances: list, specs: Mapping[str, InputSpec]) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in specs}
    for row, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise ServingError(
                f"instance {row} must be an object with the inputs {sorted(specs)}, "
                f"received {_show(instance)[:80]}.")
        missing = sorted(set(specs) - set(instance))
        extra = sorted(set(instance) - set(specs))
        if missing or extra:
            raise ServingError(
                f"instance {row} does not match the signature inputs {sorted(specs)}: "
                f"missing {missing}, unexpected {extra}.")
        for name in specs:
            columns[name].append(instance[name])
    return columns


def to_tensor(value: Any, spec: InputSpec, name: str) -> tf.Tensor:
    """Converts a (nested) JSON value to a tensor of ``spec.dtype``.

    >>> spec = InputSpec("k", tf.int32, (None,))
    >>> to_tensor([3, 5], spec, "k").numpy().tolist()
    [3, 5]
    """
    shape = _shape(value, name)
    flat = list(_flatten(value))
    dtype = spec.dtype
    converted = [_convert(v, dtype, name) for v in flat]
    if dtype == tf.string:
        array = np.empty(len(converted), dtype=object)
        array[:] = converted
    else:
        try:
            array = np.asarray(converted, dtype=dtype.as_numpy_dtype)
        except OverflowError:
            raise ServingError(f'input "{name}" holds a number out of the range of '
                               f"{dtype.name} ({dtype.min} to {dtype.max}).") from None
    return tf.constant(array.reshape(shape), dtype=dtype)


def _untyped(value: Any, name: str) -> tf.Tensor:
    """An input the signature does not have (reported by the input check)."""
    return tf.constant(np.zeros(_shape(value, name), np.float32))


def _shape(value: Any, name: str, depth: int = 0) -> tuple[int, ...]:
    if not isinstance(value, list):
        return ()
    if depth >= MAX_DEPTH:
        raise ServingError(f'input "{name}" is nested more than {MAX_DEPTH} lists '
                           "deep; send [batch] or [batch, n] lists.")
    shapes = {_shape(v, name, depth + 1) for v in value}
    if len(shapes) > 1:
        raise ServingError(f'input "{name}" is ragged: its rows have different '
                           f"lengths {sorted(shapes)}; pad them to the same length "
                           '(retrieval "exclude" rows: pad with "").')
    return (len(value), *(shapes.pop() if shapes else ()))


def _flatten(value: Any):
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _convert(value: Any, dtype: tf.DType, name: str) -> Any:
    if isinstance(value, LongInteger):
        if dtype.is_floating:
            return float(value.text)  # inf beyond the dtype: the NaN check reports it
        if dtype.is_integer:
            raise ServingError(
                f'input "{name}" holds an integer of {value.digits} digits, out of the '
                f"range of {dtype.name} ({dtype.min} to {dtype.max}).")
        raise ServingError(f'input "{name}" expects {dtype.name} values, received an '
                           f"integer of {value.digits} digits.")
    if dtype == tf.string:
        if isinstance(value, str):  # lone surrogates ("\ud800") become U+FFFD
            return to_valid_unicode(value).encode("utf-8")
        if isinstance(value, dict) and set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, TypeError):
                raise ServingError(f'input "{name}" has invalid base64 in '
                                   f"{value!r}.") from None
        hint = ('send "" for an empty text' if value is None
                else f'quote it, e.g. "{value}"')
        raise ServingError(f'input "{name}" expects strings (DT_STRING), received '
                           f"{_show(value)}; {hint}.")
    if isinstance(value, bool) and dtype != tf.bool:
        raise ServingError(f'input "{name}" expects {dtype.name} numbers, received '
                           f"{_show(value)}.")
    if dtype.is_integer:
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        raise ServingError(f'input "{name}" expects integers ({dtype.name}), received '
                           f"{_show(value)}.")
    if dtype.is_floating:
        if isinstance(value, int | float):
            return value
        raise ServingError(f'input "{name}" expects numbers ({dtype.name}), received '
                           f"{_show(value)}.")
    if dtype == tf.bool and isinstance(value, bool):
        return value
    raise ServingError(f'input "{name}" has dtype {dtype.name}, which the REST API '
                       f"cannot fill from {_show(value)}; use gRPC.")


def to_json_value(array: np.ndarray) -> Any:
    """Nested lists; bytes as UTF-8 strings (``{"b64": ...}`` if not UTF-8)."""
    if array.dtype == object:
        return np.vectorize(_text, otypes=[object])(array).tolist() if array.size else (
            array.tolist())
    if array.dtype == np.float32 and array.size:
        # Shortest decimal that round-trips the float32 (0.1, not 0.10000000149).
        shortest = np.empty(array.size, dtype=object)
        shortest[:] = [float(str(v)) for v in array.ravel()]
        return shortest.reshape(array.shape).tolist()
    return array.tolist()


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def response_body(outputs: Mapping[str, np.ndarray], fmt: str) -> dict[str, Any]:
    """``{"predictions": ...}`` (row) or ``{"outputs": ...}`` (columnar)."""
    values = {name: to_json_value(np.asarray(a)) for name, a in outputs.items()}
    if fmt == COLUMNAR:
        return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    sizes = {name: np.asarray(a).shape[:1] for name, a in outputs.items()}
    if len(set(sizes.values())) > 1 or () in sizes.values():
        raise ServingError(f"the outputs have different batch sizes {sizes}; use the "
                           '"inputs" (columnar) format.', "INVALID_ARGUMENT")
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    rows = len(next(iter(values.values())))
    return {"predictions": [{n: v[i] for n, v in values.items()} for i in range(rows)]}


def dumps(data: Any) -> bytes:
    """JSON bytes (non-finite floats as ``NaN`` / ``Infinity`` like TF Serving)."""
    return json.dumps(data, ensure_ascii=False).encode("utf-8")
