"""New retrieval versions from embedded candidates, as an export writes them.

:func:`write_index` turns ``(ids, embeddings, candidate columns)`` into new
``retrieval`` (ScaNN) and ``retrieval_brute_force`` versions of a directory,
the same way ``tfdssm train`` does (:mod:`tfdssm.export.savedmodel`): each
version is written under a hidden name and renamed into place with its warm-up
requests, then ``candidates.npy`` / ``candidate_ids.txt`` / ``corpus.parquet``
and ``export.json`` are replaced, and ``models.config``, written last, commits
the new versions (a running ``tfdssm serve`` then swaps them in). A run killed
before that commit leaves the served versions as they were.

The query side of the new models is the export's own towers SavedModel
(:class:`tfdssm.export.index.SignatureEncoder`): no Keras model, no retraining.
A hybrid export's BM25 index is rebuilt over the new corpus, keeping the fusion
weight chosen at export time.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.errors import DataError, DataWarning
from tfdssm.export import candidates, hybrid_build, index, serving_config, warmup
from tfdssm.export.hybrid import Hybrid
from tfdssm.export.layout import CORPUS_FILE, EXPORT_JSON, write_json_atomic
from tfdssm.export.savedmodel import _digests, _sync_dir, save_retrieval

LOG = logging.getLogger("tfdssm.indexing")
MODELS = ("retrieval_brute_force", "retrieval")


def unique_rows(
    ids: Sequence[str], embeddings: np.ndarray, columns: Mapping[str, Sequence[Any]]
) -> tuple[list[str], np.ndarray, dict[str, list]]:
    """Drops repeated candidates (same id and columns) with a warning.

    Rows come back sorted by id, so that the index does not depend on the
    order in which the runner's workers wrote them.

    Raises:
        DataError: one id with different column values.
    """
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    keep: list[int] = []
    last: str | None = None
    repeated = 0
    for i in order:
        cid = ids[i]
        if cid == last:
            before = keep[-1]
            differ = [n for n, v in columns.items() if v[i] != v[before]]
            if differ:
                raise DataError(
                    f"candidate id {cid!r} appears twice in the corpus with different "
                    f"{differ}: {[columns[n][before] for n in differ]} and "
                    f"{[columns[n][i] for n in differ]}. Ids must name one candidate; "
                    "deduplicate the corpus first.")
            repeated += 1
            continue
        keep.append(int(i))
        last = cid
    if repeated:
        warnings.warn(f"the corpus repeats {repeated} candidate(s) (same id and "
                      "features); keeping one row each.", DataWarning, stacklevel=2)
    return ([ids[i] for i in keep], embeddings[keep],
            {n: [v[i] for i in keep] for n, v in columns.items()})


def query_row(towers_dir: str | os.PathLike, encoder: index.SignatureEncoder
              ) -> dict[str, Any]:
    """Example query features for warm-up: the towers' own warm-up request, else
    a placeholder value per input."""
    for request in warmup.read_warmup(towers_dir):
        if request.model_spec.signature_name == "query":
            return {name: tf.make_ndarray(proto).reshape(-1)[0]
                    for name, proto in request.inputs.items()}
    return {name: ("warm up" if spec.dtype == tf.string else 0.0)
            for name, spec in encoder.input_spec.items()}


def _hybrid(info: Mapping[str, Any], frame: pd.DataFrame) -> Hybrid | None:
    if not info.get("hybrid"):
        return None
    weight = float(info["hybrid"].get("weight", hybrid_build.DEFAULT_WEIGHT))
    return hybrid_build.build_hybrid(frame, info["query"], info["candidate"], weight)


def write_index(
    target_dir: str | os.PathLike,
    towers: Any,
    towers_dir: str | os.PathLike,
    ids: Sequence[str],
    embeddings: np.ndarray,
    frame: pd.DataFrame,
    base_info: Mapping[str, Any],
    max_k: int = index.DEFAULT_MAX_K,
    scann_options: Mapping[str, Any] | None = None,
    serve_towers: bool = True,
    extra_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes new retrieval versions into ``target_dir`` and commits them.

    Args:
        target_dir: The export directory (or a shard's directory).
        towers: The loaded towers SavedModel (its ``query`` signature becomes
            the retrieval models' query encoder).
        towers_dir: Its version directory (for the warm-up example).
        ids: ``[n]`` candidate ids, distinct.
        embeddings: float32 ``[n, dim]``, row ``i`` for ``ids[i]``.
        frame: The candidates' id and tower columns, one row each, same order
            (written as ``corpus.parquet``; a hybrid's BM25 index reads it).
        base_info: The export's ``export.json``; updated and written back.
        max_k: Largest ``k`` a request may ask for (capped at ``n``).
        scann_options: ScaNN parameters (default: chosen for ``n``).
        serve_towers: Whether ``models.config`` serves the towers too (the
            export itself: yes; a shard: no).
        extra_info: More ``export.json`` entries (``indexed``, ``shard``).

    Returns:
        The new ``export.json`` content.
    """
    target = pathlib.Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    encoder = index.SignatureEncoder(towers)
    spec = encoder.input_spec
    row = query_row(towers_dir, encoder)
    fusion = _hybrid(base_info, frame)
    dropped = {"retrieval", "retrieval_brute_force", "candidate_embeddings"}
    if not serve_towers:  # a shard holds no towers and no TFLite model
        dropped.add("tflite")
    info = {k: v for k, v in base_info.items() if k not in dropped}
    for name, cls, kwargs in (
        ("retrieval_brute_force", index.BruteForceRetrieval, {}),
        ("retrieval", index.ScannRetrieval, {"options": scann_options}),
    ):
        start = time.perf_counter()
        module = cls(encoder, spec, embeddings, ids, max_k, hybrid=fusion, **kwargs)
        _hook(name)
        version_dir = save_retrieval(module, target, name, row)
        info[name] = {"version": int(version_dir.name),
                      "path": f"{name}/{version_dir.name}", **module.describe()}
        LOG.info("wrote %s version %s (%d candidates) in %.1f s", name,
                 version_dir.name, len(ids), time.perf_counter() - start)
    _hook("candidates")
    info["candidate_embeddings"] = candidates.write_candidates(target, embeddings, ids)
    tmp = target / f".{CORPUS_FILE}.tmp-{os.getpid()}"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, target / CORPUS_FILE)
    names = ["towers"] if serve_towers else []
    names += ["retrieval", "retrieval_brute_force"]
    pins = {n: info[n]["version"] for n in names}
    info.update({
        "corpus": CORPUS_FILE,
        "num_candidates": len(ids),
        "model_config": serving_config.config_entry(names),
        "commit": {"record": serving_config.CONFIG_FILE, "versions": pins,
                   "sha256": _digests(target, True, True)},
        **(extra_info or {}),
    })
    if fusion is not None:
        info["hybrid"] = {**base_info["hybrid"], "num_documents": len(ids)}
    _hook("export.json")
    write_json_atomic(target / EXPORT_JSON, info)
    _hook("models.config")
    serving_config.write_model_configs(target, names, pins)  # the commit: last
    _sync_dir(target)
    LOG.info("committed %s (%s)", target / serving_config.CONFIG_FILE,
             ", ".join(f"{n} {v}" for n, v in pins.items()))
    return info


def _hook(step: str) -> None:
    """Test seam: called before each step (``retrieval_brute_force``,
    ``retrieval``, ``candidates``, ``export.json``, ``models.config``)."""


__all__ = ["MODELS", "query_row", "unique_rows", "write_index"]
