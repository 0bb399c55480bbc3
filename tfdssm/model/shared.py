"""Embeddings shared across towers: a history reading the candidate tower's
item-id embedding (``HistoryFeature(shared_embedding=...)``)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdssm.errors import ConfigError


def _feature_layers(tower: Any) -> list[tuple[Any, tf.keras.layers.Layer]]:
    # Any layer with `feature_names` can be a tower; one without feature specs
    # (a hand-written tower) has no history to link.
    features = getattr(tower, "features", ())
    return list(zip(features, getattr(tower, "feature_layers", ()), strict=True))


def link_shared_embeddings(*towers: Any) -> int:
    """Points every history with ``shared_embedding`` at that feature's layer.

    The feature is looked up among the categorical features of all ``towers``
    (typically the query and the candidate tower), candidate first.

    Returns:
        The number of histories linked.

    Raises:
        ConfigError: the shared feature is not a categorical feature of a tower.
    """
    pairs = [pair for tower in towers for pair in _feature_layers(tower)]
    sources = {}
    for spec, layer in reversed(pairs):  # later towers (the candidate) win
        if spec.kind == "categorical":
            sources.setdefault(spec.name, layer)
    linked = 0
    for spec, layer in pairs:
        if spec.kind == "history" and spec.shared_embedding:
            if spec.shared_embedding not in sources:
                raise ConfigError(
                    f"history {spec.name!r} shares the embedding of "
                    f"{spec.shared_embedding!r}, which is not a categorical feature "
                    f"of these towers (they have {sorted(sources)})."
                )
            layer.share(sources[spec.shared_embedding])
            linked += 1
    return linked

