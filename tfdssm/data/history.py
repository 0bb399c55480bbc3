"""History columns for interaction tables (a user's earlier items, per row).

**No leakage.** A row's history is the same user's rows of a *source* table
(the training rows) that happened strictly before it: ``time < row time``.
Rows with the *same* timestamp are left out (their order is unknown; MovieLens
has many same-second ratings). The history keeps the most recent
``max_length`` items, oldest first, as the serving contract of
:mod:`tfdssm.features.history` expects (``"12|50|7"`` and ``"881250949|..."``). Training
rows get histories from the training rows; held-out rows get histories from
the training rows too (in leave-last-out: all of the user's training rows
before the test rating), never from other held-out rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tfdssm.errors import ConfigError, DataError

HISTORY = "history"
HISTORY_TIMESTAMPS = "history_timestamps"
EXAMPLE_AGE = "example_age"
QUERY_TIME = "query_time"


def build_histories(
    rows: pd.DataFrame,
    source: pd.DataFrame,
    user: str = "user_id",
    item: str = "movie_id",
    time: str = "timestamp",
    max_length: int = 50,
    separator: str = "|",
) -> pd.DataFrame:
    """Each row's history: ``source`` rows of its user strictly earlier in time.

    Args:
        rows: The rows to give a history (``user`` and ``time`` columns).
        source: Where histories come from (``user``, ``item``, ``time``).
        user, item, time: Column names.
        max_length: Most recent items kept.
        separator: Joins ids and timestamps.

    Returns:
        ``DataFrame`` aligned with ``rows`` (same index): ``history`` (ids) and
        ``history_timestamps`` (Unix seconds), strings, most recent last.

    >>> source = pd.DataFrame({"user_id": ["u"] * 3, "movie_id": ["a", "b", "c"],
    ...                        "timestamp": [1, 2, 2]})
    >>> build_histories(source, source)["history"].tolist()
    ['', 'a', 'a']
    """
    for frame, what, needed in ((rows, "rows", (user, time)),
                                (source, "source", (user, item, time))):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise DataError(f"the {what} table lacks column(s) {missing} needed to "
                            f"build histories; it has {list(frame.columns)}.")
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, received {max_length}.")
    ordered = source.assign(_order=np.arange(len(source))).sort_values(
        [user, time, "_order"], kind="stable")
    by_user: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, group in ordered.groupby(user, sort=False):
        by_user[str(key)] = (group[time].to_numpy(np.int64),
                             group[item].astype(str).to_numpy())
    empty = (np.zeros([0], np.int64), np.zeros([0], object))
    ids, stamps = [], []
    for key, moment in zip(rows[user].astype(str), rows[time].to_numpy(np.int64),
                           strict=True):
        times, items = by_user.get(key, empty)
        end = int(np.searchsorted(times, moment, side="left"))  # strictly before
        start = max(0, end - max_length)
        ids.append(separator.join(items[start:end]))
        stamps.append(separator.join(str(t) for t in times[start:end]))
    return pd.DataFrame({HISTORY: ids, HISTORY_TIMESTAMPS: stamps}, index=rows.index)


def add_history_columns(
    train: pd.DataFrame, test: pd.DataFrame, **kwargs: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Adds ``history`` / ``history_timestamps`` to both splits, both built from
    the training rows only (:func:`build_histories` arguments as ``kwargs``)."""
    train = pd.concat([train, build_histories(train, train, **kwargs)], axis=1)
    test = pd.concat([test, build_histories(test, train, **kwargs)], axis=1)
    return train, test


