"""The per-request fast paths of ``tfdssm.serving.predict``: they must answer
exactly what the slow paths they replace answer (``tf.constant``; the
uncached dtype lookup of ``check_proto``)."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from tfdssm.errors import ServingError
from tfdssm.serving import predict

STRINGS = np.empty((2, 3), object)
STRINGS[:] = [[b"a", b"bc", b""], [b"\xff", b"x y", b"z"]]
CASES = [
    (np.array([1.5, -2.0], np.float32), tf.float32),
    (np.array([[1, 2], [3, 4]], np.int64), tf.int32),  # converted, as tf.constant
    (np.array([7], np.int64), tf.int64),
    (np.array([True, False]), tf.bool),
    (np.array([0.25], np.float64), tf.float64),
    (STRINGS, tf.string),
    (STRINGS[0], tf.string),
    (np.frombuffer(np.array([3, 4], np.int32).tobytes(), np.int32), tf.int32),
]


@pytest.mark.parametrize(("array", "dtype"), CASES,
                         ids=[f"{d.name}-{a.shape}" for a, d in CASES])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "fallback"])
def test_as_tensor_equals_tf_constant(array, dtype, direct, monkeypatch):
    if not direct:  # a TensorFlow without the private EagerTensor path
        monkeypatch.setattr(predict, "_EAGER_TENSOR", None)
    elif predict._EAGER_TENSOR is None:
        pytest.fail("this TensorFlow has no ops.EagerTensor: the fast path is off")
    got = predict.as_tensor(array, dtype)
    want = tf.constant(array, dtype)
    assert isinstance(got, tf.Tensor)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert got.device == want.device


def test_as_tensor_passes_tensors_through_and_refuses_as_tf_constant():
    tensor = tf.constant([1.0])
    assert predict.as_tensor(tensor, tf.float32) is tensor
    with pytest.raises((TypeError, ValueError)) as constant_error:
        tf.constant(np.array([b"x"], object), tf.float32)
    with pytest.raises(constant_error.type):
        predict.as_tensor(np.array([b"x"], object), tf.float32)


def _proto(values, dtype):
    return tf.make_tensor_proto(values, dtype)


def test_check_proto_answers_the_same_with_the_dtype_cached(monkeypatch):
    """The first sight of a dtype fills the cache; later protos of it take
    the cached entry and must be checked just as strictly."""
    monkeypatch.setattr(predict, "_PROTO_DTYPES", {})
    spec = predict.InputSpec("x", tf.float32, (None,))
    good = _proto(np.array([1.0, 2.0], np.float32), tf.float32)
    first = predict.check_proto("x", good, spec)
    assert types_pb2.DT_FLOAT in predict._PROTO_DTYPES
    assert predict.check_proto("x", good, spec) == first
    assert first == (tf.float32, (2,), 2, 2, 8)

    foreign = _proto(np.array([1.0], np.float32), tf.float32)
    foreign.ClearField("tensor_content")
    foreign.double_val.append(1.0)
    with pytest.raises(ServingError, match=r"carries its values in double_val"):
        predict.check_proto("x", foreign, spec)
    short = _proto(np.array([1.0, 2.0], np.float32), tf.float32)
    short.tensor_content = short.tensor_content[:4]
    with pytest.raises(ServingError, match=r"tensor_content has 4 bytes.*needs 8"):
        predict.check_proto("x", short, spec)
    with pytest.raises(ServingError, match=r'must be float32, received int32'):
        predict.check_proto("x", _proto(np.array([1], np.int32), tf.int32), spec)
    with pytest.raises(ServingError, match=r"must have shape float32 \[batch\], "
                                           r"received shape \[1, 2\]"):
        predict.check_proto("x", _proto(np.ones((1, 2), np.float32), tf.float32),
                            spec)
    strings = predict.check_proto("s", _proto(np.array([b"ab", b"c"], object),
                                              tf.string))
    assert strings == (tf.string, (2,), 2, 2, 3 + 2 * predict.STRING_VALUE_OVERHEAD)
    assert predict._PROTO_DTYPES[types_pb2.DT_STRING][2] == 0  # no item size


def test_check_proto_refuses_dtypes_a_request_cannot_carry_every_time(monkeypatch):
    monkeypatch.setattr(predict, "_PROTO_DTYPES", {})
    for _ in range(2):  # refusals are never cached
        unknown = _proto(np.array([1.0], np.float32), tf.float32)
        unknown.dtype = 999
        with pytest.raises(ServingError, match=r"unknown dtype \(enum value 999\)"):
            predict.check_proto("x", unknown)
        resource = _proto(np.array([1.0], np.float32), tf.float32)
        resource.dtype = types_pb2.DT_RESOURCE
        with pytest.raises(ServingError, match="dtype resource, which a request "
                                               "cannot carry"):
            predict.check_proto("x", resource)
    assert predict._PROTO_DTYPES == {}
