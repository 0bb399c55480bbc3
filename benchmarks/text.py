"""Text retrieval: tfdssm's pairs model against BM25 on real technical text.

Corpora (:mod:`benchmarks.text_corpora`): Python standard library docstrings,
Debian man pages, Debian package descriptions. Each corpus's pairs are split with a
fixed seed into train / validation (5 %) / test (10 %); test queries are held out,
and retrieval is always over every document of the corpus (train documents
included). Metrics over the held-out queries: Recall@1/10/100 and MRR@10 (one
relevant document per query).

* **BM25**: ``bm25s`` (Lucene variant, k1 1.5, b 0.75) over the documents, English
  Snowball stemming (PyStemmer) and English stop words; the anchor.
* **tfdssm**: the pairs pipeline's model (``tfdssm.recipes.pairs.prepare``),
  trained as ``tfdssm.training.run.run`` does (Adam, ``make_dataset``, ``model.fit``);
  after every epoch all documents are embedded with the candidate tower and the
  validation and test queries with the query tower, exact dot-product top-100.
  The validation curve shows where training peaks; "best epoch" is what early
  stopping on the validation split would keep.

The sweep starts from shared towers + batch 1024 and varies one thing at a time
(no grid). ``python -m benchmarks.text`` runs it alone and writes
``benchmarks/results/text.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import common, text_corpora

KS = (1, 10, 100)
MRR_K = 10
TOP_K = 100


# --- Metrics -----------------------------------------------------------------


def ranks_from_topk(topk: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """0-based rank of each query's positive in its top-k list (``k`` if absent).

    >>> ranks_from_topk(np.array([[3, 1], [0, 2]]), np.array([1, 5])).tolist()
    [1, 2]
    """
    topk = np.asarray(topk)
    hits = topk == np.asarray(positives)[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), topk.shape[1])


def retrieval_metrics(ranks: np.ndarray, ks: Sequence[int] = KS,
                      mrr_k: int = MRR_K) -> dict[str, float]:
    """Recall@K for each ``k`` and MRR@``mrr_k`` from 0-based ranks.

    Ranks come from top-``max(ks)`` lists, so a rank equal to that length means
    "not retrieved".
    """
    ranks = np.asarray(ranks)
    result = {f"recall@{k}": float((ranks < k).mean()) for k in ks}
    reciprocal = np.where(ranks < mrr_k, 1.0 / (ranks + 1), 0.0)
    result[f"mrr@{mrr_k}"] = float(reciprocal.mean())
    return result


def dense_topk(queries: np.ndarray, documents: np.ndarray, k: int = TOP_K,
               chunk: int = 1024) -> np.ndarray:
    """Exact top-``k`` document indices by dot product, best first.

    Ties are broken by the lower document index.
    """
    k = min(k, len(documents))
    out = np.empty([len(queries), k], dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ documents.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)
        out[start:start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def positives_of(pairs: pd.DataFrame, corpus: pd.DataFrame) -> np.ndarray:
    """Index in ``corpus`` of each pair's document."""
    index = pd.Series(np.arange(len(corpus)), index=corpus["doc_id"])
    return index.loc[pairs["doc_id"]].to_numpy()


# --- BM25 ----------------------------------------------------------------------


def bm25_topk(documents: Sequence[str], queries: Sequence[str],
              k: int = TOP_K) -> tuple[np.ndarray, float]:
    """BM25 top-``k`` document indices per query, and the wall time (s).

    ``bm25s`` with English stop words and the English Snowball stemmer.
    """
    import bm25s  # noqa: PLC0415  (bench extra)
    import Stemmer  # noqa: PLC0415

    start = time.perf_counter()
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(documents), stopwords="en", stemmer=stemmer,
                                   show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(list(queries), stopwords="en", stemmer=stemmer,
                            show_progress=False)
    topk, _ = retriever.retrieve(tokens, k=min(k, len(documents)),
                                 show_progress=False, n_threads=1)
    return np.asarray(topk), time.perf_counter() - start


# --- tfdssm --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One tfdssm configuration (pairs pipeline + training)."""

    name: str
    shared_towers: bool = True
    batch_size: int = 1024
    epochs: int = 10
    learning_rate: float = 0.003
    temperature: float = 0.05
    word_ngrams: tuple[int, ...] = ()
    num_buckets: int = 30000
    hidden: tuple[int, ...] = (300, 300)
    dim: int = 128
    activation: str = "tanh"
    max_length: int = 256


DEFAULTS = Config("defaults (separate, batch 256, 5 ep)", shared_towers=False,
                  batch_size=256, epochs=5)
