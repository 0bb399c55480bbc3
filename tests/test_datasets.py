"""Tests for tfdssm.data.movielens: MovieLens-100k discovery, fetching and parsing."""

from __future__ import annotations

import io
import logging
import pathlib
import zipfile

import numpy as np
import pandas as pd
import pytest

from tfdssm.data import movielens as datasets
from tfdssm.data.movielens import (
    GENRES,
    MovieLens,
    find_movielens_100k,
    load_movielens_100k,
)
from tfdssm.errors import DataError

# --------------------------------------------------------------------------- #
# Tiny fixtures, written in both formats from the same rows.
# --------------------------------------------------------------------------- #

# (user, item, rating, timestamp); the same order in u.data and ml-100k.inter.
RATINGS = [
    ("1", "1", 5, 874965758),
    ("2", "1", 4, 888550871),
    ("1", "2", 3, 876893171),
    ("3", "3", 2, 889237455),
    ("10", "4", 1, 874965758),
    ("2", "2", 5, 874965758),
]
# (user, age, gender, occupation, zip code)
USERS = [
    ("1", 24, "M", "technician", "85711"),
    ("2", 53, "F", "other", "94043"),
    ("3", 39, "M", "scientist", "T8H1N"),
    ("10", 53, "M", "lawyer", "l9g2b"),
]
# (item, GroupLens title, RecBole title, RecBole year, genres)
MOVIES = [
    (
        "1",
        "Toy Story (1995)",
        "Toy Story",
        "1995",
        ["Animation", "Children's", "Comedy"],
    ),
    ("2", "Misérables, Les (1995)", "Misérables, Les", "1995", ["Drama", "Musical"]),
    ("3", "unknown", "unkonwn", "unkonwn", ["unknown"]),
    (
        "4",
        "Land Before Time III: The Time of the Great Giving (1995) (V)",
        "Land Before Time III: The Time of the Great Giving (1995)",
        "V",
        ["Animation", "Children's"],
    ),
]


def write_grouplens(directory: pathlib.Path, with_genre_file: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.data").write_text(
        "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS), encoding="ascii"
    )
    (directory / "u.user").write_text(
        "".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in USERS), encoding="ascii"
    )
    lines = []
    for item, title, _, _, genres in MOVIES:
        flags = "|".join("1" if name in genres else "0" for name in GENRES)
        date = "" if title == "unknown" else "01-Jan-1995"
        url = "" if title == "unknown" else "http://us.imdb.com/M/title-exact?x"
        lines.append(f"{item}|{title}|{date}||{url}|{flags}\n")
    (directory / "u.item").write_bytes("".join(lines).encode("latin-1"))
    if with_genre_file:
        (directory / "u.genre").write_text(
            "".join(f"{name}|{i}\n" for i, name in enumerate(GENRES)) + "\n",
            encoding="ascii",
        )


def write_recbole(directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS),
        encoding="utf-8",
    )
    (directory / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in USERS),
        encoding="utf-8",
    )
    (directory / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(
            f"{item}\t{title}\t{year}\t{' '.join(genres)}\n"
            for item, _, title, year, genres in MOVIES
        ),
        encoding="utf-8",
    )


@pytest.fixture
def grouplens_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    directory = tmp_path / "gl" / "ml-100k"
    write_grouplens(directory)
    return directory


@pytest.fixture
def recbole_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    directory = tmp_path / "rb" / "ml-100k"
    write_recbole(directory)
    return directory


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any download attempt fail the test."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("no download expected")

    monkeypatch.setattr(datasets, "_pip_download_wheel", forbidden)
    monkeypatch.setattr(datasets.urllib.request, "urlopen", forbidden)


def assert_str_column(series: pd.Series) -> None:
    assert series.dtype == object, series.name
    assert all(isinstance(v, str) for v in series), series.name


def check_frames(ml: MovieLens) -> None:
    assert list(ml.ratings.columns) == ["user_id", "movie_id", "rating", "timestamp"]
    assert list(ml.users.columns) == [
        "user_id",
        "age",
        "gender",
        "occupation",
        "zip_prefix",
    ]
    assert list(ml.movies.columns) == ["movie_id", "title", "genres", "year"]
    assert ml.ratings["rating"].dtype == np.float32
    assert ml.ratings["timestamp"].dtype == np.int64
    assert ml.users["age"].dtype == np.int64
    for frame, columns in (
        (ml.ratings, ["user_id", "movie_id"]),
        (ml.users, ["user_id", "gender", "occupation", "zip_prefix"]),
        (ml.movies, ["movie_id", "title", "genres", "year"]),
    ):
        assert not frame.isna().to_numpy().any()
        for column in columns:
            assert_str_column(frame[column])


