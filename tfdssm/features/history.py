"""History features: a user's past items, pooled into one vector in the graph.

Serving contract (batch-major ``[batch]`` tensors, as every tfdssm input):

* the history column, string ``[batch]``: item ids joined by ``separator``, oldest
  first and **most recent last**, e.g. ``"12|50|7"``; ``""`` is an empty history
  (the pooled vector is zeros). Empty tokens (``"12||7"``) are ignored.
* an optional timestamps column, string ``[batch]``: the events' times in Unix
  seconds, joined the same way, one per id (``"881250949|881251000|881252000"``);
  a different count fails the request with ``INVALID_ARGUMENT``.
* an optional "now" column, float32 ``[batch]``: the query time in Unix seconds;
  at serving, the request time. (float32 resolves today's Unix times to about
  two minutes: fine for half-lives of hours or more.)

In the graph the ids are split, the most recent ``max_length`` kept (default 50;
older ones are dropped), embedded and pooled:

* ``mean``, ``sum``: the plain mean (YoutubeDNN) or sum of the item embeddings;
* ``time_decay``: a time-decayed mean, weights ``2 ** (-age / half_life)``
  normalised to sum to 1, where ``age = now - timestamp`` (``now`` defaults to
  the history's latest timestamp; events after ``now`` count as age 0). Because
  the weights are normalised, a common shift of all ages cancels: ``now`` only
  matters through that clipping;
* ``time_decay_sum``: the same weights, not normalised, so a stale history fades
  towards zero; needs ``now``;
* ``attention``: a softmax over learned scores ``v . tanh(W e_i + b)`` (plus the
  time-decay log-weights when timestamps are given).

The item embeddings can be the candidate tower's: ``shared_embedding="movie_id"``
makes the history read the candidate tower's ``movie_id``
:class:`tfdssm.features.layers.CategoricalEmbedding` (one variable, updated by both
towers). :class:`tfdssm.model.DSSM` links the two when it is built (also when
rebuilt from its config); for a tower used on its own, call
:func:`link_shared_embeddings`.

A tower reads the timestamps and "now" columns through :class:`ContextFeature`
specs listed among its features (:func:`history_features` makes all three), so
they appear in the exported signatures like any other column.

>>> feature = HistoryFeature("history", vocabulary=("1", "2", "3"), embedding_dim=4)
>>> layer = feature.make_layer()
>>> layer({"ids": tf.constant(["1|2", "", "3|9|1"])}).shape
TensorShape([3, 4])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError, DataError
from tfdssm.features.layers import CategoricalEmbedding
from tfdssm.features.protocol import ColumnFeature, TFLiteInput
from tfdssm.features.registry import register_feature_kind

POOLINGS = ("mean", "sum", "time_decay", "time_decay_sum", "attention")
TIME_UNITS = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0, "days": 86400.0}
DEFAULT_MAX_LENGTH = 50
HISTORY_TFLITE_REASON = ("a history needs string splitting, which is not a TFLite "
                         "builtin")


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class HistoryFeature(ColumnFeature):
    """A sequence of item ids (plus optional timestamps) pooled into one vector.

    Attributes:
        name: The ids column, also the serving input name.
        vocabulary: Known item ids (unknown ones share one OOV row); leave empty
            with ``shared_embedding``.
        embedding_dim: Item embedding size (= the pooled vector's size; with
            ``shared_embedding``, the shared feature's ``embedding_dim``).
        max_length: Most recent items kept per history.
        separator: Joins the ids (and timestamps) in one string.
        pooling: One of :data:`POOLINGS`.
        timestamps: Column with the matching event times (Unix seconds).
        now: Column with the query time (Unix seconds), float32.
        half_life: Time for an event's weight to halve, in ``half_life_unit``.
        half_life_unit: ``seconds``, ``minutes``, ``hours`` or ``days``.
        shared_embedding: Name of a :class:`tfdssm.features.CategoricalFeature`
            (usually the candidate id) whose embedding the history reuses.
        attention_units: Hidden size of the attention scorer.
    """

    name: str
    vocabulary: tuple[str, ...] = ()
    embedding_dim: int = 32
    max_length: int = DEFAULT_MAX_LENGTH
    separator: str = "|"
    pooling: str = "mean"
    timestamps: str | None = None
    now: str | None = None
    half_life: float = 7.0
    half_life_unit: str = "days"
    shared_embedding: str | None = None
    attention_units: int = 32
    kind: ClassVar[str] = "history"
    dtype: ClassVar[tf.DType] = tf.string

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"history {self.name!r}: pooling must be one of {POOLINGS}, received "
                f"{self.pooling!r}."
            )
        if self.pooling in ("time_decay", "time_decay_sum") and not self.timestamps:
            raise ConfigError(
                f"history {self.name!r}: pooling={self.pooling!r} needs timestamps: "
                "pass timestamps='<column of the event times>'."
            )
        if self.pooling == "time_decay_sum" and not self.now:
            raise ConfigError(
                f"history {self.name!r}: pooling='time_decay_sum' weighs events by "
                "their age at query time: pass now='<column of the query time>'."
            )
        if self.now and not self.timestamps:
            raise ConfigError(
                f"history {self.name!r}: now={self.now!r} is only used with "
                "timestamps; pass timestamps='<column>' too, or drop now."
            )
        if self.half_life_unit not in TIME_UNITS:
            raise ConfigError(
                f"history {self.name!r}: half_life_unit must be one of "
                f"{sorted(TIME_UNITS)}, received {self.half_life_unit!r}."
            )
        if not self.half_life > 0 or not math.isfinite(self.half_life):
            raise ConfigError(f"history {self.name!r}: half_life must be a positive "
                              f"number, received {self.half_life}.")
        for field in ("embedding_dim", "max_length", "attention_units"):
            if int(getattr(self, field)) < 1:
                raise ConfigError(f"history {self.name!r}: {field} must be >= 1, "
                                  f"received {getattr(self, field)}.")
        if not self.separator:
            raise ConfigError(f"history {self.name!r}: separator must be non-empty.")

    @property
    def half_life_seconds(self) -> float:
        return float(self.half_life) * TIME_UNITS[self.half_life_unit]

    @property
    def columns(self) -> dict[str, str]:
        """Input role -> column: ``ids``, and ``timestamps``/``now`` if used."""
        out = {"ids": self.name}
        if self.timestamps:
            out["timestamps"] = self.timestamps
        if self.now:
            out["now"] = self.now
        return out

    def make_layer(self) -> tf.keras.layers.Layer:
        return HistoryEmbedding(
            list(self.vocabulary), self.embedding_dim, self.max_length,
            self.separator, self.pooling, self.half_life_seconds, self.columns,
            self.shared_embedding, self.attention_units, name=f"{self.name}_history",
        )

    @property
    def width(self) -> int:
        return int(self.embedding_dim)

    def read(self, layer: tf.keras.layers.Layer,
             inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Feeds the layer its ids, timestamps and "now" columns; ``[batch, width]``."""
        return layer.read_columns(inputs)

    def example_value(self) -> str:
        return ""  # an empty history

    def tflite_input(self) -> TFLiteInput | str:
        return HISTORY_TFLITE_REASON

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self),
                "vocabulary": list(self.vocabulary)}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class ContextFeature(ColumnFeature):
    """A raw column that another feature's layer reads (a history's timestamps,
    the query time); it is a model input but adds no vector of its own.

    Attributes:
        name: Column name, also the serving input name.
        value_type: ``string`` or ``float32``.
    """

    name: str
    value_type: str = "float32"
    kind: ClassVar[str] = "context"
    width: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.value_type not in ("string", "float32"):
            raise ConfigError(
                f"context column {self.name!r}: value_type must be 'string' or "
                f"'float32', received {self.value_type!r}."
            )

    @property
    def dtype(self) -> tf.DType:
        return tf.string if self.value_type == "string" else tf.float32

    def example_value(self) -> Any:
        return "" if self.value_type == "string" else np.float32(0.0)

    def make_layer(self) -> tf.keras.layers.Layer:
        return ContextColumn(name=f"{self.name}_context")

    def read(self, layer: tf.keras.layers.Layer,
             inputs: Mapping[str, tf.Tensor]) -> None:
        """No field: the history's layer reads this column."""
        return None

    def tflite_input(self) -> TFLiteInput | str:
        return HISTORY_TFLITE_REASON  # only a history reads a context column

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


