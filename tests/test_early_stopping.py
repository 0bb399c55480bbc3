"""Early stopping on validation retrieval (tfdssm.early_stopping, train.run)."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.training.early_stopping import RetrievalEarlyStopping


class _Snapshots(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


def test_stops_after_patience_and_restores_the_peak_epoch():
    # A synthetic task whose validation metric peaks at epoch 2 of 8.
    curve = iter([0.2, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    stopper = RetrievalEarlyStopping(
        lambda model: dict.fromkeys(("recall@10", "mrr@10"), next(curve)),
        patience=2)
    snapshots = _Snapshots()  # runs first: the weights each epoch ended with
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(3,))])
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="mse")
    x = np.random.default_rng(0).normal(size=[64, 3]).astype(np.float32)
    history = model.fit(x, x.sum(axis=1), epochs=8, verbose=0,
                        callbacks=[snapshots, stopper])
    assert len(history.history["loss"]) == 4  # epochs 3 and 4 did not improve
    assert stopper.best_epoch == 1 and stopper.stopped_epoch == 3
    for got, want in zip(model.get_weights(), snapshots.weights[1], strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(snapshots.weights[1][0], snapshots.weights[3][0])
    summary = stopper.summary()
    assert summary["epoch_kept"] == 2 and summary["epochs_run"] == 4
    assert summary["stopped_early"] is True
    assert [h["recall@10"] for h in summary["validation"]] == [0.2, 0.6, 0.5, 0.4]
    assert history.history["val_recall@10"] == [0.2, 0.6, 0.5, 0.4]


def test_patience_and_metrics_are_checked():
    with pytest.raises(ConfigError, match="patience must be >= 1"):
        RetrievalEarlyStopping(lambda model: {}, patience=0)
    stopper = RetrievalEarlyStopping(lambda model: {"recall@10": 1.0})
    stopper.set_model(tf.keras.Sequential())
    with pytest.raises(ConfigError, match=r"lack \['mrr@10'\]"):
        stopper.on_epoch_end(0, {})


def test_train_run_reports_validation_per_epoch_on_a_held_out_split(pairs_frame):
    from tfdssm.recipes import pairs
    from tfdssm.training import run as train

    prepared = pairs.prepare(pairs_frame(200), "query", "doc", "doc_id",
                             num_buckets=500, hidden=(16,), dim=8)
    result = train.run(prepared, None, epochs=3, batch_size=32, verbose=0,
                       patience=1, validation_fraction=0.1)
    history = result["history"]
    assert 1 <= len(history["loss"]) <= 3
    assert len(history["val_recall@10"]) == len(history["loss"])
    # The validation rows are 10 % of the training rows, held out of training:
    # together the two parts are the training rows, each once.
    train_rows, validation = train.validation_split(prepared.train, 0.1, 0)
    assert len(validation) == round(0.1 * len(prepared.train))
    both = pd.concat([train_rows, validation]).sort_values(list(prepared.train.columns))
    want = prepared.train.sort_values(list(prepared.train.columns))
    assert both.to_numpy().tolist() == want.to_numpy().tolist()
    with pytest.raises(ConfigError, match="validation_fraction must be in"):
        train.validation_split(prepared.train, 0.0)


class _Epoch(tf.keras.callbacks.Callback):
    """Records the epoch running; raises at ``kill_at`` (a crash)."""

    def __init__(self, kill_at=None):
        super().__init__()
        self.epoch, self.kill_at = None, kill_at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.kill_at:
            raise RuntimeError("killed")
        self.epoch = epoch


def _fit_with_backup(directory, epoch, stopper, snapshots):
    from tfdssm.training import checkpoints

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(3,))])
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="mse")
    x = np.random.default_rng(0).normal(size=[64, 3]).astype(np.float32)
    saver = checkpoints.backup(directory, {"run": 1}, resume=True)
    history = model.fit(x, x.sum(axis=1), epochs=8, verbose=0,
                        callbacks=[epoch, snapshots, stopper, saver])
    return model, history


def test_a_resumed_run_stops_where_the_whole_run_stops_with_the_same_weights(tmp_path):
    # Validation peaks at epoch 2; patience 2 stops after epoch 4. The first
    # process crashes at the start of epoch 4 (3 done); the second resumes.
    curve = [0.2, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    directory, state = tmp_path / "checkpoints", tmp_path / "checkpoints" / "es"

    def stopper(epoch):
        return RetrievalEarlyStopping(
            lambda model: dict.fromkeys(("recall@10", "mrr@10"), curve[epoch.epoch]),
            patience=2, state_dir=state)

    first, first_snapshots = _Epoch(kill_at=3), _Snapshots()
    with pytest.raises(RuntimeError, match="killed"):
        _fit_with_backup(directory, first, stopper(first), first_snapshots)
    assert sorted(p.name for p in state.iterdir()) == [
        "best-2.npz", "state-2.json", "state-3.json"]
    second = _Epoch()
    resumed = stopper(second)
    model, history = _fit_with_backup(directory, second, resumed, _Snapshots())
    assert len(history.history["loss"]) == 1  # epoch 4 only, then stopped
    assert resumed.best_epoch == 1 and resumed.stopped_epoch == 3
    assert [h["epoch"] for h in resumed.summary()["validation"]] == [1, 2, 3, 4]
    for got, want in zip(model.get_weights(), first_snapshots.weights[1], strict=True):
        np.testing.assert_array_equal(got, want)  # epoch 2's, from the first process
    assert not state.exists()  # a finished run removes its state


def test_a_resume_without_state_says_so_and_counts_afresh(tmp_path, caplog):
    stopper = RetrievalEarlyStopping(
        lambda model: {"recall@10": 0.5, "mrr@10": 0.5}, state_dir=tmp_path / "es")
    stopper.on_train_begin()
    with caplog.at_level("WARNING", logger="tfdssm"):
        stopper.on_epoch_begin(2)
    assert "no saved state for the 2 epoch(s)" in caplog.text
    assert stopper.history == [] and stopper.best_epoch is None


def test_train_run_resumed_reads_the_state_back(pairs_frame, tmp_path, caplog):
    from tfdssm.recipes import pairs
    from tfdssm.training import run as train

    prepared = pairs.prepare(pairs_frame(200), "query", "doc", "doc_id",
                             num_buckets=500, hidden=(16,), dim=8)
    directory = tmp_path / "checkpoints"
    args = dict(epochs=3, batch_size=32, verbose=0, patience=5,
                validation_fraction=0.1, checkpoint_dir=directory)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(prepared, None, callbacks=[_Epoch(kill_at=2)], **args)
    assert (directory / train.EARLY_STOPPING_DIR / "state-2.json").exists()
    with caplog.at_level("INFO", logger="tfdssm"):
        result = train.run(prepared, None, resume=True, **args)
    assert "early stopping: resumed its state after epoch 2" in caplog.text
    assert len(result["history"]["loss"]) == 1  # epoch 3 only
    assert not directory.exists()
