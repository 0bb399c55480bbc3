"""``tfdssm index``: re-index an export over a new corpus, without retraining.

:func:`index_corpus` runs the Beam pipeline (:mod:`tfdssm.indexing.pipeline`)
over the corpus files with the export's committed towers, reads the embedding
records back and writes new retrieval versions (:mod:`tfdssm.indexing.build`):
into the export itself, or, with ``num_shards > 1``, into
``EXPORT_DIR/shards/<i>/`` (each a directory ``tfdssm serve`` serves; a front,
``tfdssm serve --shards``, merges them). :func:`embed_corpus` is the notebook
version: the embeddings in memory.

Building the indexes happens in this process: it needs each shard's
embeddings in memory (``[shard rows, dim]`` float32), which is what
``--num-shards`` bounds.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.errors import ConfigError, DataError, ExportError
from tfdssm.export import index, serving_config
from tfdssm.export.layout import read_export, write_json_atomic
from tfdssm.indexing import build, corpus, pipeline
from tfdssm.indexing.handler import DEFAULT_BATCH_SIZE, CandidateTowerHandler

LOG = logging.getLogger("tfdssm.indexing")
SHARDS_DIR = "shards"
SHARDS_JSON = "shards.json"


def shard_dir(export_dir: str | os.PathLike, i: int) -> pathlib.Path:
    """``EXPORT_DIR/shards/<i>``: shard ``i``'s export directory."""
    return pathlib.Path(export_dir) / SHARDS_DIR / str(i)


def _towers(export_dir: pathlib.Path, info: Mapping[str, Any]) -> pathlib.Path:
    """The committed towers version directory."""
    version = None
    if (export_dir / serving_config.CONFIG_FILE).is_file():
        version = serving_config.pinned_versions(export_dir).get("towers")
    version = version or (info.get("towers") or {}).get("version")
    path = export_dir / "towers" / str(version)
    if version is None or not (path / "saved_model.pb").is_file():
        raise ExportError(f"{str(export_dir)!r} has no committed towers SavedModel "
                          f"(looked for {str(path)!r}); pass the --export-dir of "
                          "`tfdssm train`.")
    return path


def candidate_columns(towers: Any) -> dict[str, str]:
    """``{column: "string" | "float"}`` of the ``candidate`` signature's inputs."""
    if "candidate" not in towers.signatures:
        raise ExportError("the towers SavedModel has no 'candidate' signature; "
                          "re-export it with `tfdssm train`.")
    specs = towers.signatures["candidate"].structured_input_signature[1]
    out = {}
    for name, spec in specs.items():
        if spec.dtype == tf.string:
            out[name] = "string"
        elif spec.dtype.is_floating:
            out[name] = "float"
        else:
            raise ExportError(f"candidate input {name!r} has dtype {spec.dtype.name}; "
                              "tfdssm index reads string and float columns only.")
    return out


def _default_max_k(info: Mapping[str, Any]) -> int:
    """The export's ``max_k`` when it was chosen (below its corpus size), else
    :data:`tfdssm.export.index.DEFAULT_MAX_K`."""
    entry = info.get("retrieval_brute_force") or {}
    if entry.get("max_k") and entry["max_k"] < entry.get("num_candidates", 0):
        return int(entry["max_k"])
    return index.DEFAULT_MAX_K


def embed_corpus(
    export_dir: str | os.PathLike,
    corpus_files: Sequence[str],
    id_column: str | None = None,
    beam_args: Sequence[str] = (),
    work_dir: str | None = None,
    num_shards: int = 1,
) -> list[tuple[list[str], np.ndarray, dict[str, list]]]:
    """Embeds corpus files with an export's candidate tower (the Beam pipeline).

    Args:
        export_dir: A ``tfdssm train`` export.
        corpus_files: Files or globs (CSV/TSV, Parquet, TFRecord).
        id_column: Column naming each candidate (default: the export's).
        beam_args: Beam options (default: local, two processes).
        work_dir: Where the embedding records go (default: a hidden directory
            in ``export_dir``, removed afterwards).
        num_shards: Split the candidates into this many parts by id.

    Returns:
        Per shard ``(float32 embeddings [rows, dim], ids [rows], {column:
        values})``, each sorted by id, repeated candidates dropped: embeddings
        first, the order of ``export.candidates.read_candidates``.

    Example (in a notebook)::

        [(vectors, ids, _)] = embed_corpus("saved_models/pairs", ["docs.csv"])
    """
    export_dir = pathlib.Path(export_dir)
    info = read_export(export_dir)
    towers_dir = _towers(export_dir, info)
    towers = tf.saved_model.load(str(towers_dir))
    columns = candidate_columns(towers)
    shards = _embed(export_dir, info, towers_dir, columns, corpus_files, id_column,
                    beam_args, work_dir, num_shards, keep_work_dir=False)[0]
    return [(vectors, ids, values) for ids, vectors, values in shards]


