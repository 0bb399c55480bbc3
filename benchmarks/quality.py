"""Retrieval quality on MovieLens-100k against the TFRS tutorial and most-popular.

Protocols (all over the full catalogue of 1,682 movies):

* **TFRS basic retrieval**: 80/20 random split (seed 42); factorized top-K
  accuracy (= Recall@K, no exclusion) for K = 1, 5, 10, 50, 100;
* **leave-last-out**: each user's latest rating is the test item; Recall@K and
  NDCG@10 with the user's training movies excluded;
* **AUC** against 100 sampled negatives per test rating.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks import baselines, common
from tfdssm.data.movielens import load_movielens_100k
from tfdssm.model import runner
from tfdssm.recipes import movielens
from tfdssm.training import metrics as evaluate
from tfdssm.training import run as train

TOP_KS = (1, 5, 10, 50, 100)
CURVE_KS = tuple(range(1, 101))


def _exclusions(prepared: train.Prepared) -> list[list[int]]:
    index = {m: i for i, m in enumerate(prepared.corpus["movie_id"])}
    seen: dict[str, list[int]] = {}
    for user, movie in zip(prepared.train["user_id"], prepared.train["movie_id"],
                           strict=True):
        seen.setdefault(user, []).append(index[movie])
    return [seen.get(u, []) for u in prepared.test["user_id"]]


def _positives(prepared: train.Prepared) -> np.ndarray:
    index = {m: i for i, m in enumerate(prepared.corpus["movie_id"])}
    return prepared.test["movie_id"].map(index).to_numpy()


def _ours(
    prepared: train.Prepared, epochs: int
) -> tuple[np.ndarray, np.ndarray, float]:
    start = time.perf_counter()
    train.run(prepared, None, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    model = prepared.model
    features = {f.name: f for f in prepared.features}
    queries = runner.embed(model.query_tower, train.data.to_feature_arrays(
        prepared.test, [features[n] for n in model.query_tower.feature_names]))
    corpus = runner.embed(model.candidate_tower, train.data.to_feature_arrays(
        prepared.corpus, [features[n] for n in model.candidate_tower.feature_names]))
    return queries, corpus, seconds


def run(quick: bool = False) -> dict[str, Any]:
    """Runs both protocols; returns Markdown, plot paths and raw figures."""
    epochs, tfrs_epochs = (2, 1) if quick else (6, 3)
    interactions = load_movielens_100k(verbose=False).interactions()
    results: dict[str, Any] = {"random": {}, "last": {}}

    prepared = movielens.prepare(interactions=interactions, split="random")
    q, c, seconds = _ours(prepared, epochs)
    pos = _positives(prepared)
    results["random"]["tfdssm"] = {
        **evaluate.rank_metrics(q, pos, c, ks=TOP_KS), "train_s": seconds}
    start = time.perf_counter()
    tutorial = baselines.train_tfrs_tutorial(prepared.train, tfrs_epochs)
    seconds = time.perf_counter() - start
    q, c = baselines.tfrs_embeddings(tutorial, prepared.test, prepared.corpus)
    results["random"]["TFRS tutorial"] = {
        **evaluate.rank_metrics(q, pos, c, ks=TOP_KS), "train_s": seconds}

    last = movielens.prepare(interactions=interactions, split="leave_last_out")
    exclude, pos = _exclusions(last), _positives(last)
    q, c, seconds = _ours(last, epochs)
    curves = {}
    runs = {"tfdssm": (q, c)}
    # Same split, same test rows and corpus order; histories from earlier
    # training ratings only (tfdssm.data.history).
    history = movielens.prepare(interactions=interactions, split="leave_last_out",
                                user_tower="history")
    q, c, _ = _ours(history, epochs)
    runs["tfdssm (history tower)"] = (q, c)
    tutorial = baselines.train_tfrs_tutorial(last.train, tfrs_epochs)
    runs["TFRS tutorial"] = baselines.tfrs_embeddings(tutorial, last.test, last.corpus)
    runs["most popular"] = baselines.popularity_embeddings(last.train, last.test,
                                                           last.corpus)
    for name, (q, c) in runs.items():
        metrics = evaluate.rank_metrics(q, pos, c, exclude=exclude, ks=CURVE_KS,
                                        auc_negatives=100)
        results["last"][name] = metrics
        curves[name] = (list(CURVE_KS), [metrics[f"recall@{k}"] for k in CURVE_KS])

    rows = [[name, *(m[f"recall@{k}"] for k in TOP_KS), m["auc"], m["train_s"]]
            for name, m in results["random"].items()]
    random_table = common.table(
        ["model (80/20 random, seed 42)", *(f"top-{k}" for k in TOP_KS), "AUC",
         "train s"], rows)
    rows = [[name, m["recall@10"], m["recall@50"], m["recall@100"], m["ndcg@10"],
             m["auc"]] for name, m in results["last"].items()]
    last_table = common.table(
        ["model (leave-last-out, seen excluded)", "Recall@10", "Recall@50",
         "Recall@100", "NDCG@10", "AUC"], rows)
    plot = common.plot_lines(
        common.RESULTS / "recall_at_k.png",
        "MovieLens-100k leave-last-out (1,682 movies)", "K", "Recall@K", curves)
    markdown = (f"### Quality: MovieLens-100k ({'quick: ' if quick else ''}tfdssm "
                f"{epochs} epochs, TFRS tutorial {tfrs_epochs})\n\n{random_table}\n\n"
                f"{last_table}\n\n![Recall@K]({plot.relative_to(common.RESULTS.parent)})")
    return {"markdown": markdown, "plots": [plot], "results": results}
