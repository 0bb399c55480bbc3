"""Hash once, train many epochs (tfdssm.data.hash_cache, train.run(hash_cache=))."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import numpy as np
import pytest
import tensorflow as tf

from tfdssm.data import hash_cache
from tfdssm.features.layers import TextEmbedding
from tfdssm.model.dssm import CANDIDATE_KEY
from tfdssm.text.hashing import trigram_ids_py, word_ngram_ids_py
from tfdssm.text.normalize import normalize_code_points_py

TEXTS = np.asarray(["good", "", "  new  york ", "Straße ﬁne Ｔｏｋｙｏ", "北京烤鸭",
                    "ΣΟΦΊΑ και Φως", "x" * 50, "a\tb\nc"], dtype=object)


def _reference_ids(text: str, buckets: int, max_length: int,
                   word_ngrams: tuple[int, ...]) -> list[int]:
    """The pure-Python definition of the ids of one text (hashing.py)."""
    points = normalize_code_points_py(text)[:max_length]
    ids = trigram_ids_py(points, buckets)
    if word_ngrams:
        ids += word_ngram_ids_py(points, buckets, word_ngrams)
    return ids


@pytest.mark.parametrize("word_ngrams", [(), (1, 2)])
def test_cached_ids_equal_freshly_hashed_ids_and_embed_the_same(word_ngrams):
    layer = TextEmbedding(num_buckets=997, output_dim=4, max_length=20,
                          word_ngrams=word_ngrams)
    cached = hash_cache.HashCache().ids(layer, TEXTS)
    fresh = layer.hash_ids(tf.constant(TEXTS.astype(str)))
    assert cached.to_list() == fresh.to_list()
    for text, row in zip(TEXTS, cached.to_list(), strict=True):
        assert sorted(row) == sorted(_reference_ids(text, 997, 20, word_ngrams))
    assert cached.to_list()[1] == []  # empty text: no ids, a zero bag
    np.testing.assert_array_equal(layer(cached).numpy(),
                                  layer(tf.constant(TEXTS.astype(str))).numpy())


def test_cache_is_invalidated_when_hashing_parameters_or_data_change(tmp_path):
    layer = TextEmbedding(num_buckets=997, output_dim=4, max_length=20)
    first = hash_cache.HashCache(tmp_path)
    ids = first.ids(layer, TEXTS)
    assert (first.hashed, first.loaded) == (1, 0)
    assert first.ids(layer, TEXTS) is ids and first.hashed == 1  # memory hit

    again = hash_cache.HashCache(tmp_path)  # a new process (--resume)
    assert again.ids(layer, TEXTS).to_list() == ids.to_list()
    assert (again.hashed, again.loaded) == (0, 1)

    changed = [
        (TextEmbedding(num_buckets=1000, output_dim=4, max_length=20), TEXTS),
        (TextEmbedding(num_buckets=997, output_dim=4, max_length=5), TEXTS),
        (TextEmbedding(num_buckets=997, output_dim=4, max_length=20,
                       word_ngrams=(1,)), TEXTS),
        (layer, np.asarray([*TEXTS[:-1], "a\tb\nd"], dtype=object)),
    ]
    for other, texts in changed:
        cache = hash_cache.HashCache(tmp_path)
        got = cache.ids(other, texts)
        assert (cache.hashed, cache.loaded) == (1, 0)
        assert got.to_list() == other.hash_ids(tf.constant(texts.astype(str))).to_list()
    assert got.to_list() != ids.to_list()
    assert len(list(tmp_path.glob("*.npz"))) == 1 + len(changed)
    # An unreadable file is hashed again, not trusted.
    for path in tmp_path.glob("*.npz"):
        path.write_bytes(b"not an npz")
    broken = hash_cache.HashCache(tmp_path)
    assert broken.ids(layer, TEXTS).to_list() == ids.to_list()
    assert broken.hashed == 1


def _pairs(rows: int = 120, **kwargs):
    from conftest import pairs_frame

    from tfdssm.recipes import pairs

    tf.keras.utils.set_random_seed(0)
    return pairs.prepare(pairs_frame(rows), "query", "doc", None, num_buckets=500,
                         hidden=(16,), dim=8, **kwargs)


def test_only_text_columns_read_by_one_hashing_configuration_are_cached(
        movielens_frame):
    from tfdssm.recipes import movielens

    prepared = _pairs()  # shared tower: query and doc, one layer
    layers = hash_cache.cacheable_columns(prepared.model)
    assert sorted(layers) == ["doc", "query"]
    assert layers["doc"] is layers["query"]
    # The id column is the document text: batches carry its fingerprint too.
    dataset = hash_cache.make_cached_dataset(
        prepared.train, prepared.features, layers, hash_cache.HashCache(), 8,
        candidate_id="doc")
    batch = next(iter(dataset))
    assert isinstance(batch["doc"], tf.RaggedTensor)
    assert batch[CANDIDATE_KEY].dtype == tf.int64
    ml = movielens.prepare(interactions=movielens_frame(), hidden=(16,), dim=8,
                           num_buckets=500, verbose=False)
    assert list(hash_cache.cacheable_columns(ml.model)) == ["title"]


def _train(prepared, cache: bool, **kwargs):
    from tfdssm.training import run as train

    result = train.run(prepared, None, batch_size=16, verbose=0, hash_cache=cache,
                       **kwargs)
    return result, [w.copy() for w in prepared.model.get_weights()]


@pytest.fixture(scope="module")
def pairs_runs():
    """Two runs (with/without the cache) of 2 epochs with early stopping and
    self-mined hard negatives (which re-embed the corpus)."""
    options = dict(epochs=2, patience=1, validation_fraction=0.1,
                   hard_negatives="self")
    with_cache = _pairs()
    cached = _train(with_cache, True, **options)
    without = _train(_pairs(), False, **options)
    return with_cache, cached, without


def test_runs_with_and_without_the_cache_give_the_same_weights(pairs_runs):
    # Same batches in the same order, same ids, same sums: bit-identical (a
    # tolerance of 0), early-stopping scores and hard negatives included.
    _, (cached, cached_weights), (plain, plain_weights) = pairs_runs
    assert cached["history"] == plain["history"]
    assert len(cached["history"]["val_recall@10"]) == len(cached["history"]["loss"])
    for got, want in zip(cached_weights, plain_weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert cached["metrics"] == plain["metrics"]


def test_movielens_trains_the_same_on_cached_titles(movielens_frame):
    # Towers with categorical, multi-valued and numeric features besides the
    # title text: a few steps on either dataset give the same weights.
    from tfdssm.data import readers
    from tfdssm.model import optimizers
    from tfdssm.recipes import movielens

    tf.keras.utils.set_random_seed(0)
    prepared = movielens.prepare(interactions=movielens_frame(), hidden=(16,), dim=8,
                                 num_buckets=500, verbose=False)
    model = prepared.model
    layers = hash_cache.cacheable_columns(model)
    cached = hash_cache.make_cached_dataset(
        prepared.train, prepared.features, layers, hash_cache.HashCache(), 16,
        candidate_id=prepared.candidate_id)
    plain = readers.make_dataset(prepared.train, prepared.features, 16)
    model(next(iter(readers.make_dataset(prepared.train, prepared.features, 16,
                                         shuffle=False))))  # build every weight
    start = [w.copy() for w in model.get_weights()]
    weights = []
    for dataset in (cached, plain):
        model.set_weights(start)
        model.compile(optimizer=optimizers.Adam(0.01))
        model.fit(dataset, epochs=1, verbose=0)
        weights.append(model.get_weights())
    assert not np.array_equal(weights[0][0], start[0])  # it trained
    for got, want in zip(*weights, strict=True):
        np.testing.assert_array_equal(got, want)


def test_exported_towers_on_raw_strings_equal_the_trained_model_on_cached_ids(
        pairs_runs, tmp_path):
    from tfdssm.export import savedmodel

    prepared = pairs_runs[0]
    texts = prepared.corpus["doc"].to_numpy(object)
    version = savedmodel.save_towers(prepared.model, tmp_path)
    loaded = tf.saved_model.load(str(version))
    served = loaded.signatures["candidate"](doc=tf.constant(texts.astype(str)))
    layers = hash_cache.cacheable_columns(prepared.model)
    ids = hash_cache.HashCache().ids(layers["doc"], texts)
    trained = prepared.model.candidate_tower({"doc": ids})
    np.testing.assert_allclose(served["embedding"].numpy(), trained.numpy(),
                               rtol=0, atol=1e-6)


class _Kill(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:  # after epoch 1's backup
            raise RuntimeError("killed")


def test_resume_reads_the_ids_back_instead_of_hashing(tmp_path, monkeypatch):
    from tfdssm.training import checkpoints

    directory = tmp_path / "checkpoints"
    with pytest.raises(RuntimeError, match="killed"):
        _train(_pairs(), True, epochs=2, checkpoint_dir=directory,
               callbacks=[_Kill()])
    assert checkpoints.has_backup(directory)
    assert len(list((directory / "hash_cache").glob("*.npz"))) == 2  # query, doc

    def no_hashing(*args, **kwargs):
        raise AssertionError("the resumed run hashed again")

    monkeypatch.setattr(hash_cache, "hash_texts", no_hashing)
    result, _ = _train(_pairs(), True, epochs=2, checkpoint_dir=directory,
                       resume=True)
    assert len(result["history"]["loss"]) == 1  # epoch 2 only
    assert np.isfinite(result["history"]["loss"]).all()
    assert not directory.exists()  # the finished run removes ids and backup


def test_cli_has_an_opt_out():
    from tfdssm.cli import build_parser

    argv = ["train", "--pipeline", "pairs", "--data", "x.csv", "--export-dir", "e"]
    assert build_parser().parse_args(argv).hash_cache is True
    assert build_parser().parse_args([*argv, "--no-hash-cache"]).hash_cache is False
