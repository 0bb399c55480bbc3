"""The :class:`Feature` protocol: what a tower, an export and a server need
from a feature kind.

A kind is a frozen dataclass (JSON round-trip through ``to_config`` and
:func:`tfdssm.features.registry.feature_from_config`) that makes one Keras layer
turning its column(s) into a float32 ``[batch, width]`` field. Towers, warm-up
requests, TFLite conversion and export loading only call the members below, so
a new kind is one module: a class implementing them, decorated with
:func:`tfdssm.features.registry.register_feature_kind`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class TFLiteInput:
    """How a feature enters the builtins-only TFLite query tower.

    Attributes:
        spec: The input's ``query_tower.json`` entry without ``name``/``kind``:
            ``shape`` (batch 1), ``dtype`` (``int32`` or ``float32``) and
            encoding notes; the exporter appends ``vocabulary`` (a file path)
            when :attr:`vocabulary` is set.
        field: ``(layer, x) -> float32 [1, width]``: the feature's field from
            the integer input ``x`` (shaped as ``spec``), with the layer
            :meth:`Feature.make_layer` made.
        sample: ``(i, count) -> raw value``: the ``i``-th of ``count`` parity
            queries (raw, as a request would carry it).
        vocabulary: Lines of ``query_tower_vocab/<name>.txt``, or None.
    """

    spec: dict[str, Any]
    field: Callable[[tf.keras.layers.Layer, tf.Tensor], tf.Tensor]
    sample: Callable[[int, int], Any]
    vocabulary: tuple[str, ...] | None = None


@runtime_checkable
class Feature(Protocol):
    """A column (or a few) a tower reads.

    Attributes:
        name: The column, also the serving input name.
        kind: Registry key (``text``, ``categorical``, ...), kept in configs.
        dtype: Serving input dtype (``tf.string`` or ``tf.float32``).
        width: Width of the float32 ``[batch, width]`` field the feature adds
            to the tower's concatenated input (0 for a column another
            feature's layer reads).
        served_columns: The request columns the feature adds to the serving
            signatures: ``(name,)``, or ``()`` for a training-only feature
            served as a constant.
    """

    name: str
    kind: ClassVar[str]

    @property
    def dtype(self) -> tf.DType: ...

    @property
    def width(self) -> int: ...

    @property
    def served_columns(self) -> tuple[str, ...]: ...

    def make_layer(self) -> tf.keras.layers.Layer:
        """The layer mapping the column to a float32 ``[batch, width]`` field."""
        ...

    def read(self, layer: tf.keras.layers.Layer,
             inputs: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        """Runs ``layer`` (from :meth:`make_layer`) on a tower's inputs.

        Args:
            layer: The feature's layer.
            inputs: Column -> ``[batch]`` tensor, every column of the tower.

        Returns:
            float32 ``[batch, width]``, or None for no field (width 0).
        """
        ...

    def example_value(self) -> Any:
        """A valid value of the column for one request row (warm-up)."""
        ...

    def tflite_input(self) -> TFLiteInput | str:
        """How TFLite takes the feature, or why it cannot (a sentence)."""
        ...

    def to_config(self) -> dict[str, Any]:
        """JSON-able config including ``kind``."""
        ...

    @staticmethod
    def encode_tflite(value: Any, item: Mapping[str, Any],
                      vocabulary: Sequence[str]) -> np.ndarray:
        """Raw request value -> TFLite input (what an app does).

        Args:
            value: One raw value of the column.
            item: The input's ``query_tower.json`` entry.
            vocabulary: Lines of its vocabulary file (``[]`` if none).

        Returns:
            An array shaped as ``item["shape"]``.
        """
        ...


class ColumnFeature:
    """Defaults for a kind reading its own column into one field; mix into a
    kind's dataclass and override what differs. TFLite refuses it."""

    name: str
    kind: ClassVar[str]

    @property
    def served_columns(self) -> tuple[str, ...]:
        return (self.name,)

    def read(self, layer: tf.keras.layers.Layer,
             inputs: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        return layer(inputs[self.name])

    def tflite_input(self) -> TFLiteInput | str:
        return f"the TFLite query tower has no encoding for {self.kind} features"

    @staticmethod
    def encode_tflite(value: Any, item: Mapping[str, Any],
                      vocabulary: Sequence[str]) -> np.ndarray:
        raise NotImplementedError("this kind has no TFLite input")
