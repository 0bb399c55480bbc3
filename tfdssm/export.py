"""Writes the export directory (see DESIGN.md, "Export contract").

``towers/<version>/`` is a SavedModel with signatures ``query`` and ``candidate``
(``serving_default`` = ``query``): inputs named after the feature columns,
``[None]`` tensors, output ``embedding`` float32 ``[batch, dim]``. It uses core
TensorFlow ops only, so stock TF Serving and a process that imports only
``tensorflow`` can load it.

Versions are integer directories. A version is written under a hidden temporary
name and renamed into place, so a server never sees a half-written one, and an
existing version is never overwritten.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import pandas as pd
import tensorflow as tf

from tfdssm import hashing, unicode_table
from tfdssm.errors import ExportError
from tfdssm.model import DSSM

EXPORT_JSON = "export.json"
CORPUS_FILE = "corpus.parquet"
FORMAT_VERSION = 1


def versions(base: str | os.PathLike) -> list[int]:
    """Integer version directories under ``base``, ascending."""
    path = pathlib.Path(base)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(base: str | os.PathLike) -> int:
    """One more than the newest version under ``base`` (1 for none)."""
    found = versions(base)
    return found[-1] + 1 if found else 1


def signature_spec(tower: tf.keras.layers.Layer) -> dict[str, tf.TensorSpec]:
    """``{column: TensorSpec([None], dtype, name=column)}`` of a tower's inputs."""
    features = getattr(tower, "features", None)
    if features is None:  # SharedTower: the wrapped tower's specs, renamed.
        inner = signature_spec(tower.tower)
        return {
            tower.rename.get(n, n): tf.TensorSpec([None], s.dtype, name=tower.rename.get(n, n))
            for n, s in inner.items()
        }
    return {f.name: tf.TensorSpec([None], f.dtype, name=f.name) for f in features}


class _Towers(tf.Module):
    def __init__(self, model: DSSM) -> None:
        super().__init__(name="towers")
        self.query_tower = model.query_tower
        self.candidate_tower = model.candidate_tower


def _atomic_save(base: pathlib.Path, save) -> pathlib.Path:
    """Calls ``save(tmp_dir)`` and renames the result to the next version."""
    base.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        save(tmp)
        while True:
            target = base / str(next_version(base))
            try:
                os.rename(tmp, target)  # fails if target exists: never overwrite.
                return target
            except OSError:
                if not target.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_towers(model: DSSM, export_dir: str | os.PathLike) -> pathlib.Path:
    """Exports the two towers as ``export_dir/towers/<next version>``.

    Args:
        model: A trained :class:`tfdssm.model.DSSM`.
        export_dir: The export directory.

    Returns:
        The new version directory.
    """
    module = _Towers(model)

    @tf.function(input_signature=[signature_spec(model.query_tower)])
    def query(features):
        return {"embedding": module.query_tower(features)}

    @tf.function(input_signature=[signature_spec(model.candidate_tower)])
    def candidate(features):
        return {"embedding": module.candidate_tower(features)}

    signatures = {"query": query, "candidate": candidate, "serving_default": query}
    return _atomic_save(
        pathlib.Path(export_dir) / "towers",
        lambda tmp: tf.saved_model.save(module, str(tmp), signatures=signatures),
    )


def hashing_info() -> dict[str, Any]:
    """The hashing parameters exported models depend on."""
    return {
        "version": hashing.HASHING_VERSION,
        "boundary": hashing.BOUNDARY,
        "multiplier": hashing.MULTIPLIER,
        "modulus": hashing.MODULUS,
        "normalization": "NFKC + casefold",
        "unicode_table": unicode_table.TABLE_FILE,
        "unicode_version": unicode_table.UNICODE_VERSION,
        "pad": 0,
    }


def _tower_info(tower: tf.keras.layers.Layer) -> dict[str, Any]:
    inner = getattr(tower, "tower", tower)
    config = inner.get_config()
    features = config["features"]
    rename = getattr(tower, "rename", {})
    for feature in features:
        feature["name"] = rename.get(feature["name"], feature["name"])
        if len(feature.get("vocabulary", ())) > 50:
            feature["vocabulary_size"] = len(feature.pop("vocabulary"))
    keep = ("hidden", "output_dim", "activation", "output_activation", "normalize",
            "senet", "input_activation")
    info = {k: config[k] for k in keep}
    info["features"] = features
    info["shared_with_query"] = tower is not inner
    return info


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Writes JSON via a temporary file and rename (never half-written)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def export_model(
    model: DSSM,
    export_dir: str | os.PathLike,
    corpus: pd.DataFrame | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Exports towers, the candidate corpus and ``export.json``.

    Args:
        model: The trained model.
        export_dir: Target directory (created if needed).
        corpus: One row per candidate with the candidate tower's columns (and the
            candidate id); written as ``corpus.parquet`` for evaluation/indexing.
        metrics: Evaluation results to record.
        training: Training parameters to record (pipeline, epochs, ...).

    Returns:
        The ``export.json`` content.
    """
    export_dir = pathlib.Path(export_dir)
    if export_dir.exists() and not export_dir.is_dir():
        raise ExportError(f"export dir {str(export_dir)!r} exists and is not a directory.")
    export_dir.mkdir(parents=True, exist_ok=True)
    tower_dir = save_towers(model, export_dir)
    if corpus is not None:
        tmp = export_dir / f".{CORPUS_FILE}.tmp-{os.getpid()}"
        corpus.to_parquet(tmp, index=False)
        os.replace(tmp, export_dir / CORPUS_FILE)
    info = {
        "format_version": FORMAT_VERSION,
        "tfdssm_version": _package_version(),
        "tensorflow_version": tf.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "towers": {"version": int(tower_dir.name), "path": f"towers/{tower_dir.name}"},
        "candidate_id": model.candidate_id,
        "query": _tower_info(model.query_tower),
        "candidate": _tower_info(model.candidate_tower),
        "hashing": hashing_info(),
        "loss": model.loss_name,
        "temperature": model.temperature,
        "corpus": CORPUS_FILE if corpus is not None else None,
        "num_candidates": None if corpus is None else len(corpus),
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
    }
    write_json_atomic(export_dir / EXPORT_JSON, info)
    return info


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


def load_towers(export_dir: str | os.PathLike, version: int | None = None) -> Any:
    """Loads ``towers/<version>`` (newest by default) with ``tf.saved_model.load``."""
    base = pathlib.Path(export_dir) / "towers"
    found = versions(base)
    if not found:
        raise ExportError(f"no towers/<version> SavedModel under {str(export_dir)!r}.")
    chosen = found[-1] if version is None else version
    if chosen not in found:
        raise ExportError(f"towers version {chosen} not found; have {found}.")
    return tf.saved_model.load(str(base / str(chosen)))


def _package_version() -> str:
    from tfdssm import __version__  # noqa: PLC0415

    return __version__
