"""Hybrid (dense + BM25) retrieval models: fusion against a numpy reference,
the dense fallback, export, weight tuning and serving."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import json
import subprocess
import sys
import urllib.request

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from serving_helpers import running_server

from tfdssm.errors import ConfigError, ExportError
from tfdssm.export import hybrid as hybrid_lib
from tfdssm.export import index, lexical

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _corpus(n: int = 40, dim: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, 4)) for _ in range(n)]
    embeddings = rng.normal(size=[n, dim]).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return texts, embeddings, [f"id{i}" for i in range(n)]


class _Encoder(tf.Module):
    """A fixed 'tower': the query text's hash picks a fixed random vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.table = tf.constant(np.random.default_rng(1).normal(size=[97, dim]),
                                 tf.float32)

    def __call__(self, features):
        bucket = tf.strings.to_hash_bucket_fast(features["q"], 97)
        return tf.math.l2_normalize(tf.gather(self.table, bucket), axis=1)


SPEC = {"q": tf.TensorSpec([None], tf.string, name="q")}


def _modules(weight: float, n: int = 40):
    texts, embeddings, ids = _corpus(n)
    encoder = _Encoder(embeddings.shape[1])
    fusion = hybrid_lib.Hybrid(lexical.LexicalIndex.from_texts(texts), "q", weight)
    hybrid = index.BruteForceRetrieval(encoder, SPEC, embeddings, ids, 10,
                                       hybrid=fusion)
    plain = index.BruteForceRetrieval(encoder, SPEC, embeddings, ids, 10)
    return hybrid, plain, texts, embeddings, ids, encoder


def _reference(queries, texts, embeddings, encoder, weight, k, exclude=()):
    """Exact fused top-k in numpy (the union covers a corpus smaller than depth)."""
    dense = encoder({"q": tf.constant(queries)}).numpy() @ embeddings.T
    bm25 = lexical.LexicalIndex.from_texts(texts)(tf.constant(queries)).numpy()
    top = bm25.max(axis=1, keepdims=True)
    fused = dense + weight * np.where(top > 0, bm25 / np.maximum(top, 1e-12), 0)
    for row, drop in enumerate(exclude):
        fused[row, drop] = -np.inf
    order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(fused, order, axis=1)


def test_fused_top_k_equals_the_exact_reference_with_k_and_exclusions():
    weight = 0.7
    hybrid, _, texts, embeddings, ids, encoder = _modules(weight)
    queries = ["alpha beta", "gamma", "omega sigma kappa", "zzz"]
    out = hybrid.signatures()["top_k_exclude"](
        {"q": tf.constant(queries)}, tf.constant([5, 3, 5, 2]),
        tf.constant([["id3", "id7"], ["", ""], ["id0", ""], ["", ""]]))
    drop = [[3, 7], [], [0], []]
    order, scores = _reference(queries, texts, embeddings, encoder, weight, 5, drop)
    for row, k in enumerate([5, 3, 5, 2]):
        got = [i.decode() for i in out["ids"].numpy()[row][:k]]
        assert got == [ids[j] for j in order[row][:k]]
        np.testing.assert_allclose(out["scores"].numpy()[row][:k], scores[row][:k],
                                   rtol=1e-5, atol=1e-6)
        assert all(i == b"" for i in out["ids"].numpy()[row][k:])


def test_a_query_sharing_no_word_gets_the_dense_answer():
    hybrid, plain, *_ = _modules(2.0)
    features = {"q": tf.constant(["nothing in common", "xyz"])}
    want = plain.signatures()["serving_default"](features)
    got = hybrid.signatures()["serving_default"](features)
    assert got["ids"].numpy().tolist() == want["ids"].numpy().tolist()
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(),
                               rtol=1e-6)


def test_weight_zero_is_the_dense_model_and_lexical_weight_changes_the_order():
    hybrid, plain, *_ = _modules(0.0)
    features = {"q": tf.constant(["alpha beta", "theta"])}
    dense = plain.signatures()["serving_default"](features)["ids"].numpy()
    assert hybrid.signatures()["serving_default"](features)["ids"].numpy(
        ).tolist() == dense.tolist()
    hybrid.hybrid.weight.assign(10.0)
    lexical_first = hybrid.signatures()["serving_default"](features)["ids"].numpy()
    assert lexical_first.tolist() != dense.tolist()


