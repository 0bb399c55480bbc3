"""The basic feature kinds: text, categorical, multi-valued and numeric columns.

A spec is a small dataclass that round-trips through JSON (``to_config`` /
:func:`tfdssm.features.registry.feature_from_config`); it is what
``export.json`` records and what the serving signatures are named after.

>>> from tfdssm.features.registry import feature_from_config
>>> spec = TextFeature("query", num_buckets=30000, embedding_dim=300)
>>> feature_from_config(spec.to_config()) == spec
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.features import layers
from tfdssm.features.protocol import ColumnFeature, TFLiteInput
from tfdssm.features.registry import register_feature_kind
from tfdssm.text import normalize as text

# A documented hard cap on code points per text (also checked against memory by
# tfdssm.training.run): 1,000,000 is ~4 MB per text before hashing.
MAX_LENGTH_LIMIT = 1_000_000
# Tokens per multi-valued TFLite input (``[1, MAX_TOKENS]``).
MAX_TOKENS = 16
# Parity queries for text features (TFLite vs the served signature).
MULTILINGUAL = (
    "лучшие рестораны в Москве", "北京烤鸭", "Crème Brûlée", "ΣΟΦΊΑ και Φως",
    "Straße ﬁne Ｔｏｋｙｏ", "🙂 emoji 👨\u200d👩\u200d👧", "Việt Nam naïve café",
    "mixed Ελληνικά и русский 東京", "", "   ", "good", "x" * 1000,
)
WARMUP_TEXT = "warm up request"


def _token_index(vocabulary: Sequence[str]) -> dict[str, int]:
    """Value -> its vocabulary line number plus 1 (0 is unknown)."""
    return {v: i + 1 for i, v in enumerate(vocabulary)}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class TextFeature(ColumnFeature):
    """Free text, hashed in-graph into letter trigrams.

    Attributes:
        name: Column name, also the serving input name.
        num_buckets: Trigram hash buckets (paper: 30,000).
        embedding_dim: Size of the trigram bag embedding.
        max_length: Code points kept per text.
        combiner: ``sum`` (paper), ``mean`` or ``sqrtn``.
        word_ngrams: Word unigrams/bigrams to hash as well, e.g. ``(1, 2)``.
    """

    name: str
    num_buckets: int = 30000
    embedding_dim: int = 64
    max_length: int = 256
    combiner: str = "sqrtn"
    word_ngrams: tuple[int, ...] = ()
    kind: ClassVar[str] = "text"
    dtype: ClassVar[tf.DType] = tf.string

    def __post_init__(self) -> None:
        if (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                or not 1 <= self.max_length <= MAX_LENGTH_LIMIT):
            raise ConfigError(
                f"max_length of text feature {self.name!r} must be an integer between "
                f"1 and {MAX_LENGTH_LIMIT:,} code points, "
                f"received {self.max_length!r}; "
                "texts are cut to it and padded to it, so every batch holds "
                "batch size x max_length code points. Use e.g. 1024.")

    def make_layer(self) -> tf.keras.layers.Layer:
        return layers.TextEmbedding(
            self.num_buckets, self.embedding_dim, self.max_length, self.combiner,
            self.word_ngrams, name=f"{self.name}_text",
        )

    @property
    def width(self) -> int:
        return int(self.embedding_dim)

    def example_value(self) -> str:
        return WARMUP_TEXT

    def tflite_input(self) -> TFLiteInput:
        """int32 ``[1, max_length]``: code points of ``NFKC(text).casefold()``,
        truncated, padded with 0."""
        return TFLiteInput(
            spec={"shape": [1, self.max_length], "dtype": "int32", "pad": text.PAD,
                  "encoding": "code points of NFKC(text).casefold()"},
            field=lambda layer, x: layer.embed_code_points(x, dense=True),
            sample=lambda i, count: MULTILINGUAL[i % len(MULTILINGUAL)],
        )

    @staticmethod
    def encode_tflite(value: Any, item: Mapping[str, Any],
                      vocabulary: Sequence[str]) -> np.ndarray:
        return text.encode_text(str(value), item["shape"][1])[None, :]

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self),
                "word_ngrams": list(self.word_ngrams)}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class CategoricalFeature(ColumnFeature):
    """One id per row (user id, occupation, year) from a fixed vocabulary."""

    name: str
    vocabulary: tuple[str, ...]
    embedding_dim: int = 32
    kind: ClassVar[str] = "categorical"
    dtype: ClassVar[tf.DType] = tf.string

    def make_layer(self) -> tf.keras.layers.Layer:
        return layers.CategoricalEmbedding(
            list(self.vocabulary), self.embedding_dim, name=f"{self.name}_categorical"
        )

    @property
    def width(self) -> int:
        return int(self.embedding_dim)

    def example_value(self) -> str:
        return self.vocabulary[0] if self.vocabulary else WARMUP_TEXT

    def tflite_input(self) -> TFLiteInput:
        """int32 ``[1]``: the value's vocabulary line number plus 1, 0 if unknown."""
        vocab = list(self.vocabulary) or [""]

        def sample(i: int, count: int) -> str:
            return "\u2400unknown" if i == count - 1 else vocab[i % len(vocab)]

        return TFLiteInput(
            spec={"shape": [1], "dtype": "int32", "unknown": 0},
            field=lambda layer, x: layer.embedding(x),
            sample=sample, vocabulary=tuple(self.vocabulary),
        )

    @staticmethod
    def encode_tflite(value: Any, item: Mapping[str, Any],
                      vocabulary: Sequence[str]) -> np.ndarray:
        return np.asarray([_token_index(vocabulary).get(str(value), 0)], np.int32)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self),
                "vocabulary": list(self.vocabulary)}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class MultiValuedFeature(ColumnFeature):
    """Several tokens in one string, joined by ``separator`` (genres, tags)."""

    name: str
    vocabulary: tuple[str, ...]
    embedding_dim: int = 16
    separator: str = "|"
    combiner: str = "mean"
    kind: ClassVar[str] = "multi_valued"
    dtype: ClassVar[tf.DType] = tf.string

    def make_layer(self) -> tf.keras.layers.Layer:
        return layers.MultiValuedEmbedding(
            list(self.vocabulary), self.embedding_dim, self.separator, self.combiner,
            name=f"{self.name}_multi",
        )

    @property
    def width(self) -> int:
        return int(self.embedding_dim)

    def example_value(self) -> str:
        return self.vocabulary[0] if self.vocabulary else WARMUP_TEXT

    def tflite_input(self) -> TFLiteInput:
        """int32 ``[1, MAX_TOKENS]``: token indices as categorical, padded with -1."""
        vocab = list(self.vocabulary) or [""]

        def field(layer: tf.keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
            valid = x >= 0
            vectors = (layer.embedding(tf.maximum(x, 0))
                       * tf.cast(valid, tf.float32)[..., None])
            count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1, keepdims=True)
            return layers.combine(tf.reduce_sum(vectors, axis=1), count, layer.combiner)

        return TFLiteInput(
            spec={"shape": [1, MAX_TOKENS], "dtype": "int32", "pad": -1,
                  "unknown": 0, "separator": self.separator},
            field=field,
            sample=lambda i, count: self.separator.join(vocab[: 1 + i % 3]),
            vocabulary=tuple(self.vocabulary),
        )

    @staticmethod
    def encode_tflite(value: Any, item: Mapping[str, Any],
                      vocabulary: Sequence[str]) -> np.ndarray:
        index = _token_index(vocabulary)
        tokens = [t for t in str(value).split(item["separator"]) if t]
        ids = [index.get(t, 0) for t in tokens][: item["shape"][1]]
        row = np.full([1, item["shape"][1]], -1, np.int32)
        row[0, : len(ids)] = ids
        return row

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self),
                "vocabulary": list(self.vocabulary)}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class NumericFeature(ColumnFeature):
    """A float column, standardised by ``mean`` and ``std`` from training data."""

    name: str
    mean: float = 0.0
    std: float = 1.0
    kind: ClassVar[str] = "numeric"
    dtype: ClassVar[tf.DType] = tf.float32

    def make_layer(self) -> tf.keras.layers.Layer:
        return layers.NumericInput(self.mean, self.std, name=f"{self.name}_numeric")

    @property
    def width(self) -> int:
        return 1

    def example_value(self) -> np.float32:
        return np.float32(self.mean)

    def tflite_input(self) -> TFLiteInput:
        """float32 ``[1]``: the raw value."""
        return TFLiteInput(
            spec={"shape": [1], "dtype": "float32"},
            field=lambda layer, x: layer(x),
            sample=lambda i, count: self.mean + (i - count / 2) * self.std / 2,
        )

    @staticmethod
    def encode_tflite(value: Any, item: Mapping[str, Any],
                      vocabulary: Sequence[str]) -> np.ndarray:
        return np.asarray([float(value)], np.float32)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


