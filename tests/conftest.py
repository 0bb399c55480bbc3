"""Shared tiny data and once-per-session trained exports (kept small and fast)."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split
import pandas as pd
import pytest

TOPICS = ["apple", "banana", "cherry", "dates", "elder",
          "figs", "grape", "honey", "kiwi", "lemon"]


def pairs_frame(rows: int = 60) -> pd.DataFrame:
    """Query/doc click pairs: 10 documents, each clicked by several queries."""
    return pd.DataFrame({
        "query": [f"{TOPICS[i % 10]} recipe {i % 7}" for i in range(rows)],
        "doc": [f"all about {TOPICS[i % 10]}" for i in range(rows)],
        "doc_id": [f"D{i % 10}" for i in range(rows)],
    })


def movielens_frame(rows: int = 60) -> pd.DataFrame:
    """Interactions with the columns of ``movielens.USER_COLUMNS + MOVIE_COLUMNS``."""
    genres = ["Action|Comedy", "Drama", "Comedy|Romance", "Sci-Fi|Action", "Drama|War"]
    out = []
    for i in range(rows):
        user, movie = i % 8, (i * 3) % 10
        out.append({
            "user_id": str(user + 1), "age": 18 + 5 * user,
            "gender": "MF"[user % 2],
            "occupation": ["student", "artist", "doctor"][user % 3],
            "zip_prefix": str(10 + user % 4),
            "movie_id": str(movie + 1), "title": f"Café Movie {movie} 北京",
            "genres": genres[movie % 5], "year": str(1990 + movie % 4),
        })
    return pd.DataFrame(out)


@pytest.fixture(name="pairs_frame", scope="session")
def _pairs_frame_fixture():
    """The builder :func:`pairs_frame` (call it with a row count)."""
    return pairs_frame


@pytest.fixture(name="movielens_frame", scope="session")
def _movielens_frame_fixture():
    """The builder :func:`movielens_frame` (call it with a row count)."""
    return movielens_frame


def _train_and_export(prepared, export_dir):
    """One epoch of ``train.run``, then the towers export alone (no TFLite: faster)."""
    from tfdssm import export
    from tfdssm.training import run as train

    result = train.run(prepared, None, epochs=1, batch_size=16, verbose=0)
    result["export"] = export.export_model(
        prepared.model, export_dir, corpus=prepared.corpus, metrics=result["metrics"],
        training={**prepared.info, "epochs": 1})
    return export_dir, prepared, result


@pytest.fixture(scope="session")
def pairs_export(tmp_path_factory):
    """A one-epoch tiny pairs model, exported: ``(dir, prepared, result)``."""
    from tfdssm.recipes import pairs

    # Two towers (the recipe shares one by default; the CLI tests cover that).
    prepared = pairs.prepare(pairs_frame(), "query", "doc", "doc_id", num_buckets=500,
                             hidden=(16, 16), dim=8, shared_towers=False)
    return _train_and_export(prepared, tmp_path_factory.mktemp("pairs_export"))


@pytest.fixture(scope="session")
def movielens_export(tmp_path_factory):
    """A one-epoch tiny movielens model, exported: ``(dir, prepared, result)``."""
    from tfdssm.recipes import movielens

    prepared = movielens.prepare(interactions=movielens_frame(), hidden=(16,), dim=8,
                                 num_buckets=500, verbose=False)
    return _train_and_export(prepared, tmp_path_factory.mktemp("movielens_export"))
