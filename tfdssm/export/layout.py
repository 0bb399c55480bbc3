"""The export directory's layout: file names, versions and ``export.json``.

No TensorFlow, pandas or TFRS here: a model server imports this module to find
versions, and a notebook to read what was exported.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "towers" / "1").mkdir(parents=True)
>>> versions(root / "towers"), next_version(root / "towers")
([1], 2)
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from tfdssm.errors import ExportError
from tfdssm.export.versioning import version_dirs

EXPORT_JSON = "export.json"


CORPUS_FILE = "corpus.parquet"


# 2: candidates may carry restrict tokens (``candidate_tokens.jsonl``, the
#    ``restricts`` entry of export.json) and both retrieval models answer
#    ``top_k_filter``. Format-1 exports still load and serve; they have no
#    tokens and no ``top_k_filter``.
FORMAT_VERSION = 2


def versions(base: str | os.PathLike) -> list[int]:
    """Version numbers under ``base``, ascending, by TF Serving's rule
    (:func:`tfdssm.export.versioning.parse_version`: ``007`` is 7; ``²`` or a
    number above int64 is no version)."""
    return sorted(version_dirs(base))


def next_version(base: str | os.PathLike) -> int:
    """One more than the newest version under ``base`` (1 for none)."""
    found = versions(base)
    return found[-1] + 1 if found else 1


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls ``write`` on a temporary file beside ``path``, syncs it and renames
    it to ``path`` (never half-written; the temporary is removed if writing
    fails, e.g. on a full disk)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Writes JSON through :func:`write_atomic`."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def check_export_dir(path: str | os.PathLike) -> None:
    """Checks, before anything is trained or written, that ``path`` can be an
    export directory: a directory (or a path that can become one) this process
    may write to.

    Raises:
        ExportError: ``path`` is a file, lies under a file, or is not writable.
    """
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ExportError(f"--export-dir {str(path)!r} exists and is not a directory; "
                          "pass a new directory or an earlier export.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"--export-dir {str(path)!r} cannot be created: "
                          f"{str(existing)!r} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"--export-dir {str(path)!r} is not writable "
                          f"({str(existing)!r} is read-only for this user); pass a "
                          "writable directory or fix its permissions.")


def read_export(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads ``export.json``, with a clear error when ``export_dir`` is not an export.

    Raises:
        ExportError: no such directory, or no/invalid ``export.json``.
    """
    path = pathlib.Path(export_dir) / EXPORT_JSON
    if not path.is_file():
        raise ExportError(
            f"{str(export_dir)!r} is not a tfdssm export: {EXPORT_JSON} not found. "
            "Pass the --export-dir used with `tfdssm train`."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"{str(path)!r} is not valid JSON: {error}") from None

