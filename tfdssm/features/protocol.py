"""The :class:`Feature` protocol: what a tower, an export and a server need
from a feature kind.

A kind is a frozen dataclass (JSON round-trip through ``to_config`` and
:func:`tfdssm.features.registry.feature_from_config`) that makes one Keras layer
turning its column(s) into a float32 ``[batch, width]`` field.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import tensorflow as tf


@runtime_checkable
class Feature(Protocol):
    """A column (or a few) a tower reads.

    Attributes:
        name: The column, also the serving input name.
        kind: Registry key (``text``, ``categorical``, ...), kept in configs.
        dtype: Serving input dtype (``tf.string`` or ``tf.float32``).
    """

    name: str
    kind: ClassVar[str]

    @property
    def dtype(self) -> tf.DType: ...

    def make_layer(self) -> tf.keras.layers.Layer:
        """The layer mapping the column to a float32 ``[batch, width]`` field."""
        ...

    def to_config(self) -> dict[str, Any]:
        """JSON-able config including ``kind``."""
        ...
