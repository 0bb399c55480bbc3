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
from tfdssm.export.layout import CORPUS_FILE, versions
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


def load_towers(export_dir: str | os.PathLike, version: int | None = None) -> Any:
    """Loads ``towers/<version>`` (newest by default) with ``tf.saved_model.load``."""
    base = pathlib.Path(export_dir) / "towers"
    found = versions(base)
    if not found:
        raise ExportError(f"no towers/<version> SavedModel under {str(export_dir)!r}.")
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
