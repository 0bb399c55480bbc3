"""MovieLens-100k: find it, fetch it, and parse it into pandas DataFrames.

This module is pandas-only (no TensorFlow import) so it is fast to import and test.

Two on-disk formats are recognised, in a directory or one of its immediate
subdirectories:

* **GroupLens raw** (``ml-100k/`` from ``ml-100k.zip``): ``u.data``, ``u.item``,
  ``u.user`` and, optionally, ``u.genre``.
* **RecBole atomic files** (``recbole/dataset_example/ml-100k/`` inside the
  ``recbole==1.2.1`` wheel on PyPI): ``ml-100k.inter``, ``ml-100k.item``,
  ``ml-100k.user``. These are tab-separated with a typed header line::

      ml-100k.inter  user_id:token  item_id:token  rating:float  timestamp:float
      ml-100k.item   item_id:token  movie_title:token_seq  release_year:token
                     class:token_seq
      ml-100k.user   user_id:token  age:token  gender:token  occupation:token
                     zip_code:token

  They are UTF-8 (``u.item`` is latin-1); ``movie_title`` is the GroupLens title
  without its last parenthesised group, ``release_year`` is that group (the year
  from the title, not the release date), ``class`` holds the genre names separated
  by spaces. Ratings and users are the same rows, in the same order, as ``u.data``
  and ``u.user``.

Both formats parse to identical frames. The columns come from information both
formats carry; what only the GroupLens files have (release date, video release
date, IMDb URL, the full zip code) is not used, apart from ``zip_prefix``.
Normalisations that make the two agree:

* ``year`` is the 4-digit year in the title, ``""`` when there is none. RecBole
  writes ``V`` as the year of movie 1412 (GroupLens title ``"... (1995) (V)"``, a
  video release); both formats give year ``"1995"`` and drop the ``(V)``.
* Movie 267 has no title in either file (GroupLens ``"unknown"``, RecBole
  ``"unkonwn"`` for both title and year); both give title ``"unknown"``, year
  ``""``.
* Whitespace inside titles is collapsed to single spaces (RecBole ``token_seq``
  fields are space-separated tokens).
* Genres are listed in the ``u.genre`` order (unknown, Action, ..., Western) and
  joined with ``"|"``; a movie without any genre gets ``"unknown"``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Hashable

import numpy as np
import pandas as pd

from tfdssm.errors import DataError

logger = logging.getLogger("tfdssm")

__all__ = [
    "GENRES",
    "GROUPLENS_URL",
    "RECBOLE_VERSION",
    "MovieLens",
    "find_movielens_100k",
    "load_movielens_100k",
]

#: Genre names in ``u.genre`` order, used when a GroupLens copy has no ``u.genre``.
GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

#: The recbole release whose wheel carries ``dataset_example/ml-100k``.
RECBOLE_VERSION = "1.2.1"
#: The official GroupLens archive, used when PyPI cannot be reached.
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"

_GROUPLENS_FILES = ("u.data", "u.item", "u.user")
_RECBOLE_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
_WHEEL_PREFIX = "recbole/dataset_example/ml-100k/"
_RECBOLE_CACHE_NAME = "ml-100k-recbole"
_GROUPLENS_CACHE_NAME = "ml-100k"
_PIP_TIMEOUT_S = 300
_URL_TIMEOUT_S = 60

_GROUPLENS = "grouplens"
_RECBOLE = "recbole"

# "Title (1995)" -> ("Title", "1995"); a trailing " (V)" (video) is dropped too.
_TITLE_YEAR_RE = re.compile(r"^(.*?)\s*\((\d{4})\)(?:\s*\(V\))?\s*$")
_YEAR_RE = re.compile(r"^\d{4}$")
_WS_RE = re.compile(r"\s+")

_RATINGS_COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]
_USERS_COLUMNS = ["user_id", "age", "gender", "occupation", "zip_prefix"]
_MOVIES_COLUMNS = ["movie_id", "title", "genres", "year"]


@dataclasses.dataclass(frozen=True)
class MovieLens:
    """MovieLens-100k as three DataFrames.

    String columns hold Python ``str`` objects (``object`` dtype) and are never
    NaN; a missing value is ``""``.

    Attributes:
        ratings: One row per rating: ``user_id`` (str), ``movie_id`` (str),
            ``rating`` (float32), ``timestamp`` (int64, Unix seconds), in file
            order.
        users: One row per user, sorted by numeric id: ``user_id`` (str), ``age``
            (int64), ``gender`` (str, ``"M"``/``"F"``), ``occupation`` (str),
            ``zip_prefix`` (str, first 2 characters of the zip code, upper-cased,
            e.g. ``"85"`` or ``"T8"``).
        movies: One row per movie, sorted by numeric id: ``movie_id`` (str),
            ``title`` (str, without the trailing ``" (1995)"``), ``genres`` (str,
            genre names joined with ``"|"``, ``"unknown"`` when none), ``year``
            (str, 4 digits or ``""``).
        source: Directory the data was read from (``None`` if built by hand).
        source_format: ``"grouplens"`` or ``"recbole"`` (``""`` if built by hand).
    """

    ratings: pd.DataFrame
    users: pd.DataFrame
    movies: pd.DataFrame
    source: pathlib.Path | None = None
    source_format: str = ""

    def interactions(self) -> pd.DataFrame:
        """Ratings joined with their user's and movie's features.

        Returns:
            One row per rating with columns ``user_id``, ``movie_id``, ``rating``,
            ``timestamp``, ``age``, ``gender``, ``occupation``, ``zip_prefix``,
            ``title``, ``genres``, ``year``, stably sorted by ``(timestamp,
            user_id, movie_id)`` (ids compare as strings) with a fresh
            ``RangeIndex``.

        Raises:
            DataError: if a rating refers to a user or movie that is not in
                ``users`` / ``movies``.
        """
        _check_references(self.ratings, self.users, self.movies, self.source)
        merged = self.ratings.merge(
            self.users, on="user_id", how="left", validate="many_to_one"
        ).merge(self.movies, on="movie_id", how="left", validate="many_to_one")
        merged = merged.sort_values(
            ["timestamp", "user_id", "movie_id"], kind="stable"
        ).reset_index(drop=True)
        columns = _RATINGS_COLUMNS + _USERS_COLUMNS[1:] + _MOVIES_COLUMNS[1:]
        return merged[columns]


def find_movielens_100k(
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    verbose: bool = True,
) -> pathlib.Path:
    """Returns a directory holding MovieLens-100k, downloading it if needed.

    Resolution order:

    1. ``data_dir``, if given: it or one of its immediate subdirectories must hold
       the GroupLens files (``u.data``, ``u.item``, ``u.user``) or the RecBole
       files (``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user``). Nothing is
       downloaded.
    2. An extracted copy already in ``cache_dir`` (or one of its immediate,
       non-hidden subdirectories).
    3. ``pip download recbole==1.2.1`` (works wherever PyPI or a PyPI mirror is
       configured for pip); its ``recbole/dataset_example/ml-100k/*`` files are
       extracted into ``<cache_dir>/ml-100k-recbole/``.
    4. ``https://files.grouplens.org/datasets/movielens/ml-100k.zip``, extracted
       into ``<cache_dir>/ml-100k/``.

    Extraction goes to a hidden temporary directory inside ``cache_dir`` that is
    renamed into place at the end, so an interrupted run never leaves a partial
    copy behind.

    Args:
        data_dir: Directory with an extracted MovieLens-100k (either format).
        cache_dir: Where downloads are kept. Defaults to ``$TFDSSM_CACHE`` or
            ``~/.cache/tfdssm``.
        verbose: Log short progress lines (``tfdssm`` logger, info) when
            fetching.

    Returns:
        The directory that directly contains the data files.

    Raises:
        DataError: if ``data_dir`` holds neither format, or if no copy is cached
            and both downloads fail. The message names what was looked for,
            what was found or tried, and how to fix it.
    """
    if data_dir is not None:
        root = pathlib.Path(data_dir).expanduser()
        found = _locate(root)
        if found is None:
            raise DataError(_not_found_message(root))
        return found.resolve()

    cache = _resolve_cache_dir(cache_dir)
    found = _locate(cache) if cache.is_dir() else None
    if found is not None:
        _log(verbose, f"using cached MovieLens-100k at {found}")
        return found.resolve()

    tried = [f"cache {cache}: no extracted copy in it or its subdirectories"]
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        tried.append(f"cannot create the cache directory {cache}: {exc}")
        raise DataError(_download_failed_message(tried)) from exc

    _log(verbose, "fetching MovieLens-100k from the recbole wheel on PyPI ...")
    try:
        target = _fetch_from_recbole_wheel(cache)
    except _FetchError as exc:
        tried.append(f"pip download recbole=={RECBOLE_VERSION}: {exc}")
        _log(verbose, f"PyPI failed ({_first_line(str(exc))})")
    else:
        _log(verbose, f"MovieLens-100k cached at {target}")
        return target.resolve()

    _log(verbose, f"fetching MovieLens-100k from {GROUPLENS_URL} ...")
    try:
        target = _fetch_from_grouplens(cache)
    except _FetchError as exc:
        tried.append(f"{GROUPLENS_URL}: {exc}")
    else:
        _log(verbose, f"MovieLens-100k cached at {target}")
        return target.resolve()
    raise DataError(_download_failed_message(tried))


def load_movielens_100k(
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    verbose: bool = True,
) -> MovieLens:
    """Finds (see :func:`find_movielens_100k`) and parses MovieLens-100k.

    When a directory holds both formats the GroupLens files are read. The two
    formats give identical frames (see the module docstring for the few
    normalisations this takes).

    Args:
        data_dir: Directory with an extracted MovieLens-100k (either format).
        cache_dir: Where downloads are kept. Defaults to ``$TFDSSM_CACHE`` or
            ``~/.cache/tfdssm``.
        verbose: Log short progress lines (``tfdssm`` logger, info) when
            fetching.

    Returns:
        The parsed :class:`MovieLens`; for the real data 100,000 ratings, 943
        users and 1,682 movies.

    Raises:
        DataError: if the data cannot be found or fetched, or a file is malformed
            (wrong column count, non-numeric rating, unknown user or movie id,
            duplicate ids, undecodable text).
    """
    directory = find_movielens_100k(data_dir, cache_dir=cache_dir, verbose=verbose)
    fmt = _detect_format(directory)
    if fmt == _GROUPLENS:
        ratings, users, movies = _read_grouplens(directory)
    elif fmt == _RECBOLE:
        ratings, users, movies = _read_recbole(directory)
    else:  # pragma: no cover - find_movielens_100k only returns detected dirs
        raise DataError(_not_found_message(directory))
    _check_unique(users, "user_id", directory)
    _check_unique(movies, "movie_id", directory)
    _check_references(ratings, users, movies, directory)
    return MovieLens(
        ratings=ratings,
        users=users,
        movies=movies,
        source=directory,
        source_format=fmt,
    )


# --------------------------------------------------------------------------- #
# Locating a copy on disk.
# --------------------------------------------------------------------------- #


def _detect_format(directory: pathlib.Path) -> str | None:
    if all((directory / name).is_file() for name in _GROUPLENS_FILES):
        return _GROUPLENS
    if all((directory / name).is_file() for name in _RECBOLE_FILES):
        return _RECBOLE
    return None


def _subdirectories(root: pathlib.Path) -> list[pathlib.Path]:
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.is_dir() and not p.name.startswith(".")]


def _locate(root: pathlib.Path) -> pathlib.Path | None:
    """The first of ``root`` and its immediate subdirectories holding a format."""
    if not root.is_dir():
        return None
    for candidate in [root, *_subdirectories(root)]:
        if _detect_format(candidate) is not None:
            return candidate
    return None


def _not_found_message(root: pathlib.Path) -> str:
    wanted = (
        f"the GroupLens files {', '.join(_GROUPLENS_FILES)} (u.genre optional) or "
        f"the RecBole files {', '.join(_RECBOLE_FILES)}"
    )
    fix = (
        "Fix: pass --data (data_dir) pointing at an extracted ml-100k directory "
        f"(unzip {GROUPLENS_URL}, or take recbole/dataset_example/ml-100k from the "
        f"recbole=={RECBOLE_VERSION} wheel), or leave it out to download MovieLens-"
        "100k into the cache ($TFDSSM_CACHE or ~/.cache/tfdssm)."
    )
    if not root.exists():
        found = f"{root} does not exist."
    elif not root.is_dir():
        found = f"{root} is a file, not a directory."
    else:
        found = f"Found in {root}: {_describe_contents(root)}."
        partial = []
        for candidate in [root, *_subdirectories(root)]:
            for names in (_GROUPLENS_FILES, _RECBOLE_FILES):
                present = [n for n in names if (candidate / n).is_file()]
                if present and len(present) < len(names):
                    missing = [n for n in names if n not in present]
                    partial.append(
                        f"{candidate} has {', '.join(present)} but lacks "
                        f"{', '.join(missing)}"
                    )
        if partial:
            found += " Incomplete copies: " + "; ".join(partial) + "."
    return (
        f"no MovieLens-100k found in {root} (searched it and its immediate "
        f"subdirectories). Looked for {wanted}. {found} {fix}"
    )


def _describe_contents(root: pathlib.Path, limit: int = 12) -> str:
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        return f"<cannot list: {exc}>"
    if not entries:
        return "nothing (empty directory)"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(names) + more


# --------------------------------------------------------------------------- #
# Downloading into the cache.
# --------------------------------------------------------------------------- #


class _FetchError(Exception):
    """One download route failed; the message says why."""


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    if cache_dir is None:
        env = os.environ.get("TFDSSM_CACHE")
        if env:
            return pathlib.Path(env).expanduser()
        return pathlib.Path.home() / ".cache" / "tfdssm"
    return pathlib.Path(cache_dir).expanduser()


def _log(verbose: bool, message: str) -> None:
    if verbose:
        logger.info("%s", message)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _download_failed_message(tried: list[str]) -> str:
    lines = "\n".join(f"  - {item}" for item in tried)
    return (
        "could not obtain MovieLens-100k. Tried:\n"
        f"{lines}\n"
        "Fix it in one of two ways:\n"
        "  - pass --data DIR (data_dir=DIR) pointing at an extracted ml-100k "
        f"(the GroupLens files {', '.join(_GROUPLENS_FILES)}, or the RecBole files "
        f"{', '.join(_RECBOLE_FILES)}), or\n"
        f"  - allow access to PyPI (pip download recbole=={RECBOLE_VERSION}) or to "
        "files.grouplens.org, then run again."
    )


def _install(staging: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """Atomically renames a complete ``staging`` copy to ``target``."""
    if target.exists() and _detect_format(target) is None:
        # A stale, incomplete copy under our own cache name: replace it.
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if _detect_format(target) is not None:  # Another process won the race.
            return target
        raise
    return target


def _pip_download_wheel(download_dir: str) -> pathlib.Path:
    """Runs ``pip download recbole==<RECBOLE_VERSION>``; returns the wheel path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"recbole=={RECBOLE_VERSION}",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        download_dir,
        "--quiet",
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise _FetchError(f"timed out after {_PIP_TIMEOUT_S} s") from exc
    except OSError as exc:
        raise _FetchError(f"could not run pip: {exc}") from exc
    if result.returncode != 0:
        output = (result.stderr or "") + "\n" + (result.stdout or "")
        errors = [
            line.strip()
            for line in output.splitlines()
            if line.strip() and not line.startswith("WARNING:")
        ]
        detail = " | ".join(errors[-3:]) or f"exit code {result.returncode}"
        raise _FetchError(f"pip failed: {detail}")
    wheels = sorted(pathlib.Path(download_dir).glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    if not wheels:
        raise _FetchError(f"pip downloaded no recbole-{RECBOLE_VERSION} wheel")
    return wheels[0]


def _extract_wheel_data(wheel_path: pathlib.Path, destination: pathlib.Path) -> None:
    """Copies the files directly under ``recbole/dataset_example/ml-100k/``."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            for info in wheel.infolist():
                name = info.filename.removeprefix(_WHEEL_PREFIX)
                if (
                    name == info.filename
                    or info.is_dir()
                    or name in ("", ".", "..")
                    or "/" in name
                ):
                    continue
                with wheel.open(info) as src, open(destination / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _FetchError(f"could not extract {wheel_path.name}: {exc}") from exc
    if _detect_format(destination) != _RECBOLE:
        raise _FetchError(
            f"{wheel_path.name} has no complete {_WHEEL_PREFIX} "
            f"({', '.join(_RECBOLE_FILES)})"
        )


def _fetch_from_recbole_wheel(cache: pathlib.Path) -> pathlib.Path:
    target = cache / _RECBOLE_CACHE_NAME
    with tempfile.TemporaryDirectory(prefix="tfdssm-pip-") as download_dir:
        wheel_path = _pip_download_wheel(download_dir)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-ml-100k-", dir=cache))
        try:
            _extract_wheel_data(wheel_path, staging)
            try:
                return _install(staging, target)
            except OSError as exc:
                raise _FetchError(
                    f"could not move the data to {target}: {exc}"
                ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _fetch_from_grouplens(cache: pathlib.Path) -> pathlib.Path:
    target = cache / _GROUPLENS_CACHE_NAME
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-ml-100k-", dir=cache))
    try:
        archive = staging / "ml-100k.zip"
        try:
            with (
                urllib.request.urlopen(
                    GROUPLENS_URL, timeout=_URL_TIMEOUT_S
                ) as response,
                open(archive, "wb") as out,
            ):
                shutil.copyfileobj(response, out)
        except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors.
            raise _FetchError(f"download failed: {exc}") from exc
        extracted = staging / "extracted"
        try:
            with zipfile.ZipFile(archive) as zipped:
                base = extracted.resolve()
                for info in zipped.infolist():
                    destination = (extracted / info.filename).resolve()
                    if not destination.is_relative_to(base):
                        raise _FetchError(
                            f"unsafe path in the archive: {info.filename}"
                        )
                zipped.extractall(extracted)
        except (zipfile.BadZipFile, OSError) as exc:
            raise _FetchError(f"could not extract the archive: {exc}") from exc
        found = _locate(extracted)
        if found is None or _detect_format(found) != _GROUPLENS:
            raise _FetchError(
                f"the archive has no {', '.join(_GROUPLENS_FILES)} "
                f"(it contains {_describe_contents(extracted)})"
            )
        try:
            return _install(found, target)
        except OSError as exc:
            raise _FetchError(f"could not move the data to {target}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- #
# Parsing.
# --------------------------------------------------------------------------- #


def _read_table(
    path: pathlib.Path,
    sep: str,
    *,
    header: bool,
    encoding: str = "utf-8",
) -> pd.DataFrame:
    """Reads a delimited file with every field as a string, nothing as NaN."""
    try:
        frame = pd.read_csv(
            path,
            sep=sep,
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            quoting=csv.QUOTE_NONE,
            encoding=encoding,
            engine="c",
        )
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not {encoding}-encoded text: {exc}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(f"could not parse {path}: {exc}") from exc
    except OSError as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    if frame.isna().to_numpy().any():
        row = int(np.flatnonzero(frame.isna().to_numpy().any(axis=1))[0])
        line = row + (2 if header else 1)
        raise DataError(
            f"{path} line {line}: too few {sep!r}-separated fields "
            f"(expected {frame.shape[1]})"
        )
    return frame


def _expect_columns(frame: pd.DataFrame, count: int, path: pathlib.Path) -> None:
    if frame.shape[1] != count:
        raise DataError(
            f"{path} has {frame.shape[1]} columns, expected {count}; is it a "
            "MovieLens-100k file?"
        )


def _strings(series: pd.Series) -> pd.Series:
    """Stripped Python ``str`` values in an ``object`` column."""
    values = [str(v).strip() for v in series.tolist()]
    return pd.Series(values, index=series.index, dtype=object, name=series.name)


def _ids(series: pd.Series, what: str, path: pathlib.Path, header: bool) -> pd.Series:
    ids = _strings(series)
    empty = np.flatnonzero((ids == "").to_numpy())
    if empty.size:
        line = int(empty[0]) + (2 if header else 1)
        raise DataError(f"{path} line {line}: empty {what}")
    return ids


def _numbers(
    series: pd.Series,
    what: str,
    path: pathlib.Path,
    header: bool,
    dtype: str,
) -> pd.Series:
    values = pd.to_numeric(_strings(series), errors="coerce").astype("float64")
    bad = ~np.isfinite(values.to_numpy())
    if dtype == "int64":
        bad |= np.isfinite(values.to_numpy()) & (values.to_numpy() % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        line = row + (2 if header else 1)
        raise DataError(
            f"{path} line {line}: {what} {series.iloc[row]!r} is not a valid number"
        )
    return values.astype(dtype)


def _zip_prefix(zip_code: str) -> str:
    return zip_code.strip()[:2].upper()


def _clean_title(title: str) -> str:
    return _WS_RE.sub(" ", title).strip()


def _split_title(raw: str) -> tuple[str, str]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``; no year -> ``""``."""
    title = _clean_title(raw)
    match = _TITLE_YEAR_RE.match(title)
    if match:
        return match.group(1).strip(), match.group(2)
    return title, ""


def _join_genres(names: list[str]) -> str:
    order = {name: i for i, name in enumerate(GENRES)}
    ranked = sorted(
        dict.fromkeys(n for n in names if n),
        key=lambda n: order.get(n, len(order)),
    )
    return "|".join(ranked) if ranked else "unknown"


def _sorted_by_id(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    ids = frame[column]
    if ids.str.fullmatch(r"\d+").all():
        key = ids.astype("int64")
        order = np.argsort(key.to_numpy(), kind="stable")
    else:
        order = np.argsort(ids.to_numpy(dtype=str), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


def _ratings_frame(
    raw: pd.DataFrame, columns: list[Hashable], path: pathlib.Path, header: bool
) -> pd.DataFrame:
    user, movie, rating, timestamp = (raw[c] for c in columns)
    return pd.DataFrame(
        {
            "user_id": _ids(user, "user id", path, header),
            "movie_id": _ids(movie, "movie id", path, header),
            "rating": _numbers(rating, "rating", path, header, "float32"),
            "timestamp": _numbers(timestamp, "timestamp", path, header, "int64"),
        }
    ).reset_index(drop=True)


def _users_frame(
    raw: pd.DataFrame,
    columns: list[Hashable | None],
    path: pathlib.Path,
    header: bool,
) -> pd.DataFrame:
    user, age, gender, occupation, zip_code = columns
    n = len(raw)

    def text(column: Hashable | None) -> pd.Series:
        if column is None:
            return pd.Series([""] * n, index=raw.index, dtype=object)
        return _strings(raw[column])

    frame = pd.DataFrame(
        {
            "user_id": _ids(raw[user], "user id", path, header),
            "age": _numbers(raw[age], "age", path, header, "int64"),
            "gender": text(gender),
            "occupation": text(occupation),
            "zip_prefix": pd.Series(
                [_zip_prefix(z) for z in text(zip_code)], index=raw.index, dtype=object
            ),
        }
    )
    return _sorted_by_id(frame, "user_id")


def _movies_frame(
    ids: pd.Series, titles: list[str], genres: list[str], years: list[str]
) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "movie_id": ids,
            "title": pd.Series(titles, index=ids.index, dtype=object),
            "genres": pd.Series(genres, index=ids.index, dtype=object),
            "year": pd.Series(years, index=ids.index, dtype=object),
        }
    )
    return _sorted_by_id(frame, "movie_id")


def _read_genre_names(directory: pathlib.Path) -> list[str]:
    path = directory / "u.genre"
    if not path.is_file():
        return list(GENRES)
    pairs: list[tuple[int, str]] = []
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, index = line.strip().rpartition("|")
        if not sep or not index.strip().isdigit():
            raise DataError(
                f"{path} line {number}: expected 'name|index', got {line!r}"
            )
        pairs.append((int(index), name.strip()))
    pairs.sort()
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise DataError(f"{path}: genre indices are not 0..{len(pairs) - 1}")
    return [name for _, name in pairs]


def _read_grouplens(
    directory: pathlib.Path,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    data_path = directory / "u.data"
    raw = _read_table(data_path, "\t", header=False)
    _expect_columns(raw, 4, data_path)
    ratings = _ratings_frame(raw, list(raw.columns), data_path, header=False)

    user_path = directory / "u.user"
    raw = _read_table(user_path, "|", header=False, encoding="latin-1")
    _expect_columns(raw, 5, user_path)
    users = _users_frame(raw, list(raw.columns), user_path, header=False)

    item_path = directory / "u.item"
    genre_names = _read_genre_names(directory)
    raw = _read_table(item_path, "|", header=False, encoding="latin-1")
    _expect_columns(raw, 5 + len(genre_names), item_path)
    movie_ids = _ids(raw[0], "movie id", item_path, header=False)
    flags = raw.iloc[:, 5:].apply(lambda col: col.str.strip())
    valid = flags.isin(["0", "1"]).to_numpy()
    if not valid.all():
        row = int(np.flatnonzero(~valid.all(axis=1))[0])
        raise DataError(
            f"{item_path} line {row + 1}: genre flags must be 0 or 1, got "
            f"{'|'.join(flags.iloc[row])}"
        )
    on = flags.to_numpy() == "1"
    genres = [_join_genres([genre_names[j] for j in np.flatnonzero(row)]) for row in on]
    split = [_split_title(t) for t in raw[1].tolist()]
    titles = [t for t, _ in split]
    years = [y for _, y in split]
    movies = _movies_frame(movie_ids, titles, genres, years)
    return ratings, users, movies


def _recbole_table(
    path: pathlib.Path, required: tuple[str, ...]
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Reads an atomic file; maps bare field names to the typed header names."""
    raw = _read_table(path, "\t", header=True)
    fields: dict[str, str] = {}
    for column in raw.columns:
        fields.setdefault(str(column).split(":", 1)[0].strip(), column)
    missing = [name for name in required if name not in fields]
    if missing:
        raise DataError(
            f"{path} lacks the field(s) {', '.join(missing)}; its header is "
            f"{'  '.join(map(str, raw.columns))!r}"
        )
    return raw, fields


def _read_recbole(
    directory: pathlib.Path,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    inter_path = directory / "ml-100k.inter"
    required = ("user_id", "item_id", "rating", "timestamp")
    raw, fields = _recbole_table(inter_path, required)
    ratings = _ratings_frame(
        raw, [fields[n] for n in required], inter_path, header=True
    )

    user_path = directory / "ml-100k.user"
    raw, fields = _recbole_table(user_path, ("user_id", "age"))
    names = ("user_id", "age", "gender", "occupation", "zip_code")
    users = _users_frame(raw, [fields.get(n) for n in names], user_path, header=True)

    item_path = directory / "ml-100k.item"
    raw, fields = _recbole_table(item_path, ("item_id", "movie_title"))
    movie_ids = _ids(raw[fields["item_id"]], "movie id", item_path, header=True)
    n = len(raw)
    raw_titles = raw[fields["movie_title"]].tolist()
    raw_years = (
        raw[fields["release_year"]].tolist() if "release_year" in fields else [""] * n
    )
    raw_genres = raw[fields["class"]].tolist() if "class" in fields else [""] * n
    titles: list[str] = []
    years: list[str] = []
    for raw_title, raw_year in zip(raw_titles, raw_years, strict=True):
        title, year = _clean_title(raw_title), raw_year.strip()
        if not _YEAR_RE.match(year):
            # Movie 1412: title "... (1995)", year "V"; movie 267: "unkonwn" twice.
            title, year = _split_title(title)
        if title == "unkonwn":
            title = "unknown"
        titles.append(title)
        years.append(year)
    genres = [_join_genres(g.split()) for g in raw_genres]
    movies = _movies_frame(movie_ids, titles, genres, years)
    return ratings, users, movies


# --------------------------------------------------------------------------- #
# Consistency checks.
# --------------------------------------------------------------------------- #


def _check_unique(
    frame: pd.DataFrame, column: str, source: pathlib.Path | None
) -> None:
    duplicated = frame[column][frame[column].duplicated()]
    if not duplicated.empty:
        raise DataError(
            f"{source or 'MovieLens'}: {len(duplicated)} duplicate {column} value(s), "
            f"e.g. {duplicated.iloc[0]!r}"
        )


def _check_references(
    ratings: pd.DataFrame,
    users: pd.DataFrame,
    movies: pd.DataFrame,
    source: pathlib.Path | None,
) -> None:
    for column, table, name in (
        ("user_id", users, "users"),
        ("movie_id", movies, "movies"),
    ):
        unknown = ~ratings[column].isin(table[column])
        if unknown.any():
            raise DataError(
                f"{source or 'MovieLens'}: {int(unknown.sum())} rating(s) refer to a "
                f"{column} missing from {name}, e.g. "
                f"{ratings.loc[unknown, column].iloc[0]!r}"
            )
