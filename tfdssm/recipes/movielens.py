"""The ``movielens`` pipeline: a user/movie two-tower model on MovieLens-100k.

User tower: user id, age, gender, occupation, zip prefix. Movie tower: movie id,
title (letter-trigram hashed), genres, year. Every rating is a positive
interaction; rows are split 80/20 at random with seed 42 (the TFRS retrieval
tutorial's protocol), and the candidate corpus is all 1,682 movies.

``user_tower="history"`` adds the user's earlier ratings (time-decay pooled over
the movie-id embedding the movie tower uses), ``"youtube"`` is the YoutubeDNN
preset; both in :mod:`tfdssm.data.history` (histories come strictly from
earlier training ratings). ``num_heads`` > 1 makes the user tower multi-head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from tfdssm.data.movielens import load_movielens_100k
from tfdssm.errors import ConfigError, DataError
from tfdssm.features import (
    CategoricalFeature,
    MultiValuedFeature,
    NumericFeature,
    TextFeature,
    vocabulary_of,
)
from tfdssm.model.dssm import DSSM
from tfdssm.model.multihead import MultiHeadTower
from tfdssm.model.towers import Tower
from tfdssm.recipes import movielens_history as history
from tfdssm.training.run import Prepared, split_frame

USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_prefix")
MOVIE_COLUMNS = ("movie_id", "title", "genres", "year")


def prepare(
    data_dir: str | os.PathLike | None = None,
    hidden: Sequence[int] = (128,),
    dim: int = 64,
    num_buckets: int = 10000,
    temperature: float | None = 0.05,
    logq: bool = True,
    senet: bool = False,
    test_fraction: float = 0.2,
    seed: int = 42,
    split: str = "random",
    interactions: pd.DataFrame | None = None,
    verbose: bool = True,
    user_tower: str = "features",
    num_heads: int = 1,
    loss: str = "in_batch",
    history_pooling: str = "time_decay",
    half_life_days: float = 7.0,
    max_history: int = 50,
) -> Prepared:
    """Loads MovieLens-100k and builds the recommender towers.

    Args:
        data_dir: An extracted ml-100k directory (GroupLens or RecBole files);
            default: the cache, else the recbole wheel from PyPI, else GroupLens.
        hidden: Hidden layer sizes of both towers.
        dim: Embedding size.
        num_buckets: Trigram buckets for titles.
        temperature: Softmax temperature.
        logq: Correct in-batch negatives for movie popularity (logQ).
        senet: SENet feature reweighting in both towers.
        test_fraction: Share of ratings held out.
        seed: Split seed (42 as in TFRS).
        split: ``random`` (``test_fraction`` of all ratings, TFRS protocol) or
            ``leave_last_out`` (each user's latest rating is the test row).
        interactions: Use this table instead of loading (tests; same columns as
            :meth:`tfdssm.data.movielens.MovieLens.interactions`).
        verbose: Print progress while fetching the data.
        user_tower: ``features`` (user id and demographics), ``history`` (plus
            the rating history) or ``youtube`` (YoutubeDNN).
        num_heads: Query vectors per user (multi-interest, max over heads).
        loss: A :data:`tfdssm.model.losses.LOSSES` name (logQ applies to in_batch).
        history_pooling: Pooling of the ``history`` tower's history.
        half_life_days: Half-life of its time decay.
        max_history: Most recent ratings kept per history.

    Returns:
        A :class:`tfdssm.training.run.Prepared`.
    """
    if user_tower not in history.USER_TOWERS:
        raise ConfigError(f"user_tower must be one of {history.USER_TOWERS}, "
                          f"received {user_tower!r}.")
    if interactions is None:
        interactions = load_movielens_100k(data_dir, verbose=verbose).interactions()
    frame = interactions[list(USER_COLUMNS + MOVIE_COLUMNS)].copy()
    for column in USER_COLUMNS + MOVIE_COLUMNS:
        if column != "age":
            frame[column] = frame[column].astype(str)
    frame["age"] = frame["age"].astype("float32")
    if user_tower != "features":
        if "timestamp" not in interactions.columns:
            raise DataError(f"user_tower={user_tower!r} needs the ratings' "
                            "timestamp column to build histories.")
        frame["timestamp"] = interactions["timestamp"].to_numpy()
    if split == "random":
        train, test = split_frame(frame, test_fraction, seed)
    elif split == "leave_last_out":
        train, test = leave_last_out(interactions, frame)
    else:
        raise ConfigError(
            f"split must be 'random' or 'leave_last_out', received {split!r}."
        )
    user_features = [
        CategoricalFeature("user_id", vocabulary_of(train["user_id"]), 32),
        NumericFeature(
            "age", float(train["age"].mean()), float(train["age"].std() or 1)
        ),
        CategoricalFeature("gender", vocabulary_of(train["gender"]), 4),
        CategoricalFeature("occupation", vocabulary_of(train["occupation"]), 8),
        CategoricalFeature("zip_prefix", vocabulary_of(train["zip_prefix"]), 8),
    ]
    movie_features = [
        CategoricalFeature("movie_id", vocabulary_of(train["movie_id"]), 32),
        TextFeature("title", num_buckets, 32, 128, "sqrtn"),
        MultiValuedFeature("genres", vocabulary_of(frame["genres"], "|"), 8),
        CategoricalFeature("year", vocabulary_of(train["year"]), 8),
    ]
    common = dict(hidden=hidden, output_dim=dim, activation="relu", normalize=True,
                  senet=senet)
    probabilities = None
    if logq and loss == "in_batch":
        counts = train["movie_id"].value_counts()
        probabilities = (counts / counts.sum()).to_dict()
    extra_info: dict = {"user_tower": user_tower, "num_heads": num_heads, "loss": loss}
    if user_tower == "features":
        query_tower = (Tower(user_features, name="user_tower", **common)
                       if num_heads == 1 else MultiHeadTower(
                           user_features, num_heads=num_heads, name="user_tower",
                           **common))
        movie_tower = Tower(movie_features, name="movie_tower", **common)
        model = DSSM(
            query_tower, movie_tower, candidate_id="movie_id",
            temperature=temperature, remove_accidental_hits=True,
            candidate_probabilities=probabilities, loss=loss,
        )
        features = user_features + movie_features
    else:
        train, test, features, model, more = history.prepare_movielens(
            train, test, user_features, movie_features, user_tower, hidden, dim,
            temperature, probabilities, senet, num_heads, loss, max_history,
            history_pooling, half_life_days)
        extra_info.update(more)
    corpus = (
        frame[list(MOVIE_COLUMNS)].drop_duplicates("movie_id")
        .sort_values("movie_id", key=lambda s: s.astype(int), ignore_index=True)
    )
    return Prepared(
        model=model, features=features, train=train,
        test=test, corpus=corpus, candidate_id="movie_id", query_key="user_id",
        info={"pipeline": "movielens", "hidden": list(hidden), "dim": dim,
              "num_buckets": num_buckets, "temperature": temperature, "logq": logq,
              "senet": senet, "split": split if split != "random" else
              f"random {1 - test_fraction:.0%}/{test_fraction:.0%}, seed {seed}",
              **extra_info},
    )


def leave_last_out(
    interactions: pd.DataFrame, frame: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's latest rating (by timestamp, ties by row order) is the test row.

    Args:
        interactions: The source rows, with ``user_id`` and ``timestamp``.
        frame: The same rows (same order) as the pipeline's feature table.

    Returns:
        ``(train, test)`` with one test row per user who has >= 2 ratings.
    """
    if "timestamp" not in interactions.columns:
        raise DataError("leave_last_out needs a timestamp column in the interactions.")
    order = interactions.reset_index(drop=True)
    position = order.sort_values("timestamp", kind="stable").groupby(
        "user_id", sort=False).tail(1).index
    counts = order["user_id"].value_counts()
    position = [i for i in position if counts[order.loc[i, "user_id"]] >= 2]
    is_test = order.index.isin(position)
    frame = frame.reset_index(drop=True)
    return (frame[~is_test].reset_index(drop=True),
            frame[is_test].reset_index(drop=True))
