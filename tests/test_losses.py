"""Tests for tfdssm.model.losses and DSSM(loss=...): each loss against hand arithmetic."""

from __future__ import annotations

import math

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfdssm.errors import ConfigError
from tfdssm.model import losses
from tfdssm.model.dssm import DSSM

# Two queries, three candidates: the two positives (the diagonal) and one extra
# sampled negative (column 2).
SCORES = [[0.9, 0.1, 0.3],
          [0.2, 0.8, -0.4]]


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def values(tensor: tf.Tensor) -> list[float]:
    return [float(x) for x in np.asarray(tensor)]


def test_softmax_loss_by_hand():
    got = values(losses.softmax_loss(tf.constant(SCORES), temperature=0.5))
    row0 = -math.log(math.exp(1.8) / (math.exp(1.8) + math.exp(0.2) + math.exp(0.6)))
    row1 = -math.log(math.exp(1.6) / (math.exp(0.4) + math.exp(1.6) + math.exp(-0.8)))
    assert got == pytest.approx([row0, row1], abs=1e-6)


def test_softmax_loss_matches_tfrs_retrieval_with_accidental_hits():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=[5, 4]).astype(np.float32)
    candidates = rng.normal(size=[7, 4]).astype(np.float32)
    ids = tf.constant(["a", "b", "a", "c", "d", "b", "e"])
    task = tfrs.tasks.Retrieval(temperature=0.3, remove_accidental_hits=True)
    want = float(task(queries, candidates, candidate_ids=ids, compute_metrics=False,
                      compute_batch_metrics=False))
    scores = losses.score_matrix(tf.constant(queries), tf.constant(candidates))
    mask = losses.negatives_mask(scores, ids)
    got = float(tf.reduce_sum(losses.softmax_loss(scores, 0.3, mask)))
    assert got == pytest.approx(want, rel=1e-5)


def test_gamma_softmax_by_hand():
    got = values(losses.gamma_softmax_loss(tf.constant([[0.5, 0.2, -0.1]]), gamma=10))
    want = -math.log(math.exp(5) / (math.exp(5) + math.exp(2) + math.exp(-1)))
    assert got == pytest.approx([want], abs=1e-6)


def test_pair_ce_by_hand():
    got = values(losses.pair_ce_loss(tf.constant(SCORES), temperature=0.5))
    row0 = (softplus((0.1 - 0.9) / 0.5) + softplus((0.3 - 0.9) / 0.5)) / 2
    row1 = (softplus((0.2 - 0.8) / 0.5) + softplus((-0.4 - 0.8) / 0.5)) / 2
    assert got == pytest.approx([row0, row1], abs=1e-6)


def test_triplet_by_hand():
    got = values(losses.triplet_loss(tf.constant(SCORES), margin=0.7))
    # row 0: max(0, .7 + .1 - .9) = 0, max(0, .7 + .3 - .9) = .1 -> mean .05
    # row 1: max(0, .7 + .2 - .8) = .1, max(0, .7 - .4 - .8) = 0 -> mean .05
    assert got == pytest.approx([0.05, 0.05], abs=1e-6)
    assert values(losses.triplet_loss(tf.constant(SCORES), margin=0.5)) == [0.0, 0.0]


def test_sigmoid_by_hand():
    got = values(losses.sigmoid_loss(tf.constant(SCORES), temperature=1.0))
    row0 = softplus(-0.9) + (softplus(0.1) + softplus(0.3)) / 2
    row1 = softplus(-0.8) + (softplus(0.2) + softplus(-0.4)) / 2
    assert got == pytest.approx([row0, row1], abs=1e-6)


def test_masks_accidental_hits_and_hard_negatives():
    scores = tf.constant(SCORES)
    # Column 2 is the same item as row 0's positive: not a negative of row 0.
    mask = losses.negatives_mask(scores, tf.constant(["a", "b", "a"]))
    assert np.asarray(mask).tolist() == [[False, True, False], [True, False, True]]
    got = values(losses.triplet_loss(scores, margin=1.0, mask=mask))
    assert got == pytest.approx([1.0 + 0.1 - 0.9, (0.4 + 0.0) / 2], abs=1e-6)
    hard = losses.negatives_mask(scores, num_hard_negatives=1)
    assert np.asarray(hard).tolist() == [[False, False, True], [True, False, False]]


def test_row_without_negatives_costs_nothing():
    scores = tf.constant([[0.3]])
    assert values(losses.triplet_loss(scores, margin=1.0)) == [0.0]
    assert values(losses.pair_ce_loss(scores)) == [0.0]
    assert values(losses.sigmoid_loss(scores)) == pytest.approx([softplus(-0.3)])


