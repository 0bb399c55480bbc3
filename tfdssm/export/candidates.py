"""Candidate embeddings and ids as plain files, for other ANN systems.

``candidates.npy`` holds float32 ``[N, dim]`` candidate embeddings (NumPy's
``.npy`` format: ``np.load``, Faiss, ScaNN's pybind API, a vector database
loader); ``candidate_ids.txt`` holds their ids, UTF-8, one per line, line ``i``
naming row ``i``. Scores are dot products with the query tower's embedding (the
cosine for normalised towers), as in the retrieval SavedModels.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfdssm.errors import ExportError

EMBEDDINGS_FILE = "candidates.npy"
IDS_FILE = "candidate_ids.txt"


def write_candidates(
    directory: str | os.PathLike, embeddings: np.ndarray, ids: Sequence[str]
) -> dict[str, Any]:
    """Writes ``candidates.npy`` (float32 ``[N, dim]``) and ``candidate_ids.txt``.

    ``candidate_ids.txt`` is UTF-8 with one id per line, row ``i`` of the matrix
    being line ``i``; backslashes, line feeds and carriage returns inside an id
    are written as ``\\\\``, ``\\n`` and ``\\r`` (read back with
    :func:`read_candidates`). Both files are replaced atomically.

    Returns:
        The ``candidate_embeddings`` entry of ``export.json``.
    """
    directory = pathlib.Path(directory)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    tmp = directory / f".{EMBEDDINGS_FILE}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        np.save(handle, embeddings)
    os.replace(tmp, directory / EMBEDDINGS_FILE)
    tmp = directory / f".{IDS_FILE}.tmp-{os.getpid()}"
    tmp.write_text("".join(_escape(str(i)) + "\n" for i in ids), encoding="utf-8")
    os.replace(tmp, directory / IDS_FILE)
    return {"embeddings": EMBEDDINGS_FILE, "ids": IDS_FILE, "count": len(ids),
            "dim": int(embeddings.shape[1]), "dtype": "float32",
            "similarity": "dot_product",
            "ids_format": "utf-8, one per line; \\\\ \\n \\r escaped"}


def read_candidates(directory: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Reads what :func:`write_candidates` wrote: ``(embeddings, ids)``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = write_candidates(d, np.eye(2), ["a\\nb", "c\\\\d"])
    >>> read_candidates(d)[1]
    ['a\\nb', 'c\\\\d']
    """
    directory = pathlib.Path(directory)
    paths = [directory / EMBEDDINGS_FILE, directory / IDS_FILE]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ExportError(f"{missing} not found; re-run the export (`tfdssm train`).")
    embeddings = np.load(paths[0])
    ids = [_unescape(line) for line in
           paths[1].read_text(encoding="utf-8").split("\n")[:-1]]
    return embeddings, ids


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append({"n": "\n", "r": "\r"}.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


__all__ = ["EMBEDDINGS_FILE", "IDS_FILE", "read_candidates", "write_candidates"]
