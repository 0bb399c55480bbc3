"""YoutubeDNN's *example age*: a training-only number served as a constant.

Training rows carry ``example_age = train_end_time - event_time`` (days,
:func:`example_ages`); at serving the age is 0 ("now") and the exported
signatures have no ``example_age`` input: the layer fills in
:attr:`ExampleAgeFeature.serving_value` itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError, DataError
from tfdssm.features.layers import NumericInput
from tfdssm.features.protocol import ColumnFeature, TFLiteInput
from tfdssm.features.registry import register_feature_kind

SECONDS_PER_DAY = 86400.0


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class ExampleAgeFeature(ColumnFeature):
    """A training-only number served as a constant: YoutubeDNN's example age.

    Training data fills the column (:func:`example_ages`); the tower uses
    ``serving_value`` whenever the column is absent, which is always the case at
    serving: the column is not part of the exported signatures.

    Attributes:
        name: Column name in the training data.
        mean: Standardisation mean (from the training rows).
        std: Standardisation scale.
        serving_value: The value at serving (the paper: 0, i.e. "now").
    """

    name: str = "example_age"
    mean: float = 0.0
    std: float = 1.0
    serving_value: float = 0.0
    kind: ClassVar[str] = "example_age"
    dtype: ClassVar[tf.DType] = tf.float32
    width: ClassVar[int] = 1
    served_columns: ClassVar[tuple[str, ...]] = ()  # training-only

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ConfigError(f"example age {self.name!r}: std must be positive, "
                              f"received {self.std}.")

    def make_layer(self) -> tf.keras.layers.Layer:
        return ExampleAgeInput(self.mean, self.std, self.serving_value, self.name,
                               name=f"{self.name}_example_age")

    def read(self, layer: tf.keras.layers.Layer,
             inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """The column if present (training), else ``serving_value``; ``[batch, 1]``."""
        return layer.read_columns(inputs)

    def example_value(self) -> np.float32:
        return np.float32(self.serving_value)

    def tflite_input(self) -> TFLiteInput | str:
        return "an example age is served as a constant, not a TFLite input"

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class ExampleAgeInput(NumericInput):
    """:class:`tfdssm.features.layers.NumericInput` that uses ``serving_value`` when its
    column is missing from the tower's inputs.

    Returns:
        float32 ``[batch, 1]``.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0,
                 serving_value: float = 0.0, column: str = "example_age",
                 **kwargs: Any) -> None:
        super().__init__(mean, std, **kwargs)
        self.serving_value = float(serving_value)
        self.column = column

    def read_columns(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        if self.column in inputs:
            return self(inputs[self.column])
        if not inputs:
            raise DataError(f"the tower got no inputs to size {self.column!r} by.")
        batch = tf.shape(next(iter(inputs.values())))[0]
        return self(tf.fill([batch], tf.constant(self.serving_value, tf.float32)))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "serving_value": self.serving_value,
                "column": self.column}


def example_ages(
    event_times: Sequence[float] | np.ndarray,
    train_end_time: float | None = None,
    unit_seconds: float = SECONDS_PER_DAY,
) -> np.ndarray:
    """``(train_end_time - event_time) / unit_seconds`` as float32.

    Args:
        event_times: Unix seconds of the training rows.
        train_end_time: End of the training window (default: the latest event).
        unit_seconds: Unit of the result (default days).

    >>> example_ages([0, 86400, 172800]).tolist()
    [2.0, 1.0, 0.0]
    """
    times = np.asarray(event_times, dtype=np.float64)
    end = float(times.max()) if train_end_time is None else float(train_end_time)
    return ((end - times) / unit_seconds).astype(np.float32)

