"""Text retrieval as a user gets it: ``tfdssm train --pipeline pairs`` vs BM25.

Each variant runs the library's real path, :func:`tfdssm.recipes.pairs.prepare`
then :func:`tfdssm.training.run.run` with an export, using the pairs defaults of
:mod:`tfdssm.recipes.defaults` (early stopping, hybrid export, ...) plus the
variant's overrides, on the split of :mod:`benchmarks.text_corpora` (the
benchmark's validation pairs are training rows here: ``run`` holds out its own
validation split). Two figures per variant, over the held-out queries and every
document:

* **towers**: the exported towers' dense score alone (exact top-100);
* **served**: what ``retrieval_brute_force`` answers (for a hybrid export, the
  dense score fused with BM25; otherwise the same ranking as the towers).

BM25 (``bm25s``, stemmed, stop words) runs on the same split in the same run.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import common, text_corpora
from benchmarks.text import (
    KS,
    MRR_K,
    bm25_topk,
    dense_topk,
    positives_of,
    ranks_from_topk,
    retrieval_metrics,
)

PREVIOUS = {"shared_towers": False, "batch_size": 256, "epochs": 5,
            "max_length": 256, "patience": 0, "hybrid": False,
            "hard_negatives": None}
VARIANTS: dict[str, dict[str, Any]] = {
    "previous defaults (separate towers, batch 256, 5 epochs)": PREVIOUS,
    "defaults": {},
    "defaults, --hard-negatives none": {"hard_negatives": None},
    "defaults, --hard-negatives self": {"hard_negatives": "self"},
}


def run_variant(splits: Mapping[str, pd.DataFrame], overrides: Mapping[str, Any],
                seed: int = 0) -> dict[str, Any]:
    """Trains and exports one variant; returns towers and served metrics."""
    from tfdssm.data import readers  # noqa: PLC0415
    from tfdssm.model.runner import embed  # noqa: PLC0415
    from tfdssm.recipes import pairs  # noqa: PLC0415
    from tfdssm.recipes.defaults import defaults  # noqa: PLC0415
    from tfdssm.training import run as training  # noqa: PLC0415

    options = {**defaults("pairs"), **overrides}
    train = pd.concat([splits["train"], splits["validation"]], ignore_index=True)
    columns = ["query", "doc", "doc_id"]
    prepared = pairs.prepare(
        train[columns], "query", "doc", "doc_id", num_buckets=options["buckets"],
        hidden=options["hidden"], dim=options["dim"],
        activation=options["activation"], max_length=options["max_length"],
        shared_towers=options["shared_towers"], temperature=options["temperature"],
        seed=seed)
    prepared = dataclasses.replace(prepared, train=train[columns],
                                   test=splits["test"][columns],
                                   corpus=splits["corpus"][columns[1:]])
    export_dir = tempfile.mkdtemp(prefix="tfdssm-bench-text-")
    start = time.perf_counter()
    try:
        result = training.run(
            prepared, export_dir, epochs=options["epochs"],
            batch_size=options["batch_size"], learning_rate=options["learning_rate"],
            verbose=0, seed=seed, patience=options["patience"] or None,
            hybrid=options["hybrid"],
            hard_negatives=options.get("hard_negatives"))
    finally:
        seconds = time.perf_counter() - start
        shutil.rmtree(export_dir, ignore_errors=True)
    model = prepared.model
    by_name = {f.name: f for f in prepared.features}

    def vectors(frame: pd.DataFrame, tower: Any) -> np.ndarray:
        specs = [by_name[n] for n in tower.feature_names]
        return embed(tower, readers.to_feature_arrays(frame, specs), batch_size=2048)

    topk = dense_topk(vectors(splits["test"], model.query_tower),
                      vectors(splits["corpus"], model.candidate_tower))
    towers = retrieval_metrics(ranks_from_topk(
        topk, positives_of(splits["test"], splits["corpus"])))
    info = result["export"]
    stopping = info["training"].get("early_stopping", {})
    return {
        "options": {k: list(v) if isinstance(v, tuple) else v
                    for k, v in options.items()},
        "towers": towers,
        "served": result["metrics"].get("hybrid", towers),
        "hybrid_weight": info.get("hybrid", {}).get("weight"),
        "epochs_run": stopping.get("epochs_run", options["epochs"]),
        "epoch_kept": stopping.get("epoch_kept", options["epochs"]),
        "seconds": seconds,
    }


def run_corpus(name: str, variants: Mapping[str, Mapping[str, Any]],
               max_docs: int | None = None, seed: int = 0,
               progress: Any = None) -> dict[str, Any]:
    """BM25 and every variant on one corpus, same split."""
    frame = text_corpora.load(name)
    if max_docs is not None and len(frame) > max_docs:
        pick = np.random.default_rng(seed + 1).permutation(len(frame))[:max_docs]
        frame = frame.iloc[np.sort(pick)].reset_index(drop=True)
    splits = text_corpora.split(frame, seed=seed)
    info = {**text_corpora.describe(frame),
            **{f"{p}_pairs": len(splits[p]) for p in ("train", "validation", "test")}}
    topk, seconds = bm25_topk(splits["corpus"]["doc"], splits["test"]["query"])
    bm25 = {**retrieval_metrics(ranks_from_topk(
        topk, positives_of(splits["test"], splits["corpus"]))), "seconds": seconds}
    print(f"text-defaults: {name}: {info}\n  BM25 {bm25}", file=sys.stderr)
    out: dict[str, Any] = {"corpus": info, "bm25": bm25, "variants": {}}
    for label, overrides in variants.items():
        result = run_variant(splits, overrides, seed)
        out["variants"][label] = result
        print(f"text-defaults: {name}: {label}: towers {result['towers']} served "
              f"{result['served']} ({result['seconds']:.0f} s)", file=sys.stderr)
        if progress is not None:
            progress(out)
    return out


def markdown(results: Mapping[str, Any]) -> str:
    """One table per corpus: BM25, then each variant's towers and served rows."""
    parts = []
    for name, r in results.items():
        c = r["corpus"]
        b = r["bm25"]
        rows = [["BM25 (bm25s, stemmed)", *(b[f"recall@{k}"] for k in KS),
                 b[f"mrr@{MRR_K}"], "-", "-", b["seconds"]]]
        for label, v in r["variants"].items():
            epochs = f"{v['epoch_kept']} of {v['epochs_run']}"
            rows.append([f"{label}: towers", *(v["towers"][f"recall@{k}"] for k in KS),
                         v["towers"][f"mrr@{MRR_K}"], epochs, "-", v["seconds"]])
            if v["hybrid_weight"] is not None:
                rows.append([f"{label}: served (hybrid)",
                             *(v["served"][f"recall@{k}"] for k in KS),
                             v["served"][f"mrr@{MRR_K}"], epochs,
                             v["hybrid_weight"], "(same run)"])
        parts.append(
            f"**{name}** ({c['documents']:,} documents, {c['test_pairs']:,} held-out "
            "queries)\n\n" + common.table(
                ["model", *(f"R@{k}" for k in KS), f"MRR@{MRR_K}", "epoch kept",
                 "hybrid weight", "seconds"], rows))
    return "\n\n".join(parts)


def run(corpora: Sequence[str] = ("stdlib", "manpages", "debian"),
        variants: Mapping[str, Mapping[str, Any]] = VARIANTS,
        max_docs: Mapping[str, int] | None = None, quick: bool = False,
        ) -> dict[str, Any]:
    """Runs the comparison; ``quick`` is stdlib, 2 epochs, two variants."""
    from benchmarks.text import MAX_DOCS  # noqa: PLC0415

    max_docs = MAX_DOCS if max_docs is None else max_docs
    if quick:
        corpora = ("stdlib",)
        variants = {k: {**v, "epochs": 2} for k, v in list(variants.items())[:2]}
    results = {name: run_corpus(name, variants, max_docs.get(name))
               for name in corpora}
    return {"markdown": markdown(results), "results": results}


__all__ = ["PREVIOUS", "VARIANTS", "markdown", "run", "run_corpus", "run_variant"]
