"""Writes the export directory (see DESIGN.md, "Export contract").

``towers/<version>/`` is a SavedModel with signatures ``query`` and ``candidate``
(``serving_default`` = ``query``): inputs named after the feature columns,
``[None]`` tensors, output ``embedding`` float32 ``[batch, dim]``. It uses core
TensorFlow ops only, so stock TF Serving and a process that imports only
``tensorflow`` can load it.

With a candidate corpus, the export also holds (see :mod:`tfdssm.export.index`):

* ``retrieval/<version>/``: query features -> ``ids``, ``scores`` through a ScaNN
  index over the corpus (signatures ``serving_default``, ``top_k``,
  ``top_k_exclude``, ``top_k_filter``; needs ScaNN's ops: ``tfdssm serve`` or a
  ScaNN-enabled TF Serving build);
* ``retrieval_brute_force/<version>/``: the same signatures, stock ops only;
* ``candidates.npy`` (float32 ``[N, dim]``) + ``candidate_ids.txt`` (one id per
  line) for other ANN systems (:mod:`tfdssm.export.candidates`);
* with restrict columns, ``candidate_tokens.jsonl`` (line ``i``: the
  ``{namespace: [tokens]}`` of candidate ``i``; :mod:`tfdssm.export.tokens`),
  also held in both retrieval models for ``top_k_filter``;
* ``models.config`` (all models) and ``models.stock.config`` (no ScaNN) for TF
  Serving (:mod:`tfdssm.export.serving_config`).

Every SavedModel carries TF Serving warm-up requests in
``assets.extra/tf_serving_warmup_requests`` (:mod:`tfdssm.export.warmup`).

Versions are integer directories. A version is written under a hidden temporary
name and renamed into place, so a server never sees a half-written one, and an
existing version is never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import tensorflow as tf

from tfdssm.data import readers as data
from tfdssm.errors import DataWarning, ExportError
from tfdssm.export import (
    candidates,
    hybrid_build,
    index,
    restricts,
    serving_config,
    tokens,
    warmup,
)
from tfdssm.export.layout import (
    CORPUS_FILE,
    EXPORT_JSON,
    FORMAT_VERSION,
    next_version,
    write_json_atomic,
)
from tfdssm.export.tflite import add_tflite
from tfdssm.features import NumericFeature, TextFeature
from tfdssm.model.dssm import DSSM
from tfdssm.model.runner import embed
from tfdssm.text.hashing import hashing_info


def signature_spec(tower: tf.keras.layers.Layer) -> dict[str, tf.TensorSpec]:
    """``{column: TensorSpec([None], dtype, name=column)}`` of a tower's inputs."""
    features = tower.features
    served = tower.feature_names  # no training-only columns (example age)
    return {f.name: tf.TensorSpec([None], f.dtype, name=f.name) for f in features
            if f.name in served}


class _Towers(tf.Module):
    def __init__(self, model: DSSM) -> None:
        super().__init__(name="towers")
        self.query_tower = model.query_tower
        self.candidate_tower = model.candidate_tower


_TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"^\.tmp-(\d+)-(.*)\.[A-Za-z0-9_]{8}$")


def _atomic_save(base: pathlib.Path, save) -> pathlib.Path:
    """Calls ``save(tmp_dir)`` and renames the result to the next version.

    The temporary directory is hidden (``.tmp-<pid>-<host>.<random>``: servers
    and :func:`versions` ignore it) and synced to disk before the rename, so a
    process killed at any moment, or a machine crash, leaves either no new
    version or a complete one. Temporaries of dead exporting processes on this
    host are removed first.
    """
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(base)
    prefix = f"{_TMP_PREFIX}{os.getpid()}-{socket.gethostname()}."
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        save(tmp)
        _sync_tree(tmp)
        while True:
            target = base / str(next_version(base))
            try:
                os.rename(tmp, target)  # fails if target exists: never overwrite.
                _sync_dir(base)
                return target
            except OSError:
                if not target.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(base: pathlib.Path) -> list[pathlib.Path]:
    """Deletes ``.tmp-<pid>-<host>.*`` directories left by killed exports
    (same host, process gone); returns them."""
    removed = []
    host = socket.gethostname()
    for path in base.iterdir():
        found = _TMP_NAME.match(path.name)
        if not found or found[2] != host or not path.is_dir():
            continue
        try:
            os.kill(int(found[1]), 0)
            continue  # still running (or not ours to signal)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _sync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync directories
        pass
    finally:
        os.close(fd)