def test_scann_hybrid_answers_as_brute_force_on_a_small_corpus():
    texts, embeddings, ids = _corpus()
    encoder = _Encoder(embeddings.shape[1])
    fusion = hybrid_lib.Hybrid(lexical.LexicalIndex.from_texts(texts), "q", 0.5)
    brute = index.BruteForceRetrieval(encoder, SPEC, embeddings, ids, 10,
                                      hybrid=fusion)
    scann = index.ScannRetrieval(encoder, SPEC, embeddings, ids, 10, hybrid=fusion)
    features = {"q": tf.constant(["alpha omega", "kappa"])}
    a = brute.signatures()["serving_default"](features)
    b = scann.signatures()["serving_default"](features)
    assert a["ids"].numpy().tolist() == b["ids"].numpy().tolist()
    np.testing.assert_allclose(a["scores"].numpy(), b["scores"].numpy(), rtol=1e-5)


def test_mismatched_lexical_index_or_text_column_is_refused():
    texts, embeddings, ids = _corpus()
    encoder = _Encoder(embeddings.shape[1])
    short = hybrid_lib.Hybrid(lexical.LexicalIndex.from_texts(texts[:5]), "q")
    with pytest.raises(ExportError, match="covers 5 documents"):
        index.BruteForceRetrieval(encoder, SPEC, embeddings, ids, hybrid=short)
    other = hybrid_lib.Hybrid(lexical.LexicalIndex.from_texts(texts), "text")
    with pytest.raises(ExportError, match="query text column 'text'"):
        index.BruteForceRetrieval(encoder, SPEC, embeddings, ids, hybrid=other)


def test_choose_weight_picks_the_weight_that_ranks_positives_best():
    hybrid, *_ = _modules(0.0)
    features = {"q": np.array(["alpha beta gamma", "omega sigma", "kappa theta"],
                              dtype=object)}
    # The positives are each query's best BM25 document: lexical weight helps.
    bm25 = hybrid.hybrid.lexical(tf.constant(features["q"])).numpy()
    positives = bm25.argmax(axis=1)

    def parts(batch):
        f = {k: tf.constant(v) for k, v in batch.items()}
        return [p.numpy() for p in hybrid.hybrid.components(
            hybrid.search, hybrid.embeddings, f, hybrid.embed_query(f),
            tf.constant(10))]

    weight, table = hybrid_lib.choose_weight(parts, features, positives)
    score = {w: sum(m.values()) for w, m in table.items()}
    assert score[weight] == max(score.values()) and score[weight] > score[0.0]
    for tried in (0.0, 1.0, 5.0):  # the table is what the served model does
        hybrid.hybrid.weight.assign(tried)
        ids = hybrid.signatures()["serving_default"](
            {"q": tf.constant(features["q"])})["ids"].numpy()[:, :10]
        ranks = [list(row).index(f"id{p}".encode()) if f"id{p}".encode() in row
                 else None for row, p in zip(ids, positives, strict=True)]
        mrr = np.mean([0.0 if r is None else 1 / (r + 1) for r in ranks])
        assert table[tried]["mrr_at_10"] == pytest.approx(mrr)


@pytest.fixture(scope="module")
def hybrid_export(tmp_path_factory, pairs_frame):
    from tfdssm.recipes import pairs
    from tfdssm.training import run as train

    prepared = pairs.prepare(pairs_frame(120), "query", "doc", "doc_id",
                             num_buckets=500, hidden=(16,), dim=8, shared_towers=True)
    export_dir = tmp_path_factory.mktemp("hybrid_export")
    result = train.run(prepared, export_dir, epochs=2, batch_size=32, verbose=0,
                       hybrid=True, patience=1)
    return export_dir, prepared, result


