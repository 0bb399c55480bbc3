"""A tower: feature layers -> (SENet) -> MLP -> embedding.

The DSSM paper's tower (30k -> 300 -> 300 -> 128, tanh) is :func:`paper_tower`:
the trigram bag is the first 30k -> 300 layer, then two tanh dense layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfdssm.errors import ConfigError, DataError
from tfdssm.features import Feature, TextFeature, feature_from_config


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class SENet(tf.keras.layers.Layer):
    """Squeeze-and-excitation over feature fields (FiBiNET-style reweighting).

    Each field vector is squeezed to its mean, a two-layer bottleneck produces one
    sigmoid weight per field, and every field is scaled by its weight (times 2, so
    the block starts near identity).

    Call args:
        inputs: list of F float32 ``[batch, dim_f]`` tensors.

    Returns:
        list of F float32 ``[batch, dim_f]`` tensors.
    """

    def __init__(self, reduction: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reduction = int(reduction)

    def build(self, input_shape: Sequence[tf.TensorShape]) -> None:
        fields = len(input_shape)
        self.squeeze = tf.keras.layers.Dense(
            max(1, fields // self.reduction), activation="relu"
        )
        self.excite = tf.keras.layers.Dense(fields, activation="sigmoid")
        super().build(input_shape)

    def call(self, inputs: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        summary = tf.stack([tf.reduce_mean(x, axis=1) for x in inputs], axis=1)
        weights = 2.0 * self.excite(self.squeeze(summary))
        return [x * weights[:, i : i + 1] for i, x in enumerate(inputs)]

    def get_config(self) -> dict:
        return {**super().get_config(), "reduction": self.reduction}


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class Tower(tf.keras.layers.Layer):
    """Maps a dict of raw feature tensors to one embedding per row.

    Args:
        features: Feature specs (or their configs) this tower reads.
        hidden: Sizes of the hidden dense layers.
        output_dim: Embedding size.
        activation: Activation of the hidden layers.
        output_activation: Activation of the output layer (paper: tanh).
        input_activation: Add a bias and apply ``activation`` to the concatenated
            feature vectors first (the paper's first layer is the trigram bag).
        normalize: L2-normalise the output (cosine similarity).
        senet: Reweight the feature fields with :class:`SENet` (needs >= 2).

    Call args:
        inputs: mapping from feature name to a ``[batch]`` tensor; extra keys
            are ignored.

    Returns:
        float32 ``[batch, output_dim]``.
    """

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]],
        hidden: Sequence[int] = (256,),
        output_dim: int = 64,
        activation: str = "relu",
        output_activation: str | None = None,
        input_activation: bool = False,
        normalize: bool = True,
        senet: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.features = [
            f if not isinstance(f, Mapping) else feature_from_config(f)
            for f in features
        ]
        if not self.features:
            raise ConfigError("a tower needs at least one feature.")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ConfigError(f"feature names must be unique, received {names}.")
        if senet and len(self.features) < 2:
            raise ConfigError("senet=True needs at least two features to reweight.")
        self.hidden = [int(h) for h in hidden]
        self.output_dim = int(output_dim)
        self.activation = activation
        self.output_activation = output_activation
        self.input_activation = bool(input_activation)
        self.normalize = bool(normalize)
        self.use_senet = bool(senet)
        self.feature_layers = [f.make_layer() for f in self.features]
        self.senet = SENet() if senet else None
        self.dense_layers = [
            tf.keras.layers.Dense(h, activation=activation) for h in self.hidden
        ]
        self.output_layer = tf.keras.layers.Dense(
            self.output_dim, activation=output_activation
        )
        self.input_bias: tf.Variable | None = None

    @property
    def feature_names(self) -> list[str]:
        """The input columns (features served as a constant, e.g. the example
        age of :mod:`tfdssm.model.youtube`, are training-only and not listed)."""
        return [c for f in self.features for c in f.served_columns]

    def build(self, input_shape: Any) -> None:
        if self.input_activation:
            width = sum(f.width for f in self.features)
            self.input_bias = self.add_weight(
                name="input_bias", shape=[width], initializer="zeros"
            )
        super().build(input_shape)

    def call(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        missing = [n for n in self.feature_names if n not in inputs]
        if missing:
            raise DataError(
                f"tower {self.name!r} needs features {missing}, but the input has "
                f"only {sorted(inputs)}. Add these columns to the data."
            )
        # Each feature feeds its layer: one column, several (a history and its
        # timestamps), none (a context column: no field) or an optional one
        # (example age).
        fields = [
            f.read(layer, inputs)
            for f, layer in zip(self.features, self.feature_layers, strict=True)
        ]
        return self.combine([x for x in fields if x is not None])

    def combine(self, fields: Sequence[tf.Tensor]) -> tf.Tensor:
        """Runs the part after the feature layers (shared with the TFLite path).

        Args:
            fields: One float32 ``[batch, dim_f]`` per feature, in order.

        Returns:
            float32 ``[batch, output_dim]``.
        """
        if self.senet is not None:
            fields = self.senet(fields)
        x = tf.concat(list(fields), axis=1) if len(fields) > 1 else fields[0]
        if self.input_bias is not None:
            x = tf.keras.activations.get(self.activation)(x + self.input_bias)
        for layer in self.dense_layers:
            x = layer(x)
        x = self.output_layer(x)
        if self.normalize:  # the last axis: also per head for multi-head towers
            x = tf.math.l2_normalize(x, axis=-1)
        return x

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            features=[f.to_config() for f in self.features],
            hidden=self.hidden,
            output_dim=self.output_dim,
            activation=self.activation,
            output_activation=self.output_activation,
            input_activation=self.input_activation,
            normalize=self.normalize,
            senet=self.use_senet,
        )
        return config


def paper_tower(
    column: str,
    num_buckets: int = 30000,
    hidden: Sequence[int] = (300, 300),
    output_dim: int = 128,
    activation: str = "tanh",
    max_length: int = 256,
    word_ngrams: Sequence[int] = (),
    **kwargs,
) -> Tower:
    """The DSSM paper's text tower: buckets -> hidden[0] -> ... -> output_dim.

    The first size is the trigram bag (a sum of embedding rows, i.e. a dense layer
    over the 30k count vector), then a bias and ``activation``; the rest are dense
    layers; the output also uses ``activation`` and is L2-normalised (cosine).

    Args:
        column: The text column.
        num_buckets: Trigram hash buckets.
        hidden: Hidden sizes; ``hidden[0]`` is the bag embedding size.
        output_dim: Semantic vector size.
        activation: Activation everywhere (paper: tanh).
        max_length: Code points kept per text.
        word_ngrams: Also hash word unigrams/bigrams, e.g. ``(1, 2)``.

    Returns:
        A :class:`Tower`.

    >>> tower = paper_tower("query")
    >>> list(tower.hidden), tower.output_dim
    ([300], 128)
    """
    if not hidden:
        raise ConfigError("hidden needs at least one size (the bag embedding).")
    feature = TextFeature(
        column, num_buckets=num_buckets, embedding_dim=int(hidden[0]),
        max_length=max_length, combiner="sum", word_ngrams=tuple(word_ngrams),
    )
    return Tower(
        [feature], hidden=hidden[1:], output_dim=output_dim, activation=activation,
        output_activation=activation, input_activation=True, normalize=True, **kwargs,
    )


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class SharedTower(tf.keras.layers.Layer):
    """The same tower (same weights) reading differently named columns.

    For text-to-text retrieval where queries and documents share one encoder:
    ``SharedTower(query_tower, {"query": "doc"})`` reads column ``doc`` wherever
    the query tower reads ``query``.

    It is a tower like the one it wraps: ``features`` (renamed),
    ``feature_names``, ``feature_layers``, ``combine``, ``output_dim`` and
    ``normalize`` answer for it, so code that takes a tower never unwraps it.
    Its config holds the wrapped tower's; :meth:`sharing` points a rebuilt
    copy back at the tower it shares (as :class:`tfdssm.model.dssm.DSSM` does).

    Args:
        tower: The tower whose weights are shared (or its serialised config).
        rename: Tower feature name -> column this tower reads instead.

    Call args:
        inputs: mapping from column name to a ``[batch]`` tensor.

    Returns:
        float32 ``[batch, output_dim]`` (``[batch, heads, output_dim]`` for a
        multi-head tower).
    """

    def __init__(self, tower: Tower | Mapping[str, Any], rename: Mapping[str, str],
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(tower, Mapping):
            tower = tf.keras.layers.deserialize(dict(tower))
        unknown = set(rename) - set(tower.feature_names)
        if unknown:
            raise ConfigError(
                f"rename names {sorted(unknown)}, which tower {tower.name!r} does "
                f"not read; it reads {tower.feature_names}."
            )
        self.tower = tower
        self.rename = dict(rename)

    @property
    def features(self) -> list[Feature]:
        """The wrapped tower's specs, named after the columns read here."""
        return [dataclasses.replace(f, name=self.rename[f.name])
                if f.name in self.rename else f for f in self.tower.features]

    @property
    def feature_names(self) -> list[str]:
        return [self.rename.get(n, n) for n in self.tower.feature_names]

    @property
    def feature_layers(self) -> list[tf.keras.layers.Layer]:
        return self.tower.feature_layers

    @property
    def output_dim(self) -> int:
        return self.tower.output_dim

    @property
    def normalize(self) -> bool:
        return self.tower.normalize

    @property
    def num_heads(self) -> int:
        return int(getattr(self.tower, "num_heads", 1))

    def combine(self, fields: Sequence[tf.Tensor]) -> tf.Tensor:
        """The wrapped tower's :meth:`Tower.combine`."""
        return self.tower.combine(fields)

    def sharing(self, tower: Tower) -> SharedTower:
        """This shared tower reading through ``tower`` (same name and rename)."""
        return SharedTower(tower, self.rename, name=self.name)

    def call(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        return self.tower({n: inputs[self.rename.get(n, n)]
                           for n in self.tower.feature_names})

    def get_config(self) -> dict:
        return {**super().get_config(),
                "tower": tf.keras.layers.serialize(self.tower),
                "rename": dict(self.rename)}
