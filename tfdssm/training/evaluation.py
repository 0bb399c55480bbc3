"""Rank metrics of two towers over a candidate corpus, from tables.

:func:`evaluate_frame` embeds test queries and a corpus with any pair of
towers (Keras towers or an export's signatures); :func:`evaluate_export`
evaluates an export directory on a table against the exported corpus, the
pool the served model ranks (what ``tfdssm evaluate`` does); with
``add_eval_docs`` the table's own candidates join that pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from tfdssm.data import readers as data
from tfdssm.errors import DataError
from tfdssm.export.loading import (
    load_towers,
    read_committed,
    read_corpus,
    tower_features,
)
from tfdssm.features import Feature
from tfdssm.model.runner import embed
from tfdssm.training.metrics import DEFAULT_KS, rank_metrics


def evaluate_frame(
    query_tower: Any,
    candidate_tower: Any,
    test: pd.DataFrame,
    corpus: pd.DataFrame,
    candidate_id: str,
    query_features: Sequence[Feature],
    candidate_features: Sequence[Feature],
    train: pd.DataFrame | None = None,
    query_key: str | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Embeds the test queries and the corpus, and computes rank metrics.

    With ``train`` and ``query_key``, each query's training candidates are ignored
    (metrics named ``*_excl``, alongside the plain ones).
    """
    index = {cid: i for i, cid in enumerate(corpus[candidate_id].astype(str))}
    ids = test[candidate_id].astype(str)
    unknown = ~ids.isin(index.keys())
    if unknown.any():
        raise DataError(
            f"{int(unknown.sum())} test row(s) have a {candidate_id!r} that is not in "
            f"the candidate corpus, e.g. {ids[unknown].iloc[0]!r}."
        )
    positives = ids.map(index).to_numpy()
    queries = embed(query_tower, data.to_feature_arrays(test, query_features))
    # Empty corpus cells are the export's to report (once), not every evaluation's.
    arrays = data.to_feature_arrays(corpus, candidate_features, "the corpus",
                                    warn_empty=False)
    candidates = embed(candidate_tower, arrays)
    metrics = rank_metrics(queries, positives, candidates, ks=ks)
    if train is not None and query_key is not None:
        seen: dict[str, list[int]] = {}
        for key, cid in zip(train[query_key].astype(str),
                            train[candidate_id].astype(str), strict=True):
            if cid in index:
                seen.setdefault(key, []).append(index[cid])
        exclude = [seen.get(k, []) for k in test[query_key].astype(str)]
        excluded = rank_metrics(
            queries, positives, candidates, exclude=exclude, ks=ks, auc_negatives=0
        )
        metrics.update(
            {f"{k}_excl": v for k, v in excluded.items() if not k.startswith("num_")}
        )
    return metrics


def features_of(tower: Any, features: Sequence[Feature]) -> list[Feature]:
    """The specs among ``features`` of the columns ``tower`` reads, in its order."""
    by_name: Mapping[str, Feature] = {f.name: f for f in features}
    return [by_name[name] for name in tower.feature_names]


def evaluation_pool(
    corpus: pd.DataFrame,
    frame: pd.DataFrame,
    candidate_id: str,
    candidate_features: Sequence[Feature],
    what: str = "the evaluation data",
) -> pd.DataFrame:
    """The exported corpus plus the candidates ``frame`` brings along.

    When ``frame`` has every candidate column, its candidates (one row per id)
    join the corpus, so a test row whose candidate was never exported can still
    be ranked; ids already in the corpus keep their exported row.

    Raises:
        DataError: the same id with different feature values in ``frame``.
    """
    names = list(dict.fromkeys([candidate_id, *(f.name for f in candidate_features)]))
    if not all(n in frame.columns for n in names):
        return corpus
    extra = data.corpus_of(frame, candidate_id, names[1:], what)
    pool = pd.concat([corpus.astype({candidate_id: str}), extra])
    return pool.drop_duplicates(candidate_id, ignore_index=True)


def evaluate_export(
    export_dir: str,
    frame: pd.DataFrame,
    ks: Sequence[int] = DEFAULT_KS,
    what: str = "the evaluation data",
    add_eval_docs: bool = False,
) -> tuple[dict[str, float], int]:
    """Rank metrics of an export's towers on a table of (query, candidate) rows.

    The candidates ranked are the exported corpus (``corpus.parquet``), the
    pool the served retrieval models rank, so the figures are the served
    model's. ``add_eval_docs`` adds the table's own candidates to the pool
    (when it has the candidate columns), so rows whose candidate was never
    exported can be ranked; the figures then describe a bigger pool.

    Args:
        export_dir: An export directory (``export.json``, ``towers/``, corpus).
        frame: One row per query with the query columns and the candidate id.
        ks: Cut-offs of Recall/NDCG/MRR@K.
        what: How errors name ``frame``.
        add_eval_docs: Also rank the candidates ``frame`` brings along.

    Returns:
        ``(metrics, number of candidates ranked)``.

    Raises:
        DataError: an empty table, missing columns or ids; a row whose
            candidate is not in the pool (the message says how to add it).
        ExportError: not an export, or its corpus is missing.
    """
    info = read_committed(export_dir)  # what servers serve, or an error
    towers = load_towers(export_dir, info=info)
    if not len(frame):
        raise DataError(f"{what} has a header but no rows.")
    candidate_id = info["candidate_id"]
    query_features = tower_features(info, "query")
    candidate_features = tower_features(info, "candidate")
    data.check_columns(frame, [f.name for f in query_features] + [candidate_id],
                       what)
    if candidate_id not in [f.name for f in candidate_features]:
        data.check_ids(frame, candidate_id, what)  # an id column of its own
    corpus = read_corpus(export_dir)
    if add_eval_docs:
        corpus = evaluation_pool(corpus, frame, candidate_id, candidate_features,
                                 what)
    else:
        _check_in_corpus(frame, corpus, candidate_id, what)
    metrics = evaluate_frame(
        towers.signatures["query"], towers.signatures["candidate"], frame, corpus,
        candidate_id, query_features, candidate_features, ks=ks,
    )
    return metrics, len(corpus)


def _check_in_corpus(frame: pd.DataFrame, corpus: pd.DataFrame, candidate_id: str,
                     what: str) -> None:
    """Refuses rows whose candidate the export does not serve, saying how to
    rank them anyway."""
    ids = frame[candidate_id].astype(str)
    unknown = ~ids.isin(set(corpus[candidate_id].astype(str)))
    if unknown.any():
        raise DataError(
            f"{int(unknown.sum())} of {len(frame)} row(s) of {what} have a "
            f"{candidate_id!r} the export does not serve (its corpus has "
            f"{len(corpus)} candidates), e.g. {ids[unknown].iloc[0][:60]!r}. Drop "
            "those rows, or add the evaluation data's candidates to the pool "
            "(`tfdssm evaluate --add-eval-docs`; library: add_eval_docs=True).")