def test_multi_head_scores_take_the_best_head():
    queries = tf.constant([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2 heads, 2]
    candidates = tf.constant([[0.5, 0.9], [0.7, -1.0]])
    assert np.asarray(losses.score_matrix(queries, candidates)).tolist() == [
        pytest.approx([0.9, 0.7])]
    docs = tf.constant([[[0.5, 0.9], [0.7, -1.0]]])
    assert np.asarray(losses.pair_scores(queries, docs)).tolist() == [
        pytest.approx([0.9, 0.7])]


# --------------------------------------------------------------------------- #
# Through DSSM(loss=...): towers that return fixed embeddings.
# --------------------------------------------------------------------------- #


class Fixed(tf.keras.layers.Layer):
    """A 'tower' returning its input column as the embedding."""

    def __init__(self, column: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.column = column
        self.normalize = False

    @property
    def feature_names(self) -> list[str]:
        return [self.column]

    def call(self, inputs):
        return tf.convert_to_tensor(inputs[self.column], tf.float32)


# Unit vectors: cosines are the dot products.
Q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
C = np.array([[0.6, 0.8], [0.8, 0.6]], np.float32)  # s = [[.6, .8], [.8, .6]]


def model_loss(loss: str, **kwargs) -> float:
    model = DSSM(Fixed("q"), Fixed("c"), loss=loss, **kwargs)
    return float(model.compute_loss({"q": Q, "c": C}, training=True))


def test_dssm_in_batch_loss_by_hand():
    # TFRS sums over rows: 2 * -log(e^(.6/.5) / (e^(.6/.5) + e^(.8/.5))).
    row = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
    assert model_loss("in_batch", temperature=0.5) == pytest.approx(2 * row, abs=1e-5)


def test_dssm_paper_loss_by_hand():
    # Batch 2, one negative: the shift is always 1, the negative the other doc.
    row = -math.log(math.exp(6.0) / (math.exp(6.0) + math.exp(8.0)))
    assert model_loss("paper", num_paper_negatives=1, gamma=10) == pytest.approx(
        row, abs=1e-5)


@pytest.mark.parametrize("loss, kwargs, want", [
    ("pair_ce", {"temperature": 0.5}, softplus((0.8 - 0.6) / 0.5)),
    ("triplet", {"margin": 0.3}, 0.3 + 0.8 - 0.6),
    ("sigmoid", {"temperature": 0.5}, softplus(-1.2) + softplus(1.6)),
])
def test_dssm_ranking_losses_by_hand(loss, kwargs, want):
    # Both rows are symmetric: the batch mean equals one row's loss.
    assert model_loss(loss, **kwargs) == pytest.approx(want, abs=1e-5)


def test_dssm_ranking_loss_removes_accidental_hits():
    model = DSSM(Fixed("q"), Fixed("c"), candidate_id="id", loss="triplet",
                 margin=0.3, remove_accidental_hits=True)
    same = {"q": Q, "c": C, "id": np.array(["x", "x"], dtype=object)}
    assert float(model.compute_loss(same)) == 0.0  # the only negative is a hit
    other = {**same, "id": np.array(["x", "y"], dtype=object)}
    assert float(model.compute_loss(other)) == pytest.approx(0.5, abs=1e-6)


def test_dssm_loss_config_errors_and_round_trip():
    with pytest.raises(ConfigError, match="logQ correction.*loss='pair_ce'"):
        DSSM(Fixed("q"), Fixed("c"), candidate_id="id", loss="pair_ce",
             candidate_probabilities={"a": 1.0})
    with pytest.raises(ConfigError, match="loss must be one of"):
        DSSM(Fixed("q"), Fixed("c"), loss="hinge")
    model = DSSM(Fixed("q"), Fixed("c"), loss="triplet", margin=0.7)
    config = model.get_config()
    assert config["loss"] == "triplet" and config["margin"] == 0.7
    with pytest.raises(ConfigError, match="one of"):
        losses.ranking_loss("softmax", tf.constant(Q), tf.constant(C))


@pytest.mark.parametrize("loss", losses.SCORE_LOSSES)
def test_ranking_losses_train(loss):
    """A few steps of each new loss separate 8 users' items (loss goes down)."""
    from tfdssm.features import CategoricalFeature
    from tfdssm.model.towers import Tower

    ids = [str(i) for i in range(8)]
    query = Tower([CategoricalFeature("user", tuple(ids), 8)], hidden=(), output_dim=8)
    item = Tower([CategoricalFeature("item", tuple(ids), 8)], hidden=(), output_dim=8)
    model = DSSM(query, item, loss=loss, temperature=0.2)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    batch = {"user": np.array(ids, dtype=object), "item": np.array(ids, dtype=object)}
    before = float(model.compute_loss(batch))
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(30), verbose=0)
    assert float(model.compute_loss(batch)) < 0.5 * before
