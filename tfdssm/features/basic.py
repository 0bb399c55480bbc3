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
from typing import Any, ClassVar

import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.features import layers
from tfdssm.features.registry import register_feature_kind


# A documented hard cap on code points per text (also checked against memory by
# tfdssm.training.run): 1,000,000 is ~4 MB per text before hashing.
MAX_LENGTH_LIMIT = 1_000_000


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class TextFeature:
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
                f"1 and {MAX_LENGTH_LIMIT:,} code points, received {self.max_length!r}; "
                "texts are cut to it and padded to it, so every batch holds "
                "batch size x max_length code points. Use e.g. 1024.")

    def make_layer(self) -> tf.keras.layers.Layer:
        return layers.TextEmbedding(
            self.num_buckets, self.embedding_dim, self.max_length, self.combiner,
            self.word_ngrams, name=f"{self.name}_text",
        )

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self),
                "word_ngrams": list(self.word_ngrams)}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class CategoricalFeature:
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

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self),
                "vocabulary": list(self.vocabulary)}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class MultiValuedFeature:
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

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self),
                "vocabulary": list(self.vocabulary)}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class NumericFeature:
    """A float column, standardised by ``mean`` and ``std`` from training data."""

    name: str
    mean: float = 0.0
    std: float = 1.0
    kind: ClassVar[str] = "numeric"
    dtype: ClassVar[tf.DType] = tf.float32

    def make_layer(self) -> tf.keras.layers.Layer:
        return layers.NumericInput(self.mean, self.std, name=f"{self.name}_numeric")

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


