"""YoutubeDNN (Covington et al., RecSys 2016) as a tfdssm preset.

* **User tower**: the watch history (item embeddings, mean-pooled), user features
  (embedded and concatenated) and the *example age* feed a ReLU MLP whose output
  is the user vector.
* **Item tower**: the item id's embedding, nothing else
  (:class:`ItemEmbeddingTower`); the history reads the same embedding variable.
* **Training**: the usual :class:`tfdssm.model.DSSM` / ``tfrs.tasks.Retrieval``
  path: in-batch softmax with logQ correction, optionally plus sampled negatives
  from the whole catalogue (``num_sampled_negatives``: "sampled softmax" as mixed
  negative sampling); any loss of :mod:`tfdssm.losses`.
* **Example age**: training rows carry ``example_age = train_end_time -
  event_time`` (days, :func:`example_ages`), so the model can learn how
  popularity moves with time; at serving the age is 0 ("now"). The exported
  ``query`` signature has **no** ``example_age`` input: the tower fills in 0
  itself (:attr:`ExampleAgeFeature.serving_value`), so callers cannot get it
  wrong. Offline evaluation (``tfdssm train``) also uses 0, like serving.

The history arrives at serving as in :mod:`tfdssm.history`: a string ``[batch]``
of ``|``-joined item ids, most recent last.

>>> from tfdssm.features import CategoricalFeature
>>> model = youtube_dnn(CategoricalFeature("item", ("a", "b", "c"), 8),
...                     hidden=(16,), example_age=ExampleAgeFeature())
>>> model.query_tower.feature_names
['history']
>>> out = model({"history": tf.constant(["a|b", ""]), "item": tf.constant(["c", "a"])})
>>> out["query"].shape, out["candidate"].shape
(TensorShape([2, 8]), TensorShape([2, 8]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError, DataError
from tfdssm.features import (
    CategoricalFeature,
    Feature,
    feature_from_config,
    register_feature_kind,
)
from tfdssm.history import ContextFeature, HistoryFeature
from tfdssm.layers import NumericInput
from tfdssm.towers import Tower

SECONDS_PER_DAY = 86400.0


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class ExampleAgeFeature:
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
    embedding_dim: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ConfigError(f"example age {self.name!r}: std must be positive, "
                              f"received {self.std}.")

    def make_layer(self) -> tf.keras.layers.Layer:
        return ExampleAgeInput(self.mean, self.std, self.serving_value, self.name,
                               name=f"{self.name}_example_age")

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class ExampleAgeInput(NumericInput):
    """:class:`tfdssm.layers.NumericInput` that uses ``serving_value`` when its
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


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class ItemEmbeddingTower(Tower):
    """A candidate tower that is just one id's embedding (optionally normalised).

    Args:
        features: Exactly one :class:`tfdssm.features.CategoricalFeature`.
        normalize: L2-normalise the embedding (cosine scores).
        **kwargs: :class:`tfdssm.towers.Tower` arguments; ``output_dim``
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


def youtube_dnn(
    item: CategoricalFeature,
    history: str | HistoryFeature = "history",
    user_features: Sequence[Feature] = (),
    example_age: ExampleAgeFeature | None = None,
    hidden: Sequence[int] = (256, 128),
    normalize: bool = True,
    num_heads: int = 1,
    max_length: int = 50,
    num_sampled_negatives: int = 0,
    item_counts: Mapping[str, float] | None = None,
    **dssm_kwargs: Any,
) -> Any:
    """Builds the YoutubeDNN candidate-generation model as a :class:`DSSM`.

    Args:
        item: The item id feature; its embedding is the item tower and the
            history's item embedding.
        history: The history column (mean-pooled, ``max_length`` most recent
            items), or a :class:`tfdssm.history.HistoryFeature` to choose the
            pooling (its ``shared_embedding`` should be ``item.name``).
        user_features: Other user features (categorical, numeric, ...).
        example_age: The example-age feature, or ``None`` to leave it out.
        hidden: ReLU layer sizes of the user MLP; its output size is the item
            embedding size.
        normalize: L2-normalise both towers (cosine scores; temperature 0.05).
        num_heads: Query vectors per user (:class:`tfdssm.multihead.MultiHeadTower`).
        max_length: Items kept per history when ``history`` is a column name.
        num_sampled_negatives: Extra negatives drawn from ``item.vocabulary``
            each step (popularity-sampled with ``item_counts``, else uniform).
        item_counts: Item id -> training count, for the sampler.
        **dssm_kwargs: More :class:`tfdssm.model.DSSM` arguments (``loss``,
            ``temperature``, ``candidate_probabilities``, ...).

    Returns:
        The untrained :class:`tfdssm.model.DSSM`; :func:`model_features` lists
        the columns it trains on.
    """
    from tfdssm.model import DSSM  # noqa: PLC0415 - model imports towers
    from tfdssm.multihead import MultiHeadTower  # noqa: PLC0415
    from tfdssm.sampling import NegativeSampler  # noqa: PLC0415

    if isinstance(history, str):
        history = HistoryFeature(history, embedding_dim=item.embedding_dim,
                                 max_length=max_length, pooling="mean",
                                 shared_embedding=item.name)
    features: list[Any] = [history]
    for role in ("timestamps", "now"):
        column = history.columns.get(role)
        if column:
            features.append(ContextFeature(column, "string" if role == "timestamps"
                                           else "float32"))
    features += list(user_features)
    if example_age is not None:
        features.append(example_age)
    common = dict(hidden=hidden, output_dim=item.embedding_dim, activation="relu",
                  normalize=normalize, name="user_tower")
    query = (MultiHeadTower(features, num_heads=num_heads, **common) if num_heads > 1
             else Tower(features, **common))
    candidate = ItemEmbeddingTower([item], normalize=normalize, name="item_tower")
    if num_sampled_negatives:
        ids = np.asarray(item.vocabulary, dtype=object)
        counts = None
        if item_counts is not None:
            counts = np.asarray([float(item_counts.get(i, 0.0)) for i in ids])
        dssm_kwargs["negative_sampler"] = NegativeSampler(
            {item.name: ids}, num_sampled_negatives,
            "popularity" if counts is not None else "uniform", counts,
        )
    dssm_kwargs.setdefault("remove_accidental_hits", True)
    return DSSM(query, candidate, candidate_id=item.name, **dssm_kwargs)


def model_features(model: Any) -> list[Any]:
    """Every feature spec of a model's two towers, once each (query first)."""
    out: dict[str, Any] = {}
    for tower in (model.query_tower, model.candidate_tower):
        inner = tower
        while not hasattr(inner, "features") and hasattr(inner, "tower"):
            inner = inner.tower
        for feature in inner.features:
            out.setdefault(feature.name, feature)
    return list(out.values())


__all__ = [
    "ExampleAgeFeature",
    "ExampleAgeInput",
    "ItemEmbeddingTower",
    "example_ages",
    "model_features",
    "youtube_dnn",
]
