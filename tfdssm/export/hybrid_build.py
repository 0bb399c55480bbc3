"""Building a hybrid (dense + BM25) retrieval model at export time.

:func:`build_hybrid` indexes the corpus's text for :class:`tfdssm.export.hybrid.Hybrid`;
:func:`tune_weight` chooses its fusion weight on validation rows with the
brute-force retrieval model itself, so the weight is the one that is served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.data import readers as data
from tfdssm.errors import ExportError
from tfdssm.export.hybrid import Hybrid, choose_weight
from tfdssm.export.lexical import LexicalIndex

logger = logging.getLogger("tfdssm")

DEFAULT_WEIGHT = 0.3  # without validation rows; see docs/benchmarks.md, text retrieval
_TUNE_K = 10


def text_columns(tower_info: Mapping[str, Any]) -> list[str]:
    """Names of a tower's text features (as served), from its export info."""
    return [f["name"] for f in tower_info["features"] if f.get("kind") == "text"]


def build_hybrid(
    corpus: pd.DataFrame,
    query_info: Mapping[str, Any],
    candidate_info: Mapping[str, Any],
    weight: float = DEFAULT_WEIGHT,
) -> Hybrid:
    """A BM25 index over the corpus's text columns, ready to fuse.

    Args:
        corpus: The retrieval model's candidates, in its order.
        query_info: The query tower's export info (``features`` with ``kind``).
        candidate_info: The candidate tower's export info.
        weight: Initial fusion weight.

    Returns:
        A :class:`tfdssm.export.hybrid.Hybrid` over the query's text column; a
        candidate's document is its text columns joined by spaces.

    Raises:
        ExportError: the query tower has not exactly one text feature, or the
            candidate tower has none.
    """
    queries = text_columns(query_info)
    documents = text_columns(candidate_info)
    if len(queries) != 1 or not documents:
        raise ExportError(
            "hybrid retrieval needs exactly one text feature in the query tower and "
            f"at least one in the candidate tower; received query text "
            f"{queries} and candidate text {documents}. Export without hybrid "
            "retrieval for these towers.")
    start = time.perf_counter()
    texts = corpus[documents].astype(object).fillna("").astype(str)
    texts = texts.agg(" ".join, axis=1).tolist()
    lexical = LexicalIndex.from_texts(texts)
    logger.info("indexed %d candidates for BM25 (%d distinct words) in %.1f s",
                len(texts), lexical.num_terms, time.perf_counter() - start)
    return Hybrid(lexical, queries[0], weight=weight)


def tune_weight(
    module: Any,
    validation: pd.DataFrame | None,
    candidate_id: str,
    query_features: Sequence[Any],
) -> dict[str, Any]:
    """Sets the module's fusion weight to the best one on ``validation``.

    Args:
        module: A retrieval module with a ``hybrid`` (:mod:`tfdssm.export.index`).
        validation: Rows with the query features and ``candidate_id``; rows whose
            candidate is not in the module's corpus are ignored. ``None`` keeps
            the current weight.
        candidate_id: The id column.
        query_features: Specs (name, dtype) of the query inputs.

    Returns:
        What ``export.json`` records: ``weight``, ``validation_queries`` and,
        when tuned, Recall@10 / MRR@10 per weight tried.
    """
    hybrid = module.hybrid
    if validation is None or not len(validation):
        return {"weight": round(float(hybrid.weight.numpy()), 6),
                "validation_queries": 0}
    position = {cid.decode("utf-8"): i for i, cid in enumerate(module.ids.numpy())}
    ids = validation[candidate_id].astype(str)
    known = ids.isin(position.keys()).to_numpy()
    rows = validation[known]
    if not len(rows):
        return {"weight": round(float(hybrid.weight.numpy()), 6),
                "validation_queries": 0}
    positives = ids[known].map(position).to_numpy()
    arrays = data.to_feature_arrays(rows, query_features, "the validation rows")

    def components(batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        features = {name: tf.constant(values) for name, values in batch.items()}
        queries = module.embed_query(features)
        parts = hybrid.components(module.search, module.embeddings, features,
                                  queries, tf.constant(_TUNE_K))
        return [p.numpy() for p in parts]

    start = time.perf_counter()
    weight, table = choose_weight(components, arrays, positives)
    hybrid.weight.assign(weight)
    logger.info("hybrid fusion weight %.2f chosen on %d validation queries in %.1f s",
                weight, len(rows), time.perf_counter() - start)
    return {"weight": weight, "validation_queries": int(len(rows)),
            "tried": {f"{w:g}": {k: round(v, 4) for k, v in m.items()}
                      for w, m in table.items()}}


__all__ = ["DEFAULT_WEIGHT", "build_hybrid", "text_columns", "tune_weight"]