def _sync_tree(root: pathlib.Path) -> None:
    """fsyncs every file and directory under ``root`` (durable before rename)."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _sync_dir(pathlib.Path(directory))


def save_towers(
    model: DSSM,
    export_dir: str | os.PathLike,
    candidate_row: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Exports the two towers as ``export_dir/towers/<next version>``.

    Args:
        model: A trained :class:`tfdssm.model.DSSM`.
        export_dir: The export directory.
        candidate_row: A real candidate for the warm-up requests (default:
            example values).

    Returns:
        The new version directory.
    """
    module = _Towers(model)

    @tf.function(input_signature=[signature_spec(model.query_tower)], autograph=False)
    def query(features):
        return {"embedding": module.query_tower(features)}

    @tf.function(
        input_signature=[signature_spec(model.candidate_tower)], autograph=False
    )
    def candidate(features):
        return {"embedding": module.candidate_tower(features)}

    signatures = {"query": query, "candidate": candidate, "serving_default": query}
    requests = warmup.towers_requests(model, candidate_row)

    def save(tmp: pathlib.Path) -> None:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        warmup.write_warmup(tmp, requests)

    return _atomic_save(pathlib.Path(export_dir) / "towers", save)


def save_retrieval(
    module: index.RetrievalModule,
    export_dir: str | os.PathLike,
    name: str,
    query_row: Mapping[str, Any],
) -> pathlib.Path:
    """Saves a retrieval module as ``export_dir/<name>/<next version>``.

    Args:
        module: A :class:`tfdssm.export.index.BruteForceRetrieval` or
            :class:`tfdssm.export.index.ScannRetrieval`.
        export_dir: The export directory.
        name: ``retrieval`` or ``retrieval_brute_force`` (the served model name).
        query_row: Example query features for the warm-up requests.

    Returns:
        The new version directory.
    """
    first_id = module.ids[0].numpy().decode("utf-8")
    requests = warmup.retrieval_requests(query_row, first_id, module.max_k, name)

    def save(tmp: pathlib.Path) -> None:
        module.save(tmp)
        warmup.write_warmup(tmp, requests)

    return _atomic_save(pathlib.Path(export_dir) / name, save)


def export_retrieval(
    model: DSSM,
    export_dir: str | os.PathLike,
    corpus: pd.DataFrame,
    candidate_id: str,
    max_k: int = index.DEFAULT_MAX_K,
    scann_options: Mapping[str, Any] | None = None,
    hybrid: bool = False,
    validation: pd.DataFrame | None = None,
    restrict_columns: Sequence[str] = (),
) -> dict[str, Any]:
    """Embeds the corpus and writes both retrieval models and the candidate files.

    Args:
        model: The trained model.
        export_dir: The export directory.
        corpus: One row per candidate: the candidate tower's columns and
            ``candidate_id``.
        candidate_id: Column holding the ids the retrieval models return.
        max_k: Largest ``k`` a request may ask for (capped at the corpus size).
        scann_options: ScaNN parameters (default
            :func:`tfdssm.export.index.scann_options`).
        hybrid: Fuse BM25 over the candidates' text into both retrieval models
            (:mod:`tfdssm.export.hybrid`); needs one text query feature and text
            candidate features.
        validation: Rows (query features + ``candidate_id``) to choose the
            hybrid's fusion weight on; without them the weight is
            :data:`tfdssm.export.hybrid_build.DEFAULT_WEIGHT`.
        restrict_columns: Corpus columns whose values become the candidates'
            restrict tokens (namespaces) for the ``top_k_filter`` signature;
            lists and ``"|"``-separated strings give several tokens
            (:mod:`tfdssm.export.tokens`).

    Returns:
        ``export.json`` entries: ``retrieval``, ``retrieval_brute_force``,
        ``candidate_embeddings``, ``restricts`` (with restrict columns; none
        when no candidate has an id).
    """
    tower = model.candidate_tower
    corpus = unique_candidates(corpus, candidate_id, tower)
    named = corpus[candidate_id].fillna("").astype(str) != ""
    if not named.all():
        warnings.warn(f"{int((~named).sum())} candidate(s) with an empty "
                      f"{candidate_id!r} are left out of the retrieval models.",
                      DataWarning, stacklevel=3)
        corpus = corpus[named]
    if not len(corpus):
        return {}
    arrays = data.to_feature_arrays(corpus, _input_features(tower), "the corpus")
    ids = corpus[candidate_id].astype(str).tolist()
    embeddings = embed(tower, arrays)
    spec = signature_spec(model.query_tower)
    query_row = warmup.example_row(model.query_tower)
    out: dict[str, Any] = {}
    fusion = None
    if hybrid:
        fusion = hybrid_build.build_hybrid(
            corpus, _tower_info(model.query_tower), _tower_info(model.candidate_tower))
    labels = tokens.candidate_tokens(corpus, restrict_columns)
    restrict = restricts.Restricts.from_tokens(labels, restrict_columns)
    for name, cls, kwargs in (
        ("retrieval_brute_force", index.BruteForceRetrieval, {}),
        ("retrieval", index.ScannRetrieval, {"options": scann_options}),
    ):
        module = cls(model.query_tower, spec, embeddings, ids, max_k, hybrid=fusion,
                     restricts=restrict, **kwargs)
        if fusion is not None and cls is index.BruteForceRetrieval:
            out["hybrid"] = hybrid_build.tune_weight(
                module, validation, candidate_id, _input_features(model.query_tower))
        _hook(name)
        version_dir = save_retrieval(module, export_dir, name, query_row)
        out[name] = {"version": int(version_dir.name),
                     "path": f"{name}/{version_dir.name}", **module.describe()}
    _hook("candidates")
    out["candidate_embeddings"] = candidates.write_candidates(export_dir, embeddings,
                                                              ids)
    if restrict_columns:
        out["restricts"] = tokens.write_tokens(export_dir, labels, restrict_columns)
    return out