def _id_column(info: Mapping[str, Any], columns: Mapping[str, str],
               id_column: str | None) -> str:
    if id_column:
        return id_column
    if info.get("candidate_id"):
        return str(info["candidate_id"])
    names = [f["name"] for f in (info.get("candidate") or {}).get("features", [])]
    return names[0] if names else next(iter(columns))


def _embed(
    export_dir: pathlib.Path, info: Mapping[str, Any], towers_dir: pathlib.Path,
    columns: Mapping[str, str], corpus_files: Sequence[str], id_column: str | None,
    beam_args: Sequence[str], work_dir: str | None, num_shards: int,
    keep_work_dir: bool, batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[list[tuple[list[str], np.ndarray, dict[str, list]]], dict[str, Any], str]:
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1, received {num_shards}.")
    id_col = _id_column(info, columns, id_column)
    files = corpus.expand(list(corpus_files))
    own_work = work_dir is None
    work = work_dir or str(export_dir / f".tfdssm-index-{os.getpid()}-"
                                        f"{int(time.time())}")
    handler = CandidateTowerHandler(_stage_towers(towers_dir, work), columns)
    kinds = {**columns, id_col: "string"}
    try:
        run = pipeline.run(files, handler, id_col, work, num_shards, list(kinds),
                           beam_args, chunk_rows=batch_size)
        shards = []
        for i in range(num_shards):
            parts = sorted(tf.io.gfile.glob(pipeline.shard_prefix(work, i, num_shards)
                                            + "*.tfrecord"))
            ids, vectors, values = corpus.decode_records(parts, kinds, id_col)
            if not ids:
                raise DataError(
                    f"shard {i} of {num_shards} got no candidates: the corpus "
                    f"({len(files)} file(s)) has no rows with an {id_col!r}"
                    + (" or fewer candidates than shards; use fewer --num-shards."
                       if num_shards > 1 else "."))
            LOG.info("shard %d: %d embedded rows read back", i, len(ids))
            shards.append(build.unique_rows(ids, vectors, values))
    finally:
        if own_work and not keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
    run.update({"files": len(files), "id_column": id_col})
    return shards, run, work


def _stage_towers(towers_dir: pathlib.Path, work: str) -> str:
    """The towers path the workers read: the export's own, or, when the work
    directory is remote (``gs://...``: workers on other machines), a copy there."""
    if "://" not in work:
        return str(towers_dir)
    target = f"{work.rstrip('/')}/towers/{towers_dir.name}"
    LOG.info("copying the towers SavedModel to %s for the workers", target)
    for directory, _, files in os.walk(towers_dir):
        relative = os.path.relpath(directory, towers_dir)
        destination = target if relative == "." else f"{target}/{relative}"
        tf.io.gfile.makedirs(destination)
        for name in files:
            tf.io.gfile.copy(os.path.join(directory, name), f"{destination}/{name}",
                             overwrite=True)
    return target


def index_corpus(
    export_dir: str | os.PathLike,
    corpus_files: Sequence[str],
    id_column: str | None = None,
    num_shards: int = 1,
    max_k: int | None = None,
    beam_args: Sequence[str] = (),
    work_dir: str | None = None,
    keep_work_dir: bool = False,
    scann_options: Mapping[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Re-indexes an export over ``corpus_files`` (``tfdssm index``).

    Args:
        export_dir: A ``tfdssm train`` export (its committed towers are used).
        corpus_files: Files or globs: CSV/TSV, Parquet or TFRecord
            (``tf.train.Example``) with the candidate tower's columns and the id.
        id_column: Column naming each candidate (default: the export's
            ``candidate_id``, else the candidate tower's first column).
        num_shards: 1: new versions in the export itself. ``N > 1``: ``N``
            retrieval models in ``EXPORT_DIR/shards/<i>``, candidate ``c`` in
            shard :func:`tfdssm.indexing.corpus.shard_of`.
        max_k: Largest ``k`` per request (default: the export's choice).
        beam_args: Beam pipeline options (``--runner ...``); default local.
        work_dir: Where the embedding records go (``gs://...`` on Dataflow);
            default a hidden directory in ``export_dir``, removed afterwards.
        keep_work_dir: Keep the default work directory.
        scann_options: ScaNN parameters (default: chosen per corpus size).
        batch_size: Rows per candidate-tower call.

    Returns:
        ``{"export.json": the new content (one per shard), "pipeline": ...}``.

    Raises:
        ExportError: not an export, or no committed towers.
        DataError: unreadable corpus, missing columns, conflicting ids.
    """
    export_dir = pathlib.Path(export_dir)
    info = read_export(export_dir)
    towers_dir = _towers(export_dir, info)
    towers = tf.saved_model.load(str(towers_dir))
    columns = candidate_columns(towers)
    max_k = int(max_k or _default_max_k(info))
    if max_k < 1:
        raise ConfigError(f"--max-k must be >= 1, received {max_k}.")
    shards, run, work = _embed(export_dir, info, towers_dir, columns, corpus_files,
                               id_column, beam_args, work_dir, num_shards,
                               keep_work_dir, batch_size)
    id_col = run["id_column"]
    indexed = {"corpus": [str(p) for p in corpus_files], "runner": run["runner"],
               "pipeline_seconds": run["seconds"], "id_column": id_col,
               "num_shards": num_shards,
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out: list[dict[str, Any]] = []
    for i, (ids, vectors, values) in enumerate(shards):
        frame = pd.DataFrame({id_col: ids, **{n: v for n, v in values.items()
                                              if n != id_col}})
        if num_shards == 1:
            target, extra = export_dir, {"indexed": indexed}
        else:
            target = shard_dir(export_dir, i)
            extra = {"indexed": indexed, "shard": {
                "index": i, "num_shards": num_shards, "export_dir": "../..",
                "towers": {"version": int(towers_dir.name),
                           "path": f"../../towers/{towers_dir.name}"}}}
        out.append(build.write_index(
            target, towers, towers_dir, ids, vectors, frame, info, max_k,
            scann_options, serve_towers=num_shards == 1, extra_info=extra))
    if num_shards > 1:
        write_json_atomic(export_dir / SHARDS_DIR / SHARDS_JSON, {
            "num_shards": num_shards, "max_k": max_k,
            "shards": [{"dir": str(i), "num_candidates": o["num_candidates"],
                        "retrieval": o["retrieval"]["version"],
                        "retrieval_brute_force": o["retrieval_brute_force"]["version"]}
                       for i, o in enumerate(out)],
            "assignment": "zlib.crc32(utf-8 id) % num_shards", **indexed})
        _warn_stale_shards(export_dir, num_shards)
    return {"export.json": out, "pipeline": run,
            "work_dir": work if keep_work_dir or work_dir else None}


def _warn_stale_shards(export_dir: pathlib.Path, num_shards: int) -> list[str]:
    """Warns about shard dirs of an earlier index with more shards.

    They are left in place (a server may still serve them) but are no longer in
    ``shards.json``, so ``serve --shards`` ignores them.
    """
    stale = sorted((p.name for p in (export_dir / SHARDS_DIR).iterdir()
                    if p.is_dir() and p.name.isdigit() and int(p.name) >= num_shards),
                   key=int)
    if stale:
        LOG.warning(
            "%s holds shard dir(s) %s of an earlier index with more shards; they are "
            "not in %s and not served by `serve --shards`: remove them once no "
            "server uses them.", export_dir / SHARDS_DIR, ", ".join(stale), SHARDS_JSON)
    return stale


__all__ = ["SHARDS_DIR", "candidate_columns", "embed_corpus", "index_corpus",
           "shard_dir"]