def test_export_records_the_hybrid_and_its_served_metrics(hybrid_export):
    export_dir, prepared, result = hybrid_export
    info = json.loads((export_dir / "export.json").read_text())
    assert info["hybrid"]["validation_queries"] > 0
    assert set(info["hybrid"]["tried"]) == {f"{w:g}" for w in hybrid_lib.WEIGHT_GRID}
    for name in ("retrieval", "retrieval_brute_force"):
        assert info[name]["hybrid"]["weight"] == info["hybrid"]["weight"]
        assert info[name]["hybrid"]["text_column"] == "query"
    served = info["metrics"]["hybrid"]
    assert served["num_queries"] == len(prepared.test)
    assert 0 <= served["recall@1"] <= served["recall@10"] <= 1
    assert info["training"]["early_stopping"]["epoch_kept"] in (1, 2)


def test_brute_force_hybrid_loads_in_a_tensorflow_only_process(hybrid_export):
    export_dir = hybrid_export[0]
    code = (
        "import sys, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(export_dir / 'retrieval_brute_force' / '1')!r})\n"
        "out = m.signatures['top_k'](query=tf.constant(['apple recipe']), "
        "k=tf.constant([3]))\n"
        "assert 'tfdssm' not in sys.modules and 'scann' not in sys.modules\n"
        "print(out['ids'].numpy()[0][0].decode())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("D")


def test_hybrid_export_serves_over_grpc_and_rest(hybrid_export):
    from tfdssm.client import Client

    export_dir = hybrid_export[0]
    loaded = tf.saved_model.load(str(export_dir / "retrieval_brute_force" / "1"))
    want = loaded.signatures["top_k_exclude"](
        query=tf.constant(["banana recipe 3"]), k=tf.constant([3]),
        exclude=tf.constant([["D1"]]))
    want_ids = [i.decode() for i in want["ids"].numpy()[0]]
    with running_server(export_dir) as server:
        with Client(f"127.0.0.1:{server.grpc_port}", timeout=30) as client:
            for model in ("retrieval", "retrieval_brute_force"):
                ids, scores = client.top_k({"query": ["banana recipe 3"]}, k=3,
                                           exclude=["D1"], model=model)
                assert ids[0].tolist() == want_ids
                np.testing.assert_allclose(scores[0], want["scores"].numpy()[0],
                                           rtol=1e-5)
        body = json.dumps({"signature_name": "top_k_exclude", "inputs": {
            "query": ["banana recipe 3"], "k": [3], "exclude": [["D1"]]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.rest_port}/v1/models/retrieval:predict",
            data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["outputs"]["ids"] == [want_ids]


def test_hybrid_needs_text_towers(movielens_export):
    from tfdssm.export import hybrid_build as builder

    _, prepared, _ = movielens_export
    info = json.loads((movielens_export[0] / "export.json").read_text())
    with pytest.raises(ExportError, match="exactly one text feature in the query"):
        builder.build_hybrid(pd.DataFrame(prepared.corpus), info["query"],
                             info["candidate"])


def test_local_retriever_and_cli_query_answer_as_the_served_hybrid(hybrid_export):
    from tfdssm import cli
    from tfdssm.retrieve import LocalRetriever

    export_dir = hybrid_export[0]
    loaded = tf.saved_model.load(str(export_dir / "retrieval_brute_force" / "1"))
    want = loaded.signatures["top_k_exclude"](
        query=tf.constant(["kiwi recipe 2", "lemon"]), k=tf.constant([4, 4]),
        exclude=tf.constant([["D8"], [""]]))
    retriever = LocalRetriever(export_dir)
    ids, scores = retriever.top_k({"query": ["kiwi recipe 2", "lemon"]}, k=4,
                                  exclude=[["D8"], []])
    assert ids.tolist() == [[i.decode() for i in row] for row in want["ids"].numpy()]
    np.testing.assert_allclose(scores, want["scores"].numpy(), rtol=1e-6)
    with pytest.raises(ConfigError, match="between 1 and the corpus size 10"):
        retriever.top_k({"query": ["kiwi"]}, k=11)
    assert cli.main(["query", "--export-dir", str(export_dir), "--k", "4",
                     "kiwi recipe 2"]) == 0
