"""Each recipe's defaults, in one place (the CLI and the benchmarks read them).

No TensorFlow here: ``tfdssm train --help`` shows these without loading it.

The ``pairs`` defaults were chosen by the text-retrieval benchmark
(``make bench SUITES="--suite text"``; docs/benchmarks.md, "Text retrieval") on
three real corpora, the same values for all of them: shared towers (+0.11 to +0.23
Recall@10 over separate ones on every corpus), batch 1024, learning rate
0.003, temperature 0.05, 1,024 code points per text, up to 20 epochs with early
stopping (patience 2: the small corpora peak at epochs 4-8, the largest still
gains at 20), retrieval models that fuse the towers' score with BM25
(``hybrid``: the towers alone trail BM25 on all three corpora) and one BM25-mined
hard negative per training row (the served model's Recall@10 and MRR@10 were
as good or better on all three corpora). The
``movielens`` defaults reproduce the MovieLens figures of docs/benchmarks.md.

>>> DEFAULTS["pairs"]["shared_towers"], DEFAULTS["movielens"]["hybrid"]
(True, False)
"""

from __future__ import annotations

from typing import Any

from tfdssm.model import LOSSES  # noqa: F401 - the CLI reads options here
from tfdssm.training import HARD_NEGATIVES, STRATEGIES  # noqa: F401

DEFAULTS: dict[str, dict[str, Any]] = {
    "movielens": {
        "epochs": 6, "batch_size": 1024, "learning_rate": 0.003, "hidden": (128,),
        "dim": 64, "buckets": 10000, "activation": "relu", "temperature": 0.05,
        "test_fraction": 0.2, "max_length": 256, "shared_towers": False,
        "patience": 0, "hybrid": False, "hard_negatives": None,
    },
    "pairs": {
        "epochs": 20, "batch_size": 1024, "learning_rate": 0.003,
        "hidden": (300, 300), "dim": 128, "buckets": 30000, "activation": "tanh",
        "temperature": 0.05, "test_fraction": 0.1, "max_length": 1024,
        "shared_towers": True, "patience": 2, "hybrid": True,
        "hard_negatives": "bm25",
    },
}


def defaults(pipeline: str) -> dict[str, Any]:
    """A copy of ``pipeline``'s defaults.

    Raises:
        KeyError: an unknown pipeline (the message lists the known ones).
    """
    if pipeline not in DEFAULTS:
        raise KeyError(f"unknown pipeline {pipeline!r}; expected one of "
                       f"{sorted(DEFAULTS)}")
    return dict(DEFAULTS[pipeline])


__all__ = ["DEFAULTS", "HARD_NEGATIVES", "LOSSES", "defaults"]
