"""A candidate tower that is one id's embedding (YoutubeDNN's item tower)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.features import Feature, feature_from_config
from tfdssm.model.towers import Tower


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class ItemEmbeddingTower(Tower):
    """A candidate tower that is just one id's embedding (optionally normalised).

    Args:
        features: Exactly one :class:`tfdssm.features.CategoricalFeature`.
        normalize: L2-normalise the embedding (cosine scores).
        **kwargs: :class:`tfdssm.model.towers.Tower` arguments; ``output_dim``
            defaults to the feature's ``embedding_dim`` and must equal it,
            ``hidden`` must be empty.

    Returns (call):
        float32 ``[batch, embedding_dim]``.
    """

    def __init__(self, features: Sequence[Feature | Mapping[str, Any]],
                 normalize: bool = True, **kwargs: Any) -> None:
        specs = [feature_from_config(f) if isinstance(f, Mapping) else f
                 for f in features]
        if len(specs) != 1 or specs[0].kind != "categorical":
            raise ConfigError(
                "ItemEmbeddingTower takes exactly one CategoricalFeature (the item "
                f"id), received {[getattr(f, 'kind', f) for f in specs]}."
            )
        kwargs.setdefault("output_dim", specs[0].embedding_dim)
        kwargs.setdefault("hidden", ())
        super().__init__(specs, normalize=normalize, **kwargs)
        if self.hidden or self.output_dim != specs[0].embedding_dim:
            raise ConfigError(
                "ItemEmbeddingTower has no MLP: hidden must be empty and output_dim "
                f"equal to the embedding_dim {specs[0].embedding_dim}; received "
                f"hidden={self.hidden}, output_dim={self.output_dim}."
            )

    def combine(self, fields: Sequence[tf.Tensor]) -> tf.Tensor:
        x = fields[0]
        return tf.math.l2_normalize(x, axis=-1) if self.normalize else x