# --------------------------------------------------------------------------- #
# Parsing.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fmt", ["grouplens", "recbole"])
def test_parses_tiny_copy(
    fmt: str, grouplens_dir: pathlib.Path, recbole_dir: pathlib.Path, no_download: None
) -> None:
    directory = grouplens_dir if fmt == "grouplens" else recbole_dir
    ml = load_movielens_100k(directory, verbose=False)
    check_frames(ml)
    assert ml.source_format == fmt
    assert ml.source == directory.resolve()

    assert ml.ratings["user_id"].tolist() == [r[0] for r in RATINGS]
    assert ml.ratings["movie_id"].tolist() == [r[1] for r in RATINGS]
    assert ml.ratings["rating"].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 5.0]
    assert ml.ratings["timestamp"].tolist() == [r[3] for r in RATINGS]

    users = ml.users.set_index("user_id")
    assert ml.users["user_id"].tolist() == ["1", "2", "3", "10"]  # numeric order
    assert users.loc["1"].tolist() == [24, "M", "technician", "85"]
    assert users.loc["2", "gender"] == "F"
    assert users.loc["3", "zip_prefix"] == "T8"  # Canadian zip
    assert users.loc["10", "zip_prefix"] == "L9"  # upper-cased

    movies = ml.movies.set_index("movie_id")
    assert movies.loc["1"].tolist() == [
        "Toy Story",
        "Animation|Children's|Comedy",
        "1995",
    ]
    assert movies.loc["2"].tolist() == ["Misérables, Les", "Drama|Musical", "1995"]
    assert movies.loc["3"].tolist() == ["unknown", "unknown", ""]
    assert movies.loc["4"].tolist() == [
        "Land Before Time III: The Time of the Great Giving",
        "Animation|Children's",
        "1995",
    ]


def test_both_formats_give_equal_frames(
    grouplens_dir: pathlib.Path, recbole_dir: pathlib.Path, no_download: None
) -> None:
    a = load_movielens_100k(grouplens_dir, verbose=False)
    b = load_movielens_100k(recbole_dir, verbose=False)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.movies, b.movies)
    pd.testing.assert_frame_equal(a.interactions(), b.interactions())


def test_latin1_title_is_decoded(tmp_path: pathlib.Path, no_download: None) -> None:
    directory = tmp_path / "ml-100k"
    write_grouplens(directory)
    raw = (directory / "u.item").read_bytes()
    assert "é".encode("latin-1") in raw and "é".encode() not in raw
    titles = load_movielens_100k(directory, verbose=False).movies["title"].tolist()
    assert "Misérables, Les" in titles


def test_genre_file_is_optional(tmp_path: pathlib.Path, no_download: None) -> None:
    with_file, without_file = tmp_path / "a", tmp_path / "b"
    write_grouplens(with_file)
    write_grouplens(without_file, with_genre_file=False)
    pd.testing.assert_frame_equal(
        load_movielens_100k(with_file, verbose=False).movies,
        load_movielens_100k(without_file, verbose=False).movies,
    )


def test_genre_names_come_from_u_genre(
    grouplens_dir: pathlib.Path, no_download: None
) -> None:
    renamed = [name.upper() for name in GENRES]
    (grouplens_dir / "u.genre").write_text(
        "".join(f"{name}|{i}\n" for i, name in enumerate(renamed))
    )
    movies = load_movielens_100k(grouplens_dir, verbose=False).movies
    assert movies["genres"].iloc[0] == "ANIMATION|CHILDREN'S|COMEDY"


def test_interactions(grouplens_dir: pathlib.Path, no_download: None) -> None:
    ml = load_movielens_100k(grouplens_dir, verbose=False)
    inter = ml.interactions()
    assert list(inter.columns) == [
        "user_id",
        "movie_id",
        "rating",
        "timestamp",
        "age",
        "gender",
        "occupation",
        "zip_prefix",
        "title",
        "genres",
        "year",
    ]
    assert len(inter) == len(RATINGS)
    assert not inter.isna().to_numpy().any()
    assert list(inter.index) == list(range(len(RATINGS)))
    keys = list(
        zip(inter["timestamp"], inter["user_id"], inter["movie_id"], strict=True)
    )
    assert keys == sorted(keys)
    # Three ratings share timestamp 874965758: ids compare as strings.
    assert keys[:3] == [
        (874965758, "1", "1"),
        (874965758, "10", "4"),
        (874965758, "2", "2"),
    ]
    first = inter.iloc[0]
    assert (first["title"], first["zip_prefix"], first["age"]) == (
        "Toy Story",
        "85",
        24,
    )
    assert inter["rating"].dtype == np.float32
    assert inter["age"].dtype == np.int64
    for column in ("user_id", "movie_id", "gender", "title", "genres", "year"):
        assert_str_column(inter[column])


