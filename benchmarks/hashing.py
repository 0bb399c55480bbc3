"""Hashing throughput: the in-graph pipeline vs pure Python on the same strings.

~400-character multilingual documents. In-graph: a ``tf.data`` pipeline mapping
``TextNormalizer`` + ``trigram_ids`` over batches of 256 (parallel calls). Pure
Python, single process: (a) the same table-driven definition
(``normalize_code_points_py`` + ``trigram_ids_py``); (b) ``unicodedata``'s C
normalisation + ``trigram_ids_py``. Both give identical ids (checked). The
in-graph pipeline and (a) use the same shortcuts: composition is skipped when no
code point can end a composing pair, and expansions are a direct lookup (a
two-level page table in the graph, a dict in Python).
"""

from __future__ import annotations

import time
import unicodedata
from typing import Any

import numpy as np
import tensorflow as tf

from benchmarks import common
from tfdssm.text.hashing import trigram_ids, trigram_ids_py
from tfdssm.text.normalize import TextNormalizer, normalize_code_points_py

WORDS = ("retrieval", "semantic", "hashing", "tower", "Query", "document", "café",
         "поиск", "ресторан", "Москве", "北京", "烤鸭", "Ελληνικά", "embedding",
         "network", "deep", "learning", "Straße", "naïve", "🙂")
MAX_LENGTH = 512


def documents(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 60))[:400] for _ in range(count)]


def run(quick: bool = False) -> dict[str, Any]:
    docs = documents(2048 if quick else 16384)
    normalizer = TextNormalizer()

    def hash_batch(texts: tf.Tensor) -> tf.RaggedTensor:
        ids, valid = trigram_ids(normalizer(texts, MAX_LENGTH), 30000)
        return tf.ragged.boolean_mask(ids, valid)

    dataset = (tf.data.Dataset.from_tensor_slices(docs).batch(256)
               .map(hash_batch, num_parallel_calls=tf.data.AUTOTUNE)
               .prefetch(tf.data.AUTOTUNE))

    def graph() -> None:
        for _ in dataset:
            pass

    graph_s = common.best_of(graph, repeats=2 if quick else 3)
    sample = docs[: len(docs) // 8]

    def python_table() -> list[list[int]]:
        return [trigram_ids_py(normalize_code_points_py(d)[:MAX_LENGTH], 30000)
                for d in sample]

    def python_unicodedata() -> list[list[int]]:
        return [trigram_ids_py([ord(c) for c in unicodedata.normalize(
            "NFKC", d).casefold()][:MAX_LENGTH], 30000) for d in sample]

    start = time.perf_counter()
    reference = python_table()
    table_s = (time.perf_counter() - start) * len(docs) / len(sample)
    start = time.perf_counter()
    python_unicodedata()
    unicodedata_s = (time.perf_counter() - start) * len(docs) / len(sample)
    check = hash_batch(tf.constant(sample[:64])).to_list()
    assert check == reference[:64], "in-graph and Python ids differ"
    rows = [
        ["in-graph (tf.data, batch 256)", len(docs) / graph_s, 1.0],
        ["pure Python, same table", len(docs) / table_s, table_s / graph_s],
        [
            "Python + unicodedata (C)",
            len(docs) / unicodedata_s,
            unicodedata_s / graph_s,
        ],
    ]
    markdown = ("### Hashing: ~400-character documents, letter trigrams into 30k "
                "buckets\n\n" + common.table(
                    ["implementation", "strings/s", "in-graph speed-up"], rows)
                + "\n\nTarget: in-graph ≥ 20× pure Python.")
    return {"markdown": markdown, "rows": rows}
