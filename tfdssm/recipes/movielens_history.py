"""The history-aware MovieLens towers (``--user-tower history|youtube``).

:func:`prepare_movielens` builds the two history-aware user towers of
``tfdssm train --pipeline movielens --user-tower history|youtube``:

* ``history``: the feature tower's user features plus the rating history,
  time-decay pooled (half-life ``half_life_days``) over the movie-id embedding
  shared with the movie tower;
* ``youtube``: :func:`tfdssm.model.youtube.youtube_dnn`: mean-pooled history,
  age, gender, occupation, zip prefix and the example age (days before the end
  of the training window; 0 at serving) -> ReLU MLP; the movie tower is the
  movie-id embedding.

History columns come from :mod:`tfdssm.data.history` (no leakage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tfdssm.data.history import (
    EXAMPLE_AGE,
    HISTORY,
    HISTORY_TIMESTAMPS,
    QUERY_TIME,
    add_history_columns,
)
from tfdssm.errors import ConfigError, DataError
from tfdssm.features import (
    CategoricalFeature,
    ExampleAgeFeature,
    Feature,
    HistoryFeature,
    example_ages,
    history_features,
)
from tfdssm.model.dssm import DSSM
from tfdssm.model.multihead import MultiHeadTower
from tfdssm.model.towers import Tower
from tfdssm.model.youtube import youtube_dnn

USER_TOWERS = ("features", "history", "youtube")


def prepare_movielens(
    train: pd.DataFrame,
    test: pd.DataFrame,
    user_features: Sequence[Feature],
    movie_features: Sequence[Feature],
    user_tower: str = "history",
    hidden: Sequence[int] = (128,),
    dim: int = 64,
    temperature: float | None = 0.05,
    probabilities: dict[str, float] | None = None,
    senet: bool = False,
    num_heads: int = 1,
    loss: str = "in_batch",
    max_length: int = 50,
    pooling: str = "time_decay",
    half_life_days: float = 7.0,
) -> tuple[pd.DataFrame, pd.DataFrame, list[Feature], DSSM, dict[str, Any]]:
    """The history-aware MovieLens model (see the module docstring).

    Args:
        train, test: The split, with a ``timestamp`` column.
        user_features, movie_features: The feature tower's specs.
        user_tower: ``history`` or ``youtube``.
        hidden, dim, temperature, senet, num_heads, loss: As
            :func:`tfdssm.recipes.movielens.prepare`.
        probabilities: Movie id -> training frequency (logQ), or ``None``.
        max_length: Ratings kept per history.
        pooling: History pooling of the ``history`` tower
            (:data:`tfdssm.features.history.POOLINGS`).
        half_life_days: Half-life of the time decay.

    Returns:
        ``(train, test, features, model, info)``: the splits with the history
        columns (and ``example_age``), every column's spec, the model and the
        parameters for ``export.json``.
    """
    if user_tower not in USER_TOWERS[1:]:
        raise ConfigError(f"user_tower must be one of {USER_TOWERS[1:]} here, "
                          f"received {user_tower!r}.")
    if "timestamp" not in train.columns:
        raise DataError("history towers need the ratings' timestamp column.")
    train, test = add_history_columns(train, test, max_length=max_length)
    by_name = {f.name: f for f in movie_features}
    movie_id = by_name["movie_id"]
    info: dict[str, Any] = {"user_tower": user_tower, "max_history": max_length}
    if user_tower == "youtube":
        ages = example_ages(train["timestamp"])
        train = train.assign(**{EXAMPLE_AGE: ages})
        test = test.assign(**{EXAMPLE_AGE: np.zeros(len(test), np.float32)})
        item = CategoricalFeature("movie_id", movie_id.vocabulary, dim)
        age = ExampleAgeFeature(EXAMPLE_AGE, float(ages.mean()),
                                float(ages.std()) or 1.0)
        history = HistoryFeature(HISTORY, embedding_dim=dim, max_length=max_length,
                                 pooling="mean", shared_embedding="movie_id")
        user = [f for f in user_features if f.name != "user_id"]
        model = youtube_dnn(item, history, user, example_age=age, hidden=hidden,
                            num_heads=num_heads, temperature=temperature,
                            candidate_probabilities=probabilities, loss=loss)
        features = [history, *user, age, item]
        info.update(history_pooling="mean", example_age="days before the last "
                    "training rating; 0 at serving")
        return train, test, features, model, info
    timed = pooling in ("time_decay", "time_decay_sum", "attention")
    now = QUERY_TIME if pooling == "time_decay_sum" else None
    if now:  # the query time: the rating's own time (at serving: request time)
        train = train.assign(**{now: train["timestamp"].astype(np.float32)})
        test = test.assign(**{now: test["timestamp"].astype(np.float32)})
    history = history_features(
        HISTORY, timestamps=HISTORY_TIMESTAMPS if timed else None, now=now,
        pooling=pooling, embedding_dim=movie_id.embedding_dim, max_length=max_length,
        half_life=half_life_days, half_life_unit="days", shared_embedding="movie_id",
    )
    query_features = [*user_features, *history]
    common = dict(hidden=hidden, output_dim=dim, activation="relu", normalize=True,
                  senet=senet)
    query = (MultiHeadTower(query_features, num_heads=num_heads, name="user_tower",
                            **common) if num_heads > 1
             else Tower(query_features, name="user_tower", **common))
    movie = Tower(list(movie_features), name="movie_tower", **common)
    model = DSSM(query, movie, candidate_id="movie_id", temperature=temperature,
                 remove_accidental_hits=True, candidate_probabilities=probabilities,
                 loss=loss)
    info.update(history_pooling=pooling, half_life_days=half_life_days)
    return train, test, [*query_features, *movie_features], model, info

