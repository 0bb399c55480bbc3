"""Reading an export back: its towers, feature specs and candidate corpus."""

from __future__ import annotations

import inspect
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.errors import ExportError
from tfdssm.export import serving_config
from tfdssm.export.layout import CORPUS_FILE, EXPORT_JSON, read_export, versions
from tfdssm.features import Feature, feature_from_config
from tfdssm.features.registry import feature_kind


def ids_as_text(ids: Any) -> np.ndarray:
    """String ids a retrieval signature returned (UTF-8 bytes, ``[batch, k]``,
    a tensor or an array) as a ``str`` array of the same shape.

    >>> ids_as_text(np.array([[b"caf\\xc3\\xa9", b"x"]], dtype=object)).tolist()
    [['café', 'x']]
    """
    ids = np.asarray(ids.numpy() if hasattr(ids, "numpy") else ids)
    if not ids.size:
        return ids.astype(str)
    decode = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes)
                          else str(v), otypes=[object])
    return decode(ids).astype(str)


def read_committed(export_dir: str | os.PathLike) -> dict[str, Any]:
    """``export.json`` of the export ``models.config`` commits, checked.

    An export killed before its commit can leave newer versions (and, killed
    late, a newer ``export.json`` and candidate files) next to the committed
    export that servers keep serving; readers of an export (evaluation,
    :class:`~tfdssm.retrieve.LocalRetriever`) read what is served, or refuse.

    Raises:
        ExportError: not an export, or ``export.json`` and the candidate files
            are not those of the committed export (re-run the export).
    """
    info = read_export(export_dir)
    if (pathlib.Path(export_dir) / serving_config.CONFIG_FILE).is_file():
        serving_config.check_committed(export_dir, info)
    return info


def load_towers(export_dir: str | os.PathLike, version: int | None = None,
                info: Mapping[str, Any] | None = None) -> Any:
    """Loads ``towers/<version>`` with ``tf.saved_model.load``.

    Args:
        export_dir: The export directory.
        version: The version to load; by default the one ``export.json``
            records (never a newer orphan of a killed export), or the newest
            in a directory without one.
        info: ``export.json``, when the caller has read it already (see
            :func:`read_committed`).
    """
    base = pathlib.Path(export_dir) / "towers"
    found = versions(base)
    if not found:
        raise ExportError(f"no towers/<version> SavedModel under {str(export_dir)!r}.")
    if version is None:
        if info is None and (pathlib.Path(export_dir) / EXPORT_JSON).is_file():
            info = read_export(export_dir)
        version = ((info or {}).get("towers") or {}).get("version")
    chosen = found[-1] if version is None else version
    if chosen not in found:
        raise ExportError(f"towers version {chosen} not found; have {found}.")
    path = base / str(chosen)
    try:
        return tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as error:
        reason = str(error).strip().splitlines()[0][:300]
        raise ExportError(
            f"{str(path)!r} is not a loadable SavedModel ({type(error).__name__}: "
            f"{reason}). Re-run `tfdssm train` to export a new version."
        ) from None


def tower_features(info: Mapping[str, Any], side: str) -> list[Feature]:
    """Feature specs of one side (``query``/``candidate``) from ``export.json``.

    Vocabularies are not needed to feed a SavedModel, only names and dtypes.
    Training-only features (served as a constant: the example age) are left out.
    """
    out = []
    for config in info[side]["features"]:
        config = {k: v for k, v in config.items() if k != "vocabulary_size"}
        if "vocabulary" in inspect.signature(feature_kind(config["kind"])).parameters:
            config.setdefault("vocabulary", ())  # export.json keeps only its size
        feature = feature_from_config(config)
        if feature.served_columns:
            out.append(feature)
    return out


def read_corpus(export_dir: str | os.PathLike) -> pd.DataFrame:
    """The exported candidate corpus (``corpus.parquet``).

    Raises:
        ExportError: the export has no corpus.
    """
    path = pathlib.Path(export_dir) / CORPUS_FILE
    if not path.is_file():
        raise ExportError(f"{str(path)!r} is missing; re-run the export.")
    return pd.read_parquet(path)
