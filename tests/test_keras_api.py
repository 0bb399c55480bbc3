"""DSSM behaves like a Keras model: epoch-mean losses in fit/evaluate (what
EarlyStopping and ModelCheckpoint monitor), metric state that resets, weights
without bookkeeping variables, predict."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import numpy as np
import pytest
import tensorflow as tf

from tfdssm.features import CategoricalFeature
from tfdssm.model.dssm import DSSM
from tfdssm.model.towers import Tower

QUERIES = tuple(f"q{i}" for i in range(8))
DOCS = tuple(f"d{i}" for i in range(8))


def _model(loss: str = "in_batch") -> DSSM:
    tf.keras.utils.set_random_seed(3)
    return DSSM(Tower([CategoricalFeature("query", QUERIES, 8)], (8,), 4),
                Tower([CategoricalFeature("doc", DOCS, 8)], (8,), 4), loss=loss)


def _dataset(rows: int, batch: int, offset: int = 0) -> tf.data.Dataset:
    index = (np.arange(rows) + offset) % 8
    return tf.data.Dataset.from_tensor_slices({
        "query": np.array(QUERIES, object)[index],
        "doc": np.array(DOCS, object)[(index * 3) % 8],
    }).batch(batch)


def _batch_losses(model: DSSM, dataset: tf.data.Dataset) -> list[float]:
    return [float(model.compute_loss(batch)) for batch in dataset]


@pytest.mark.parametrize("loss", ["in_batch", "paper"])
def test_evaluate_returns_the_mean_over_batches_not_the_last_batch(loss):
    model = _model(loss)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    dataset = _dataset(20, 6)  # batches of 6, 6, 6, 2: the last one is different
    expected = _batch_losses(model, dataset) if loss == "in_batch" else None
    result = model.evaluate(dataset, return_dict=True, verbose=0)
    assert set(result) == {"loss", "regularization_loss", "total_loss"}
    if expected is not None:  # the paper loss draws random negatives
        assert result["loss"] == pytest.approx(np.mean(expected), rel=1e-5)
        assert result["loss"] != pytest.approx(expected[-1], rel=1e-3)
    assert result["total_loss"] == pytest.approx(result["loss"])


def test_evaluate_resets_between_calls():
    model = _model()
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    model.evaluate(_dataset(24, 8), verbose=0)
    other = _dataset(16, 4, offset=3)
    result = model.evaluate(other, return_dict=True, verbose=0)
    assert result["loss"] == pytest.approx(np.mean(_batch_losses(model, other)),
                                           rel=1e-5)


def test_fit_logs_epoch_means():
    model = _model()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.0))  # weights stay put
    dataset = _dataset(20, 6)
    expected = np.mean(_batch_losses(model, dataset))
    history = model.fit(dataset, validation_data=dataset, epochs=2, verbose=0)
    assert history.history["loss"] == pytest.approx([expected] * 2, rel=1e-5)
    assert history.history["val_loss"] == pytest.approx([expected] * 2, rel=1e-5)


def test_regularization_losses_are_logged_and_trained():
    model = _model()
    model(next(iter(_dataset(8, 8))))  # build, then penalise the query kernel
    kernel = model.query_tower.output_layer.kernel
    model.add_loss(lambda: 10.0 * tf.reduce_sum(kernel**2))
    model.compile(optimizer=tf.keras.optimizers.SGD(0.01))
    history = model.fit(_dataset(16, 8), epochs=2, verbose=0)
    regularization = history.history["regularization_loss"]
    assert regularization[0] > 0 and regularization[1] < regularization[0]
    assert history.history["total_loss"] == pytest.approx(
        np.add(history.history["loss"], regularization), rel=1e-5)


def test_weights_hold_only_the_towers_and_predict_returns_both():
    model = _model()
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    model.fit(_dataset(16, 8), epochs=1, verbose=0)
    names = [w.name for w in model.weights]
    assert names and all(n.split("/")[0].startswith("tower") for n in names), names
    assert [m.name for m in model.metrics] == ["loss", "regularization_loss",
                                               "total_loss"]
    out = model.predict(_dataset(10, 4), verbose=0)
    assert {k: v.shape for k, v in out.items()} == {"query": (10, 4),
                                                    "candidate": (10, 4)}