def history_features(
    name: str, timestamps: str | None = None, now: str | None = None, **kwargs: Any
) -> list[HistoryFeature | ContextFeature]:
    """A :class:`HistoryFeature` plus the :class:`ContextFeature` of each extra
    column it reads, ready to list among a tower's features.

    >>> [f.name for f in history_features("h", timestamps="h_ts", now="now",
    ...                                   pooling="time_decay", vocabulary=("1",))]
    ['h', 'h_ts', 'now']
    """
    out: list[HistoryFeature | ContextFeature] = [
        HistoryFeature(name, timestamps=timestamps, now=now, **kwargs)
    ]
    if timestamps:
        out.append(ContextFeature(timestamps, "string"))
    if now:
        out.append(ContextFeature(now, "float32"))
    return out


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class ContextColumn(tf.keras.layers.Layer):
    """The layer of a :class:`ContextFeature`: contributes no field."""

    def read_columns(self, inputs: Mapping[str, tf.Tensor]) -> None:
        return None

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.zeros([tf.shape(inputs)[0], 0])


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class HistoryEmbedding(tf.keras.layers.Layer):
    """Separator-joined item ids (+ timestamps) -> one pooled embedding per row.

    Args:
        vocabulary: Known item ids (ignored with ``shared_embedding``).
        output_dim: Embedding size.
        max_length: Most recent items kept.
        separator: Token separator.
        pooling: One of :data:`POOLINGS`.
        half_life_seconds: Half-life of the time decay.
        columns: Role (``ids``, ``timestamps``, ``now``) -> column name, for
            :meth:`read_columns` inside a tower.
        shared_embedding: Feature whose :class:`CategoricalEmbedding` this layer
            reuses once :meth:`share` is called (see :func:`link_shared_embeddings`).
        attention_units: Hidden size of the attention scorer.

    Call args:
        inputs: ``{"ids": string [batch]}`` plus ``"timestamps"`` (string
            ``[batch]``) and ``"now"`` (float ``[batch]``) when configured.

    Returns:
        float32 ``[batch, output_dim]``; zeros for an empty history.
    """

    def __init__(
        self,
        vocabulary: Sequence[str] = (),
        output_dim: int = 32,
        max_length: int = DEFAULT_MAX_LENGTH,
        separator: str = "|",
        pooling: str = "mean",
        half_life_seconds: float = 7 * 86400.0,
        columns: Mapping[str, str] | None = None,
        shared_embedding: str | None = None,
        attention_units: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ConfigError(
                f"pooling must be one of {POOLINGS}, received {pooling!r}.")
        self.vocabulary = [str(v) for v in vocabulary]
        self.output_dim = int(output_dim)
        self.max_length = int(max_length)
        self.separator = separator
        self.pooling = pooling
        self.half_life_seconds = float(half_life_seconds)
        self.columns = dict(columns or {"ids": "history"})
        self.shared_embedding = shared_embedding
        self.attention_units = int(attention_units)
        needs_time = pooling in ("time_decay", "time_decay_sum")
        if needs_time and "timestamps" not in self.columns:
            raise ConfigError(f"pooling={pooling!r} needs a timestamps column.")
        if shared_embedding:
            self.items = None  # set by share()
        elif not self.vocabulary:
            raise ConfigError(
                f"history {self.columns['ids']!r} has neither a vocabulary nor a "
                "shared_embedding: pass vocabulary=<item ids> or "
                "shared_embedding=<name of the candidate id feature>."
            )
        else:
            self.items = CategoricalEmbedding(self.vocabulary, self.output_dim,
                                              name="items")
        if pooling == "attention":
            self.attention_hidden = tf.keras.layers.Dense(attention_units, "tanh")
            self.attention_score = tf.keras.layers.Dense(1, use_bias=False)

    def share(self, layer: CategoricalEmbedding) -> None:
        """Uses ``layer`` (e.g. the candidate tower's id embedding) for the items."""
        if not isinstance(layer, CategoricalEmbedding):
            raise ConfigError(
                f"history {self.columns['ids']!r} can share a CategoricalEmbedding "
                f"only, received {type(layer).__name__}."
            )
        if layer.output_dim != self.output_dim:
            raise ConfigError(
                f"history {self.columns['ids']!r} has embedding_dim "
                f"{self.output_dim} but shares {layer.name!r} of size "
                f"{layer.output_dim}; give both the same embedding_dim."
            )
        self.items = layer

    def read_columns(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """The tower hook: picks this layer's columns out of all inputs."""
        missing = [c for c in self.columns.values() if c not in inputs]
        if missing:
            raise DataError(
                f"history {self.columns['ids']!r} reads columns {missing}, which the "
                f"input lacks (it has {sorted(inputs)}). List them in the tower as "
                "ContextFeature specs (tfdssm.history_features does) and "
                "feed them."
            )
        return self({role: inputs[column] for role, column in self.columns.items()})

    def call(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        if self.items is None:
            raise ConfigError(
                f"history {self.columns['ids']!r} shares the embedding of "
                f"{self.shared_embedding!r} but is not linked to it: build the towers "
                "into tfdssm.model.DSSM (which links them) or call "
                "tfdssm.model.link_shared_embeddings(query_tower, candidate_tower)."
            )
        needed = [r for r in ("ids", *self.columns) if r not in inputs]
        if needed:
            raise DataError(f"history {self.columns['ids']!r} needs inputs "
                            f"{sorted(set(needed))}, received {sorted(inputs)}.")
        tokens = self._split(inputs["ids"])
        times = None
        if "timestamps" in self.columns:
            raw = self._split(inputs["timestamps"])
            check = tf.debugging.assert_equal(
                tokens.row_lengths(), raw.row_lengths(),
                message=(f"history {self.columns['ids']!r}: every row needs as many "
                         f"timestamps in {self.columns['timestamps']!r} as ids"),
            )
            with tf.control_dependencies([check]):
                times = tf.ragged.map_flat_values(
                    tf.strings.to_number, raw[:, -self.max_length:], tf.float64)
        tokens = tokens[:, -self.max_length:]
        vectors = tf.ragged.map_flat_values(self.items, tokens).to_tensor()
        mask = tf.sequence_mask(tokens.row_lengths(), tf.shape(vectors)[1])
        weights = self._weights(mask, vectors, times, inputs.get("now"))
        return tf.reduce_sum(vectors * weights[:, :, tf.newaxis], axis=1)

    def _split(self, column: tf.Tensor) -> tf.RaggedTensor:
        tokens = tf.strings.split(tf.reshape(column, [-1]), sep=self.separator)
        return tf.ragged.boolean_mask(
            tokens, tf.strings.length(tf.strings.strip(tokens)) > 0)

    def _weights(
        self, mask: tf.Tensor, vectors: tf.Tensor, times: tf.RaggedTensor | None,
        now: tf.Tensor | None,
    ) -> tf.Tensor:
        """Pooling weights float32 ``[batch, length]`` (0 on padding)."""
        valid = tf.cast(mask, tf.float32)
        if self.pooling == "sum":
            return valid
        if self.pooling == "mean":
            return valid / tf.maximum(tf.reduce_sum(valid, 1, keepdims=True), 1.0)
        decay = None
        if times is not None:
            decay = decay_logits(times.to_tensor(), mask, now, self.half_life_seconds)
        if self.pooling == "time_decay":
            return tf.cast(masked_softmax(decay, mask), tf.float32)
        if self.pooling == "time_decay_sum":
            return tf.cast(tf.where(mask, tf.exp(decay), 0.0), tf.float32)
        logits = self.attention_score(self.attention_hidden(vectors))[:, :, 0]
        if decay is not None:
            logits += tf.cast(decay, tf.float32)
        return masked_softmax(logits, mask)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            vocabulary=self.vocabulary, output_dim=self.output_dim,
            max_length=self.max_length, separator=self.separator,
            pooling=self.pooling, half_life_seconds=self.half_life_seconds,
            columns=dict(self.columns), shared_embedding=self.shared_embedding,
            attention_units=self.attention_units,
        )
        return config


def decay_logits(
    times: tf.Tensor, mask: tf.Tensor, now: tf.Tensor | None, half_life_seconds: float
) -> tf.Tensor:
    """``log2``-scaled decay ``-ln 2 * age / half_life`` (float64 ``[batch, length]``).

    ``age = now - time``, clipped at 0; without ``now`` the reference is each
    row's latest valid time.
    """
    if now is None:
        lowest = tf.fill(tf.shape(times), tf.constant(np.finfo(np.float64).min,
                                                      tf.float64))
        reference = tf.reduce_max(tf.where(mask, times, lowest), axis=1)
    else:
        reference = tf.cast(tf.reshape(now, [-1]), tf.float64)
    age = tf.maximum(reference[:, tf.newaxis] - times, 0.0)
    return tf.where(mask, -math.log(2.0) * age / half_life_seconds, 0.0)


def masked_softmax(logits: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Softmax over the ``True`` positions of each row; all-zero rows stay zero."""
    lowest = tf.fill(tf.shape(logits), tf.constant(logits.dtype.min, logits.dtype))
    masked = tf.where(mask, logits, lowest)
    top = tf.reduce_max(masked, axis=1, keepdims=True)
    top = tf.where(tf.reduce_any(mask, axis=1, keepdims=True), top, 0.0)
    exp = tf.where(mask, tf.exp(masked - top), 0.0)
    total = tf.reduce_sum(exp, axis=1, keepdims=True)
    return exp / tf.maximum(total, tf.constant(1e-30, logits.dtype))


def join_history(values: Sequence[Any], separator: str = "|") -> str:
    """Joins ids or timestamps the way the history inputs expect.

    >>> join_history([12, 50, 7])
    '12|50|7'
    """
    return separator.join(str(v) for v in values)


__all__ = [
    "POOLINGS",
    "ContextFeature",
    "HistoryEmbedding",
    "HistoryFeature",
    "decay_logits",
    "history_features",
    "join_history",
    "masked_softmax",
]
