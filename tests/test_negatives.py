"""Hard negatives (tfdssm.training.negatives): miners, the re-mining callback,
train.run."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tfdssm.errors import ConfigError
from tfdssm.export.lexical import LexicalIndex, tokenize
from tfdssm.training import negatives

WORDS = ["red", "green", "blue", "apple", "sky", "tree", "river", "stone"]


def _random_corpus(rng, size):
    docs = [" ".join(rng.choice(WORDS, rng.integers(1, 5))) for _ in range(size)]
    ids = [f"c{rng.integers(0, max(2, size // 2))}" for _ in range(size)]  # duplicates
    return docs, ids


@pytest.mark.parametrize("seed", range(6))
def test_miners_never_return_the_positive_or_an_accidental_hit(seed):
    rng = np.random.default_rng(seed)
    docs, ids = _random_corpus(rng, int(rng.integers(6, 20)))
    if len(set(ids)) < 3:
        ids[0], ids[1], ids[2] = "x", "y", "z"
    m = 2
    counts = pd.Series(ids).value_counts()
    allowed = [i for i in range(len(docs)) if len(docs) - counts[ids[i]] >= m]
    positives = rng.choice(allowed, 15)
    queries = [docs[p] if k % 2 else " ".join(rng.choice(WORDS, 2))
               for k, p in enumerate(positives)]
    bm25 = negatives.mine_bm25(queries, docs, positives, ids, m, batch_size=4)
    dense = negatives.mine_dense(rng.normal(size=[15, 4]),
                                 rng.normal(size=[len(docs), 4]),
                                 positives, ids, m, batch_size=4)
    for mined in (bm25, dense):
        assert mined.shape == (15, m) and mined.dtype == np.int32
        for row, positive in zip(mined, positives, strict=True):
            assert positive not in row
            assert all(ids[j] != ids[positive] for j in row)
            assert len(set(row.tolist())) == m


def test_bm25_miner_returns_the_lexically_best_non_positive():
    docs = ["red apple", "green apple tree", "blue sky", "apple apple red",
            "river stone", "red river"]
    ids = ["a", "b", "c", "a", "d", "e"]  # docs 0 and 3 are the same candidate
    queries = ["red apple", "river", "apple tree", "blue sky"]
    positives = np.array([0, 4, 1, 2])
    mined = negatives.mine_bm25(queries, docs, positives, ids, num_negatives=1)
    scores = LexicalIndex.from_texts(docs)(tf.constant(queries)).numpy()
    for q, (row, positive) in enumerate(zip(mined[:, 0], positives, strict=True)):
        allowed = [j for j in range(len(docs)) if ids[j] != ids[positive]]
        assert row in allowed
        assert scores[q, row] >= max(scores[q, allowed]) - 1e-5
    assert mined[0, 0] not in (0, 3)  # doc 3 shares the positive's id
    assert mined[0, 0] == 5  # "red river": shorter than "green apple tree"


def test_numpy_bm25_scores_match_the_lexical_index():
    rng = np.random.default_rng(3)
    docs, _ = _random_corpus(rng, 30)
    queries = [" ".join(rng.choice(WORDS + ["zebra"], 3)) for _ in range(10)] + [""]
    index = LexicalIndex.from_texts(docs)
    want = index(tf.constant(queries)).numpy()
    postings = {n: getattr(index, n).numpy()
                for n in ("terms", "offsets", "docs", "weights")}
    got = negatives.bm25_scores(postings, tokenize(queries), len(docs))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_miner_rejects_too_few_other_candidates():
    with pytest.raises(ConfigError, match="differs from the positive"):
        negatives.mine_dense(np.ones([1, 2]), np.ones([2, 2]), [0], ["a", "a"])


def _prepared(pairs_frame):
    from tfdssm.recipes import pairs  # noqa: PLC0415
    return pairs.prepare(pairs_frame(120), "query", "doc", "doc_id",
                         num_buckets=300, hidden=(16,), dim=8)


def test_self_miner_negatives_change_after_the_callback_re_mines(pairs_frame):
    from tfdssm.data import readers as data  # noqa: PLC0415
    prepared = _prepared(pairs_frame)
    model = prepared.model
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    miner = negatives.HardNegatives("self", model, prepared.train, prepared.corpus,
                                    prepared.features, "doc_id", per_row=3, every=1)
    miner.on_train_begin()
    before = miner.indices.numpy().copy()
    dataset = miner.attach(data.make_dataset(prepared.train, prepared.features, 16,
                                             row_index=negatives.ROW_INDEX))
    batch = next(iter(dataset))
    assert negatives.ROW_INDEX not in batch
    assert batch[negatives.HARD_NEGATIVES]["doc"].shape == [16 * 3]
    model.fit(dataset, epochs=3, verbose=0)
    miner.params = {"epochs": 5}
    miner.on_epoch_end(0)
    after = miner.indices.numpy()
    assert miner.minings == 2
    assert not np.array_equal(before, after)
    ids = miner.ids
    for row, positive in zip(after, miner.positives, strict=True):
        assert all(ids[j] != ids[positive] for j in row)
    # The dataset reads the variable: the next batches carry the new negatives.
    ordered = miner.attach(data.make_dataset(prepared.train, prepared.features, 16,
                                             shuffle=False,
                                             row_index=negatives.ROW_INDEX))
    got = next(iter(ordered))[negatives.HARD_NEGATIVES]["doc_id"].numpy()
    assert [g.decode() for g in got] == ids[after[:16].reshape(-1)].tolist()


def _signature_defs(version_dir: pathlib.Path) -> dict:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return {name: (sorted(sig.inputs), sorted(sig.outputs))
            for name, sig in proto.meta_graphs[0].signature_def.items()}


@pytest.mark.parametrize("mode", [None, "bm25", "self"])
def test_train_run_with_hard_negatives_trains_and_exports(mode, tmp_path, pairs_frame):
    """Mined negatives leave the model, its config and its exported signatures
    as they are. Without mining (``None``) nothing is exported here: that export
    (same signatures, no ``hard_negatives`` in its training record) is
    ``trained`` in test_cli.py (``--hard-negatives none``)."""
    from tfdssm.training import run as train  # noqa: PLC0415
    prepared = _prepared(pairs_frame)
    # One candidate's text emptied: the miner reads the corpus again (and "self"
    # at every mining) but only the export says so, once.
    prepared.corpus.loc[prepared.corpus.index[3], "doc"] = ""
    config = prepared.model.get_config()
    export_dir = None if mode is None else tmp_path / "export"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train.run(prepared, export_dir, epochs=2, batch_size=32,
                           verbose=0, hard_negatives=mode, hard_negatives_every=1)
    said = [str(w.message) for w in caught
            if "the corpus column 'doc'" in str(w.message)]
    assert len(said) == (0 if mode is None else 1), said
    assert np.isfinite(result["history"]["loss"]).all()
    assert result["metrics"]["recall@10"] >= 0
    after = prepared.model.get_config()  # nothing added to the model's config
    assert set(after) == set(config) and after["candidate_id"] == "doc_id"
    rebuilt = type(prepared.model).from_config(after)
    assert rebuilt.query_tower.feature_names == ["query"]
    if mode is None:
        assert result["export"] is None
        return
    defs = _signature_defs(export_dir / "towers" / "1")
    assert defs["query"] == (["query"], ["embedding"])
    assert defs["candidate"] == (["doc"], ["embedding"])
    assert defs["serving_default"] == (["query"], ["embedding"])
    training = result["export"]["training"]
    assert training["hard_negatives"]["mode"] == mode
    # self: mined when training begins and after epoch 1 (not after the last)
    assert training["hard_negatives"]["minings"] == (2 if mode == "self" else 1)


def test_hard_negatives_refuse_logq_and_unknown_modes(pairs_frame):
    from tfdssm.model import DSSM  # noqa: PLC0415
    from tfdssm.training import run as train  # noqa: PLC0415
    prepared = _prepared(pairs_frame)
    model = prepared.model
    prepared.model = DSSM(model.query_tower, model.candidate_tower,
                          candidate_id="doc_id", remove_accidental_hits=True,
                          candidate_probabilities={"D1": 0.5, "D2": 0.5})
    with pytest.raises(ConfigError, match="candidate_probabilities"):
        train.run(prepared, None, epochs=1, verbose=0, hard_negatives="bm25")
    prepared.model = model
    with pytest.raises(ConfigError, match="hard_negatives must be one of"):
        train.run(prepared, None, epochs=1, verbose=0, hard_negatives="random")