def unique_candidates(
    corpus: pd.DataFrame, candidate_id: str, tower: tf.keras.layers.Layer,
    restrict_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """The corpus with one row per candidate id (checked before exporting).

    Rows repeating a candidate (same id, same tower features) are dropped with a
    warning; an id with different features is an error, since the retrieval
    models would return one id for two different vectors.

    Raises:
        ExportError: no ``candidate_id`` column.
        DataError: an id appears with different features, or a feature column
            is missing.
    """
    if candidate_id not in corpus.columns:
        raise ExportError(f"the corpus has no candidate id column {candidate_id!r}; "
                          f"its columns are {list(corpus.columns)}.")
    columns = [candidate_id, *signature_spec(tower), *restrict_columns]
    data.distinct_candidates(corpus, candidate_id, columns, "the corpus")
    key = corpus[list(dict.fromkeys(columns))].astype(str)
    repeated = key.duplicated() & (key[candidate_id] != "")
    if repeated.any():
        warnings.warn(f"the corpus repeats {int(repeated.sum())} candidate(s) "
                      f"(same {candidate_id!r} and features); keeping one row each.",
                      DataWarning, stacklevel=2)
        corpus = corpus[~repeated.to_numpy()].reset_index(drop=True)
    return corpus


def _input_features(tower: tf.keras.layers.Layer) -> list[Any]:
    """Name/dtype stand-ins of a tower's inputs (for :func:`data.to_feature_arrays`)."""
    return [NumericFeature(n) if s.dtype == tf.float32 else TextFeature(n)
            for n, s in signature_spec(tower).items()]


def _first_row(corpus: pd.DataFrame, tower: tf.keras.layers.Layer) -> dict[str, Any]:
    arrays = data.to_feature_arrays(corpus.head(1), _input_features(tower),
                                    "the corpus")
    return {name: values[0] for name, values in arrays.items()}


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


def export_model(
    model: DSSM,
    export_dir: str | os.PathLike,
    corpus: pd.DataFrame | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    max_k: int = index.DEFAULT_MAX_K,
    scann_options: Mapping[str, Any] | None = None,
    candidate_id: str | None = None,
    hybrid: bool = False,
    validation: pd.DataFrame | None = None,
    tflite: bool = True,
    restrict_columns: Sequence[str] = (),
) -> dict[str, Any]:
    """Exports towers, retrieval models, the candidate corpus, the TFLite query
    tower and ``export.json``.

    Args:
        model: The trained model.
        export_dir: Target directory (created if needed).
        corpus: One row per candidate with the candidate tower's columns (and the
            candidate id); written as ``corpus.parquet`` for evaluation/indexing,
            embedded for the retrieval models and ``candidates.npy``.
        metrics: Evaluation results to record.
        training: Training parameters to record (pipeline, epochs, ...).
        max_k: Largest ``k`` the retrieval models accept (capped at the corpus).
        scann_options: ScaNN index parameters (default: chosen for the corpus
            size by :func:`tfdssm.export.index.scann_options`).
        candidate_id: Corpus column with the ids retrieval returns (default: the
            model's ``candidate_id``, else the candidate tower's first column).
        hybrid: Fuse BM25 into both retrieval models (see :func:`export_retrieval`).
        validation: Rows to choose the hybrid's fusion weight on.
        tflite: Also write ``query_tower.tflite`` (and the Keras towers to
            rebuild it) and its ``tflite`` entry in ``export.json``; see
            :func:`tfdssm.export.tflite.add_tflite`.
        restrict_columns: Corpus columns that become restrict namespaces for
            filtered retrieval (``top_k_filter``; see :func:`export_retrieval`).

    Returns:
        The ``export.json`` content.
    """
    export_dir = pathlib.Path(export_dir)
    if export_dir.exists() and not export_dir.is_dir():
        raise ExportError(
            f"export dir {str(export_dir)!r} exists and is not a directory.")
    id_column = (candidate_id or model.candidate_id
                 or model.candidate_tower.feature_names[0])
    candidate_row = None
    restrict_columns = list(restrict_columns or ())
    if restrict_columns and corpus is None:
        raise ExportError(f"restrict columns {restrict_columns} need a candidate "
                          "corpus to take the tokens from; pass corpus=.")
    if corpus is not None:  # checked before anything is written
        tokens.check_columns(restrict_columns, corpus.columns)
        corpus = unique_candidates(corpus, id_column, model.candidate_tower,
                                   restrict_columns)
    export_dir.mkdir(parents=True, exist_ok=True)
    if corpus is not None and len(corpus):
        candidate_row = _first_row(corpus, model.candidate_tower)
    _hook("towers")
    tower_dir = save_towers(model, export_dir, candidate_row)
    served = {"towers": {"version": int(tower_dir.name),
                         "path": f"towers/{tower_dir.name}"}}
    if corpus is not None:
        tmp = export_dir / f".{CORPUS_FILE}.tmp-{os.getpid()}"
        corpus.to_parquet(tmp, index=False)
        os.replace(tmp, export_dir / CORPUS_FILE)
        served.update(export_retrieval(model, export_dir, corpus, id_column, max_k,
                                       scann_options, hybrid, validation,
                                       restrict_columns))
    names = [n for n in ("towers", "retrieval", "retrieval_brute_force") if n in served]
    fusion = served.pop("hybrid", None)
    restrict_info = served.pop("restricts", None)
    pins = {name: served[name]["version"] for name in names}
    model_config = serving_config.config_entry(names)
    info = {
        "format_version": FORMAT_VERSION,
        "tfdssm_version": _package_version(),
        "tensorflow_version": tf.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "towers": {"version": int(tower_dir.name), "path": f"towers/{tower_dir.name}"},
        "candidate_id": id_column,  # the corpus column retrieval returns
        "query": _tower_info(model.query_tower),
        "candidate": _tower_info(model.candidate_tower),
        "hashing": hashing_info(),
        "loss": model.loss_name,
        # Multi-head query towers: `query` returns embedding [batch, heads, dim].
        "num_heads": int(getattr(model.query_tower, "num_heads", 1)),
        "temperature": model.temperature,
        "corpus": CORPUS_FILE if corpus is not None else None,
        "num_candidates": None if corpus is None else len(corpus),
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
        **({"hybrid": fusion} if fusion else {}),
        **({"restricts": restrict_info} if restrict_info else {}),
        **{k: v for k, v in served.items() if k != "towers"},
        "model_config": model_config,
        "warmup": f"<model>/<version>/{warmup.WARMUP_DIR}/{warmup.WARMUP_FILE}",
        "commit": {"record": serving_config.CONFIG_FILE, "versions": pins,
                   "sha256": _digests(export_dir, corpus is not None,
                                      "candidate_embeddings" in served,
                                      restrict_info is not None)},
    }
    _hook("export.json")
    write_json_atomic(export_dir / EXPORT_JSON, info)
    if tflite:
        info = add_tflite(model, export_dir, info)
    _hook("models.config")
    serving_config.write_model_configs(export_dir, names, pins)  # the commit: last
    _sync_dir(export_dir)
    return info


def _digests(export_dir: pathlib.Path, corpus: bool, embeddings: bool,
             labels: bool = False) -> dict:
    """sha256 of the export's top-level data files, recorded in ``export.json``
    so that a reader can tell them from a later, uncommitted export's."""
    files = ([CORPUS_FILE] if corpus else []) + (
        [candidates.EMBEDDINGS_FILE, candidates.IDS_FILE] if embeddings else []) + (
        [tokens.TOKENS_FILE] if labels else [])
    out = {}
    for name in files:
        digest = hashlib.sha256()
        with open(export_dir / name, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
        out[name] = digest.hexdigest()
    return out


def _hook(step: str) -> None:
    """Test seam: called before each step of an export (``towers``,
    ``retrieval_brute_force``, ``retrieval``, ``candidates``, ``export.json``,
    ``models.config``); kill tests replace it to stop an export there."""


def _package_version() -> str:
    from tfdssm import __version__  # noqa: PLC0415

    return __version__