BASE = Config("shared, batch 1024")


def sweep(max_epochs: int = 20, quick: bool = False) -> list[Config]:
    """Today's defaults, then one change at a time from the shared + batch 1024 base.

    The base runs ``max_epochs`` so its per-epoch curve also answers 5/10/20 epochs.
    """
    base = dataclasses.replace(BASE, epochs=max_epochs)
    if quick:
        return [dataclasses.replace(DEFAULTS, epochs=2),
                dataclasses.replace(base, epochs=2)]
    vary = dict(epochs=10)
    return [
        DEFAULTS,
        base,
        dataclasses.replace(base, name="separate, batch 1024", shared_towers=False),
        dataclasses.replace(base, name="shared, batch 2048", batch_size=2048),
        dataclasses.replace(base, name="shared, batch 256", batch_size=256, **vary),
        dataclasses.replace(base, name="shared, T 0.02", temperature=0.02, **vary),
        dataclasses.replace(base, name="shared, T 0.1", temperature=0.1, **vary),
        dataclasses.replace(base, name="shared, lr 0.001", learning_rate=0.001),
        dataclasses.replace(base, name="shared, lr 0.01", learning_rate=0.01, **vary),
        dataclasses.replace(base, name="shared, words (1,)", word_ngrams=(1,), **vary),
        dataclasses.replace(base, name="shared, words (1,2)", word_ngrams=(1, 2),
                            **vary),
        dataclasses.replace(base, name="shared, max_length 1024", max_length=1024,
                            **vary),
    ]


def _prepare(config: Config, splits: dict[str, pd.DataFrame], seed: int) -> Any:
    """The pairs pipeline's model, with this benchmark's split and full corpus."""
    from tfdssm.recipes import pairs  # noqa: PLC0415

    prepared = pairs.prepare(
        splits["train"][["query", "doc", "doc_id"]], query_column="query",
        candidate_column="doc", candidate_id_column="doc_id",
        num_buckets=config.num_buckets, hidden=config.hidden, dim=config.dim,
        activation=config.activation, word_ngrams=config.word_ngrams,
        max_length=config.max_length,
        shared_towers=config.shared_towers, temperature=config.temperature,
        seed=seed,
    )
    # Replace the pipeline's own random split: train on all training pairs,
    # retrieve over every document.
    return dataclasses.replace(prepared, train=splits["train"],
                               test=splits["test"], corpus=splits["corpus"])


def _embedder(prepared: Any) -> Any:
    """A function: frame -> embeddings for ``"query"`` or ``"candidate"``."""
    from tfdssm.data import readers as data  # noqa: PLC0415
    from tfdssm.model.runner import embed as run_tower  # noqa: PLC0415

    by_name = {f.name: f for f in prepared.features}

    def embed(frame: pd.DataFrame, side: str) -> np.ndarray:
        tower = getattr(prepared.model, f"{side}_tower")
        features = [by_name[n] for n in tower.feature_names]
        return run_tower(tower, data.to_feature_arrays(frame, features),
                              batch_size=2048)

    return embed


