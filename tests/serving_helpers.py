"""Shared data, exports and servers for test_index, test_serving and test_client.

Not a conftest: plain functions, with the trained export cached once per test
session (``trained_export``) so the three modules share it.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import atexit
import contextlib
import functools
import shutil
import tempfile

import numpy as np
import pandas as pd

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
          "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
WORDS = ["love", "night", "man", "story", "last", "dead", "city", "king", "girl",
         "world", "return", "dark", "star", "wars", "house", "blood", "heart",
         "street", "american", "summer", "secret", "little", "big", "lost", "game",
         "dream", "fire", "river", "ghost", "island", "money", "time", "road",
         "sky", "crime", "war", "party", "family", "wild", "black", "white", "red",
         "angel", "devil", "hunter", "ocean", "moon", "sun", "shadow", "killer"]
OCCUPATIONS = ["administrator", "artist", "doctor", "educator", "engineer",
               "entertainment", "executive", "healthcare", "homemaker", "lawyer",
               "librarian", "marketing", "none", "other", "programmer", "retired",
               "salesman", "scientist", "student", "technician", "writer"]


def synthetic_interactions(
    num_movies: int = 2000, num_users: int = 400, rows: int = 16000, seed: int = 0
) -> pd.DataFrame:
    """MovieLens-100k-like ratings with realistic structure.

    Movies have 1-3 genres (skewed genre frequencies), word titles with a year
    and Zipf popularity; users have demographics and two favourite genres, and
    70 % of their interactions are popular movies of those genres. Every movie
    appears at least once, so the corpus has ``num_movies`` candidates.
    """
    rng = np.random.default_rng(seed)
    genre_p = 1.0 / np.arange(1, len(GENRES) + 1) ** 0.7
    genre_p /= genre_p.sum()
    movie_genres = [sorted(set(rng.choice(len(GENRES), rng.integers(1, 4), p=genre_p)))
                    for _ in range(num_movies)]
    years = np.clip(1998 - rng.gamma(2.0, 6.0, num_movies).astype(int), 1930, 1998)
    titles = [" ".join(rng.choice(WORDS, rng.integers(1, 4))).title() + f" ({y})"
              for y in years]
    popularity = 1.0 / rng.permutation(np.arange(1, num_movies + 1)) ** 0.9
    by_genre = {g: [m for m in range(num_movies) if g in movie_genres[m]]
                for g in range(len(GENRES))}
    users = [{"user_id": str(u + 1), "age": int(rng.integers(7, 74)),
              "gender": "M" if rng.random() < 0.7 else "F",
              "occupation": str(rng.choice(OCCUPATIONS)),
              "zip_prefix": f"{rng.integers(0, 100):02d}",
              "likes": rng.choice(len(GENRES), 2, replace=False, p=genre_p)}
             for u in range(num_users)]
    picks = []
    for row in range(rows):
        user = users[rng.integers(num_users)]
        if row < num_movies:
            movie = row
        elif rng.random() < 0.7:
            pool = by_genre[int(rng.choice(user["likes"]))] or list(range(num_movies))
            weights = popularity[pool] / popularity[pool].sum()
            movie = int(rng.choice(pool, p=weights))
        else:
            movie = int(rng.choice(num_movies, p=popularity / popularity.sum()))
        picks.append({**{k: v for k, v in user.items() if k != "likes"},
                      "movie_id": str(movie + 1), "title": titles[movie],
                      "genres": "|".join(GENRES[g] for g in movie_genres[movie]),
                      "year": str(years[movie])})
    return pd.DataFrame(picks)


def _temp_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def trained_export() -> tuple[str, object, dict]:
    """A 1-epoch model on ~2000 synthetic movies, exported once per session.

    Returns:
        ``(export_dir, prepared, train.run result)``; ``max_k`` is 50; the
        candidates carry restrict tokens in namespaces ``genres`` and ``year``.
    """
    from tfdssm.recipes import movielens
    from tfdssm.training import run as train

    prepared = movielens.prepare(interactions=synthetic_interactions(), hidden=(32,),
                                 dim=16, num_buckets=2000, verbose=False)
    export_dir = _temp_dir("tfdssm-serving-export-")
    result = train.run(prepared, export_dir, epochs=1, batch_size=256, verbose=0,
                       max_k=50, restrict_columns=("genres", "year"))
    return export_dir, prepared, result


def user_features(prepared, count: int, offset: int = 0) -> dict[str, list]:
    """``count`` distinct users' query features (column -> values)."""
    users = prepared.test.drop_duplicates("user_id").iloc[offset:offset + count]
    return {"user_id": users["user_id"].astype(str).tolist(),
            "age": users["age"].astype("float32").tolist(),
            "gender": users["gender"].tolist(),
            "occupation": users["occupation"].tolist(),
            "zip_prefix": users["zip_prefix"].tolist()}


@contextlib.contextmanager
def running_server(export_dir, **kwargs):
    """An in-process :class:`tfdssm.serving.server.Server` on free loopback ports."""
    from tfdssm.serving.server import Server

    kwargs.setdefault("grpc_port", 0)
    kwargs.setdefault("rest_port", 0)
    server = Server(export_dir, **kwargs).start()
    try:
        yield server
    finally:
        server.stop(grace_seconds=2)
