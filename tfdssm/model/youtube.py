"""YoutubeDNN (Covington et al., RecSys 2016) as a tfdssm preset.

* **User tower**: the watch history (item embeddings, mean-pooled), user features
  (embedded and concatenated) and the *example age* feed a ReLU MLP whose output
  is the user vector.
* **Item tower**: the item id's embedding, nothing else
  (:class:`ItemEmbeddingTower`); the history reads the same embedding variable.
* **Training**: the usual :class:`tfdssm.model.DSSM` / ``tfrs.tasks.Retrieval``
  path: in-batch softmax with logQ correction, optionally plus sampled negatives
  from the whole catalogue (``num_sampled_negatives``: "sampled softmax" as mixed
  negative sampling); any loss of :mod:`tfdssm.model.losses`.
* **Example age**: training rows carry ``example_age = train_end_time -
  event_time`` (days, :func:`example_ages`), so the model can learn how
  popularity moves with time; at serving the age is 0 ("now"). The exported
  ``query`` signature has **no** ``example_age`` input: the tower fills in 0
  itself (:attr:`ExampleAgeFeature.serving_value`), so callers cannot get it
  wrong. Offline evaluation (``tfdssm train``) also uses 0, like serving.

The history arrives at serving as in :mod:`tfdssm.features.history`: a string
``[batch]`` of ``|``-joined item ids, most recent last.

>>> import tensorflow as tf
>>> from tfdssm.features import CategoricalFeature, ExampleAgeFeature
>>> model = youtube_dnn(CategoricalFeature("item", ("a", "b", "c"), 8),
...                     hidden=(16,), example_age=ExampleAgeFeature())
>>> model.query_tower.feature_names
['history']
>>> out = model({"history": tf.constant(["a|b", ""]), "item": tf.constant(["c", "a"])})
>>> out["query"].shape, out["candidate"].shape
(TensorShape([2, 8]), TensorShape([2, 8]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tfdssm.features import CategoricalFeature, Feature
from tfdssm.features.example_age import ExampleAgeFeature
from tfdssm.features.history import ContextFeature, HistoryFeature
from tfdssm.model.dssm import DSSM
from tfdssm.model.item_tower import ItemEmbeddingTower
from tfdssm.model.multihead import MultiHeadTower
from tfdssm.model.sampling import NegativeSampler
from tfdssm.model.towers import Tower


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
) -> DSSM:
    """Builds the YoutubeDNN candidate-generation model as a :class:`DSSM`.

    Args:
        item: The item id feature; its embedding is the item tower and the
            history's item embedding.
        history: The history column (mean-pooled, ``max_length`` most recent
            items), or a :class:`tfdssm.features.history.HistoryFeature` to choose the
            pooling (its ``shared_embedding`` should be ``item.name``).
        user_features: Other user features (categorical, numeric, ...).
        example_age: The example-age feature, or ``None`` to leave it out.
        hidden: ReLU layer sizes of the user MLP; its output size is the item
            embedding size.
        normalize: L2-normalise both towers (cosine scores; temperature 0.05).
        num_heads: Query vectors per user
            (:class:`tfdssm.model.multihead.MultiHeadTower`).
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
        for feature in tower.features:
            out.setdefault(feature.name, feature)
    return list(out.values())


__all__ = [
    "model_features",
    "youtube_dnn",
]