def test_bad_rating_is_a_data_error(
    grouplens_dir: pathlib.Path, no_download: None
) -> None:
    (grouplens_dir / "u.data").write_text("1\t1\tfive\t874965758\n")
    with pytest.raises(DataError, match=r"u\.data line 1: rating 'five'"):
        load_movielens_100k(grouplens_dir, verbose=False)


def test_unknown_user_is_a_data_error(
    recbole_dir: pathlib.Path, no_download: None
) -> None:
    with (recbole_dir / "ml-100k.inter").open("a") as f:
        f.write("999\t1\t3\t874965758\n")
    with pytest.raises(DataError, match="user_id missing from users.*'999'"):
        load_movielens_100k(recbole_dir, verbose=False)


def test_wrong_column_count_is_a_data_error(
    grouplens_dir: pathlib.Path, no_download: None
) -> None:
    (grouplens_dir / "u.user").write_text("1|24|M|technician\n")
    with pytest.raises(DataError, match=r"u\.user has 4 columns, expected 5"):
        load_movielens_100k(grouplens_dir, verbose=False)


# --------------------------------------------------------------------------- #
# Finding a copy.
# --------------------------------------------------------------------------- #


def test_data_dir_may_be_the_parent(
    grouplens_dir: pathlib.Path, no_download: None
) -> None:
    assert find_movielens_100k(grouplens_dir.parent) == grouplens_dir.resolve()
    assert find_movielens_100k(grouplens_dir) == grouplens_dir.resolve()


def test_grouplens_preferred_when_both_formats_present(
    tmp_path: pathlib.Path, no_download: None
) -> None:
    write_grouplens(tmp_path)
    write_recbole(tmp_path)
    assert load_movielens_100k(tmp_path, verbose=False).source_format == "grouplens"


