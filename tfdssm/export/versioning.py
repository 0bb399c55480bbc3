"""What a version directory is, as TF Serving decides it (TensorFlow-free).

TF Serving's ``FileSystemStoragePathSource`` lists a model's base path and
keeps the children whose name ``strings::safe_strto64`` parses: ASCII decimal
digits, within int64. So ``7`` and ``007`` are both version 7 (the directory
keeps its own name: ``007`` is read from ``base/007``), while ``²`` (a digit to
``str.isdigit`` but not to ``int``), ``7a``, ``99999999999999999999`` (above
int64) and any other name are not versions and are skipped, without affecting
the other children. When two names give the same number, TF Serving loads the
one listed last in name order (``7`` over ``007``) and warns; so does this.

Deliberately stricter than ``safe_strto64``: it also accepts surrounding ASCII
spaces and a leading ``-``; version directories here are non-negative decimal
numbers without spaces, as TF Serving's documentation describes them.
"""

from __future__ import annotations

import logging
import os
import pathlib

LOG = logging.getLogger("tfdssm.serving")
INT64_MAX = 2**63 - 1
_MAX_DIGITS = len(str(INT64_MAX))
_MAX_FINGERPRINT_ENTRIES = 10_000


def parse_version(name: str) -> int | None:
    """The version number a directory name stands for, or ``None``.

    >>> [parse_version(n) for n in ["7", "007", "0", "000", "²", "-1", " 7", "7a", ""]]
    [7, 7, 0, 0, None, None, None, None, None]
    >>> parse_version("9223372036854775807"), parse_version("9223372036854775808")
    (9223372036854775807, None)

    Args:
        name: A directory name (or a REST path segment).

    Returns:
        A non-negative int64, or ``None`` when ``name`` is not one written in
        ASCII decimal digits.
    """
    if not (name.isascii() and name.isdigit()):  # "" too
        return None
    significant = name.lstrip("0") or "0"
    if len(significant) > _MAX_DIGITS:  # before int(): it refuses > 4300 digits
        return None
    number = int(significant)
    return number if number <= INT64_MAX else None


def version_dirs(
    base: str | os.PathLike, ignored: list[str] | None = None
) -> dict[int, pathlib.Path]:
    """``{version: directory}`` of the version directories under ``base``.

    Never raises for what the directory holds: an unreadable base gives ``{}``,
    unreadable children and names that are not versions are skipped.

    Args:
        base: A model's base path.
        ignored: If given, receives the names that look numeric to
            ``str.isdigit`` but are not versions (``²``, > int64), to report.
    """
    base = pathlib.Path(base)
    try:
        children = sorted(os.scandir(base), key=lambda entry: entry.name)
    except OSError:
        return {}
    found: dict[int, pathlib.Path] = {}
    for entry in children:
        number = parse_version(entry.name)
        if number is None:
            if ignored is not None and entry.name.isdigit():
                ignored.append(entry.name)
            continue
        try:
            if not entry.is_dir():
                continue
        except OSError:
            continue
        if number in found:
            LOG.warning("tfdssm serve: duplicate version directories: version %d "
                        "will be loaded from %s, %s is ignored", number, entry.path,
                        found[number])
        found[number] = pathlib.Path(entry.path)
    return found


def fingerprint(path: str | os.PathLike) -> tuple:
    """What a version directory holds: every file's relative path, size and
    modification time (stat calls only; at most 10,000 entries).

    A version that failed to load is retried when this changes, e.g. while a
    slow ``cp -r`` fills a directory that appeared empty.
    """
    entries: list[tuple[str, int, int]] = []
    root = pathlib.Path(path)
    try:
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            for name in sorted(files) + subdirs:
                full = os.path.join(directory, name)
                try:
                    stat = os.stat(full)
                except OSError:
                    continue
                entries.append((os.path.relpath(full, root), stat.st_size,
                                stat.st_mtime_ns))
                if len(entries) >= _MAX_FINGERPRINT_ENTRIES:
                    return tuple(entries)
    except OSError:
        pass
    return tuple(entries)