def run_tfdssm(config: Config, splits: dict[str, pd.DataFrame],
               seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Trains one configuration; evaluates validation and test after every epoch.

    Returns:
        ``curve`` (per epoch: validation and test metrics), ``last`` (test metrics
        after the last epoch), ``best_epoch`` / ``best`` (the epoch with the best
        validation Recall@10, then MRR@10, and its test metrics), ``train_s``
        (fit time without the evaluations) and ``eval_s``.
    """
    import tensorflow as tf  # noqa: PLC0415

    from tfdssm.data import readers as data  # noqa: PLC0415
    from tfdssm.model import optimizers  # noqa: PLC0415

    tf.keras.utils.set_random_seed(seed)
    prepared = _prepare(config, splits, seed)
    model = prepared.model
    model.compile(optimizer=optimizers.Adam(config.learning_rate))
    dataset = data.make_dataset(prepared.train, prepared.features, config.batch_size,
                                seed=seed)
    embed = _embedder(prepared)
    corpus = splits["corpus"]
    positives = {part: positives_of(splits[part], corpus)
                 for part in ("validation", "test")}
    curve: list[dict[str, Any]] = []
    eval_seconds = [0.0]

    class EpochEval(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            start = time.perf_counter()
            documents = embed(corpus, "candidate")
            row: dict[str, Any] = {"epoch": epoch + 1,
                                   "loss": float((logs or {}).get("loss", np.nan))}
            for part in ("validation", "test"):
                topk = dense_topk(embed(splits[part], "query"), documents)
                row[part] = retrieval_metrics(ranks_from_topk(topk, positives[part]))
            curve.append(row)
            eval_seconds[0] += time.perf_counter() - start
            if verbose:
                print(f"  {config.name} epoch {epoch + 1}: loss {row['loss']:.3f} "
                      f"val R@10 {row['validation']['recall@10']:.3f} "
                      f"test R@10 {row['test']['recall@10']:.3f}", file=sys.stderr)

    start = time.perf_counter()
    model.fit(dataset, epochs=config.epochs, verbose=0, callbacks=[EpochEval()])
    total = time.perf_counter() - start
    best = max(curve, key=lambda r: (r["validation"]["recall@10"],
                                     r["validation"][f"mrr@{MRR_K}"], -r["epoch"]))
    return {"config": {**dataclasses.asdict(config),
                       "word_ngrams": list(config.word_ngrams),
                       "hidden": list(config.hidden)},
            "curve": curve, "last": curve[-1]["test"], "best_epoch": best["epoch"],
            "best": best["test"], "train_s": total - eval_seconds[0],
            "eval_s": eval_seconds[0]}


# --- The suite -------------------------------------------------------------------


def run_corpus(name: str, configs: Sequence[Config], max_pairs: int | None,
               seed: int = 0, max_docs: int | None = None,
               progress: Any = None) -> dict[str, Any]:
    """BM25 and every configuration on one corpus, same split.

    Args:
        name: Corpus name (:func:`benchmarks.text_corpora.load`).
        configs: tfdssm configurations to train.
        max_pairs: Use at most this many pairs.
        seed: Split and training seed.
        max_docs: Subsample the corpus itself (documents and their pairs) first.
        progress: Called with the partial result after each run.
    """
    frame = text_corpora.load(name)
    if max_docs is not None and len(frame) > max_docs:
        pick = np.random.default_rng(seed + 1).permutation(len(frame))[:max_docs]
        frame = frame.iloc[np.sort(pick)].reset_index(drop=True)
    splits = text_corpora.split(frame, seed=seed, max_pairs=max_pairs)
    info = {**text_corpora.describe(frame),
            **{f"{p}_pairs": len(splits[p]) for p in ("train", "validation", "test")}}
    print(f"text: {name}: {info}", file=sys.stderr)
    topk, seconds = bm25_topk(splits["corpus"]["doc"], splits["test"]["query"])
    bm25 = {**retrieval_metrics(ranks_from_topk(topk, positives_of(
        splits["test"], splits["corpus"]))), "seconds": seconds}
    print(f"text: {name}: BM25 {bm25}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    out = {"corpus": info, "bm25": bm25, "runs": runs}
    for config in configs:
        result = run_tfdssm(config, splits, seed=seed)
        runs.append(result)
        if progress is not None:
            progress(out)
        print(f"text: {name}: {config.name}: test {result['last']} "
              f"(best epoch {result['best_epoch']}), train {result['train_s']:.0f}s",
              file=sys.stderr)
    return out


def markdown(results: dict[str, Any], quick: bool = False) -> str:
    """The suite's Markdown: corpora, then one table per corpus."""
    parts = [f"### Text retrieval ({'quick: ' if quick else ''}held-out queries, "
             "retrieval over every document; BM25 = bm25s, English stemming + stop "
             "words)"]
    rows = [[name, r["corpus"]["documents"], r["corpus"]["train_pairs"],
             r["corpus"]["validation_pairs"], r["corpus"]["test_pairs"],
             r["corpus"]["query_words"], r["corpus"]["doc_words"]]
            for name, r in results.items()]
    parts.append(common.table(["corpus", "documents", "train pairs", "val pairs",
                               "test queries", "query words", "doc words"], rows))
    for name, r in results.items():
        rows = [["BM25", "-", *(r["bm25"][f"recall@{k}"] for k in KS),
                 r["bm25"][f"mrr@{MRR_K}"], "-", r["bm25"]["seconds"], "-"]]
        for run in r["runs"]:
            c = run["config"]
            last = run["last"]
            curve = " ".join(f"{e['validation']['recall@10']:.2f}"
                             for e in run["curve"])
            rows.append([run["config"]["name"], c["epochs"],
                         *(last[f"recall@{k}"] for k in KS), last[f"mrr@{MRR_K}"],
                         f"{run['best_epoch']}: {run['best']['recall@10']:.3f} / "
                         f"{run['best'][f'mrr@{MRR_K}']:.3f}", run["train_s"], curve])
        parts.append(f"**{name}**\n\n" + common.table(
            ["model", "epochs", *(f"R@{k}" for k in KS), f"MRR@{MRR_K}",
             "best val epoch: test R@10 / MRR@10", "train s",
             "val R@10 per epoch"], rows))
    plot = None if quick else plot_curves(results)  # quick runs keep the plot
    if plot is not None:
        parts.append(f"![validation Recall@10 per epoch]"
                     f"({plot.relative_to(common.RESULTS.parent)})")
    return "\n\n".join(parts)


def plot_curves(results: dict[str, Any]) -> Any:
    """Validation Recall@10 per epoch: shared vs separate towers, batch 1024."""
    series = {}
    for name, r in results.items():
        for run in r["runs"]:
            if run["config"]["name"] in (BASE.name, "separate, batch 1024"):
                series[f"{name}: {run['config']['name']}"] = (
                    [e["epoch"] for e in run["curve"]],
                    [e["validation"]["recall@10"] for e in run["curve"]])
    if not series:
        return None
    return common.plot_lines(common.RESULTS / "text_curves.png",
                             "Text retrieval: validation Recall@10 per epoch",
                             "epoch", "Recall@10", series)


CORPORA = ("stdlib", "manpages", "debian")
# Documents kept per corpus (a seeded sample) so that one run stays within a
# few minutes on 2 cores: every epoch re-embeds the whole corpus.
MAX_DOCS = {"debian": 12_000}


def run(quick: bool = False) -> dict[str, Any]:
    """The ``text`` suite of ``make bench``: the pairs defaults as a user gets
    them against BM25 (:mod:`benchmarks.text_defaults`, on every corpus; the
    results also go to ``text_defaults.json``). The one-change-at-a-time sweep
    that chose those defaults is :func:`run_sweep` (``python -m benchmarks.text``,
    35-60 min; its last table is ``results/text.md``)."""
    from benchmarks import text_defaults  # noqa: PLC0415

    out = text_defaults.run(quick=quick)
    if not quick:
        common.RESULTS.mkdir(parents=True, exist_ok=True)
        (common.RESULTS / "text_defaults.json").write_text(
            json.dumps(out["results"], indent=1))
    head = ("### Text retrieval: `tfdssm train --pipeline pairs` defaults vs BM25 "
            f"({'quick: ' if quick else ''}held-out queries, retrieval over every "
            "document; BM25 = bm25s with English stemming and stop words; the sweep "
            "behind the defaults: [text.md](results/text.md))")
    return {"markdown": head + "\n\n" + out["markdown"], "results": out["results"]}


def run_sweep(quick: bool = False, corpora: Sequence[str] = CORPORA,
              max_pairs: int = 60_000, configs: Sequence[Config] | None = None,
              max_docs: dict[str, int] | None = None) -> dict[str, Any]:
    """Runs the sweep; returns Markdown and the raw results (also text.json)."""
    configs = list(configs) if configs is not None else sweep(quick=quick)
    max_docs = MAX_DOCS if max_docs is None else max_docs
    if quick:
        corpora, max_pairs = ("stdlib",), 2000
    results = {name: run_corpus(name, configs, max_pairs,
                                max_docs=max_docs.get(name)) for name in corpora}
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    if not quick:
        (common.RESULTS / "text.json").write_text(json.dumps(results, indent=1))
    return {"markdown": markdown(results, quick), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", action="append",
                        choices=("stdlib", "manpages", "debian"))
    parser.add_argument("--max-pairs", type=int, default=60_000)
    parser.add_argument("--max-docs", type=int,
                        help=f"subsample each corpus first (default: {MAX_DOCS})")
    parser.add_argument("--config", action="append",
                        help="run only the sweep's configurations with these names")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--out", help="write the results JSON here instead")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import tfdssm  # noqa: F401, PLC0415  (Keras 2 before TensorFlow)

    configs = sweep(args.max_epochs, args.quick)
    if args.config:
        configs = [c for c in configs if c.name in args.config]
    corpora = args.corpus or (("stdlib",) if args.quick else CORPORA)
    if args.quick:
        args.max_pairs = min(args.max_pairs, 2000)
    max_docs = ({c: args.max_docs for c in corpora} if args.max_docs
                else MAX_DOCS)
    if args.out:
        results: dict[str, Any] = {}

        def save(partial: dict[str, Any], name: str) -> None:
            results[name] = partial
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=1)

        for name in corpora:
            save(run_corpus(name, configs, args.max_pairs, max_docs=max_docs.get(name),
                            progress=lambda r, n=name: save(r, n)), name)
        print(markdown(results, args.quick))
    else:
        print(run_sweep(args.quick, corpora, args.max_pairs, configs,
                        max_docs)["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