def test_data_dir_without_either_format(
    tmp_path: pathlib.Path, no_download: None
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    partial = tmp_path / "half"
    partial.mkdir()
    (partial / "u.data").write_text("1\t1\t5\t874965758\n")
    with pytest.raises(DataError) as info:
        find_movielens_100k(tmp_path)
    message = str(info.value)
    for name in (
        "u.data",
        "u.item",
        "u.user",
        "ml-100k.inter",
        "ml-100k.item",
        "ml-100k.user",
    ):
        assert name in message
    assert "notes.txt" in message  # what was found
    assert "lacks u.item, u.user" in message  # the incomplete copy
    assert "--data" in message  # how to fix it
    assert isinstance(info.value, ValueError)


def test_data_dir_that_does_not_exist(
    tmp_path: pathlib.Path, no_download: None
) -> None:
    with pytest.raises(DataError, match=r"u\.data.*nope does not exist"):
        load_movielens_100k(tmp_path / "nope", verbose=False)


def test_cached_copy_is_used_without_downloading(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    no_download: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tfdssm")
    write_recbole(tmp_path / "cache" / "ml-100k-recbole")
    # A hidden staging directory left by a killed run must be ignored.
    write_grouplens(tmp_path / "cache" / ".tmp-ml-100k-dead")
    monkeypatch.setenv("TFDSSM_CACHE", str(tmp_path / "cache"))
    found = find_movielens_100k()
    assert found == (tmp_path / "cache" / "ml-100k-recbole").resolve()
    assert "cached" in caplog.text
    caplog.clear()
    assert find_movielens_100k(verbose=False) == found
    assert caplog.text == ""


def make_fake_wheel(path: pathlib.Path, source: pathlib.Path) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("recbole/__init__.py", "")
        wheel.writestr("recbole/dataset_example/ml-1m/ml-1m.inter", "ignored")
        for file in sorted(source.iterdir()):
            wheel.write(file, datasets._WHEEL_PREFIX + file.name)
    return path


def test_pip_route_extracts_into_cache(
    tmp_path: pathlib.Path,
    recbole_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tfdssm")
    wheel = make_fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", recbole_dir)
    monkeypatch.setattr(datasets, "_pip_download_wheel", lambda _: wheel)
    cache = tmp_path / "cache"
    ml = load_movielens_100k(cache_dir=cache)
    assert ml.source == (cache / "ml-100k-recbole").resolve()
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k-recbole"]
    assert sorted(p.name for p in ml.source.iterdir()) == sorted(
        p.name for p in recbole_dir.iterdir()
    )
    err = caplog.text
    assert "fetching MovieLens-100k from the recbole wheel on PyPI" in err
    assert "cached at" in err
    expected = load_movielens_100k(recbole_dir, verbose=False)
    pd.testing.assert_frame_equal(ml.movies, expected.movies)


def test_grouplens_route_when_pip_fails(
    tmp_path: pathlib.Path, grouplens_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pip_fails(_: str) -> pathlib.Path:
        raise datasets._FetchError("pip failed: offline")

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(grouplens_dir.iterdir()):
            zipped.write(file, f"ml-100k/{file.name}")
    urls = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        urls.append((url, timeout))
        return io.BytesIO(archive.getvalue())

    monkeypatch.setattr(datasets, "_pip_download_wheel", pip_fails)
    monkeypatch.setattr(datasets.urllib.request, "urlopen", urlopen)
    cache = tmp_path / "cache"
    ml = load_movielens_100k(cache_dir=cache, verbose=False)
    assert urls == [(datasets.GROUPLENS_URL, 60)]
    assert ml.source == (cache / "ml-100k").resolve()
    assert ml.source_format == "grouplens"
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]


def test_unsafe_archive_is_rejected(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pip_fails(_: str) -> pathlib.Path:
        raise datasets._FetchError("pip failed: offline")

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("../evil.txt", "x")
    monkeypatch.setattr(datasets, "_pip_download_wheel", pip_fails)
    monkeypatch.setattr(
        datasets.urllib.request,
        "urlopen",
        lambda url, timeout: io.BytesIO(archive.getvalue()),
    )
    with pytest.raises(DataError, match="unsafe path"):
        find_movielens_100k(cache_dir=tmp_path / "cache", verbose=False)
    assert not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_all_routes_failing_names_every_attempt(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pip_fails(_: str) -> pathlib.Path:
        raise datasets._FetchError("pip failed: no index")

    def url_fails(url: str, timeout: float) -> io.BytesIO:
        raise OSError("name resolution failed")

    monkeypatch.setattr(datasets, "_pip_download_wheel", pip_fails)
    monkeypatch.setattr(datasets.urllib.request, "urlopen", url_fails)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        find_movielens_100k(cache_dir=cache, verbose=False)
    message = str(info.value)
    assert str(cache) in message
    assert "recbole==1.2.1" in message and "pip failed: no index" in message
    assert datasets.GROUPLENS_URL in message and "name resolution failed" in message
    assert "--data DIR" in message
    assert "PyPI" in message and "files.grouplens.org" in message
    assert list(cache.iterdir()) == []  # no half-extracted leftovers


# --------------------------------------------------------------------------- #
# The real data, fetched for real (pip download of the recbole wheel).
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_real_movielens_100k_via_pip(tmp_path: pathlib.Path) -> None:
    cache = tmp_path / "cache"
    directory = find_movielens_100k(cache_dir=cache, verbose=False)
    assert directory == (cache / "ml-100k-recbole").resolve()

    ml = load_movielens_100k(cache_dir=cache, verbose=False)
    assert ml.source == directory and ml.source_format == "recbole"
    check_frames(ml)
    assert len(ml.ratings) == 100_000
    assert len(ml.users) == 943
    assert len(ml.movies) == 1682
    assert ml.ratings["user_id"].nunique() == 943
    assert ml.ratings["movie_id"].nunique() == 1682
    assert set(ml.ratings["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    genres = set("|".join(ml.movies["genres"]).split("|"))
    assert genres <= set(GENRES) and len(genres) <= 19

    movies = ml.movies.set_index("movie_id")
    assert movies.loc["1"].tolist() == [
        "Toy Story",
        "Animation|Children's|Comedy",
        "1995",
    ]
    assert movies.loc["267"].tolist() == ["unknown", "unknown", ""]
    assert movies.loc["1412", "year"] == "1995"
    assert movies.loc["543", "title"] == "Misérables, Les"
    assert (movies["year"].str.fullmatch(r"\d{4}") | (movies["year"] == "")).all()
    assert ml.users.set_index("user_id").loc["74", "zip_prefix"] == "T8"
    assert len(ml.interactions()) == 100_000
