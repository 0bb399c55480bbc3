"""Early stopping on retrieval quality, keeping the best epoch's weights.

Keras's ``EarlyStopping`` watches a logged number; what matters for a retrieval
model is how well held-out queries find their candidates, which no training
loss tells. :class:`RetrievalEarlyStopping` scores a validation split over the
candidate corpus after every epoch (Recall@10 and MRR@10 through the towers,
:func:`tfdssm.training.metrics.rank_metrics`), stops when ``patience`` epochs in a row
did not improve their mean, and puts the best epoch's weights back when
training ends. ``--epochs`` becomes the maximum.

With a ``state_dir`` (``tfdssm train`` uses ``<checkpoint dir>/early_stopping``)
the callback writes its state after every epoch (the validation curve, the best
score, the epochs waited, and the best epoch's weights), so a run resumed from
an epoch backup (:mod:`tfdssm.training.checkpoints`) stops at the same epoch
and keeps the same best weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.export.layout import write_atomic, write_json_atomic

logger = logging.getLogger("tfdssm")

SCORE = ("recall@10", "mrr@10")  # the mean of these is what improves


class RetrievalEarlyStopping(tf.keras.callbacks.Callback):
    """Stops training when validation retrieval stops improving.

    Args:
        evaluate: Called after every epoch with the model; returns metrics with
            at least ``recall@10`` and ``mrr@10`` (e.g. a closure over
            :func:`tfdssm.training.evaluation.evaluate_frame` on a validation split).
        patience: Epochs without improvement before stopping (>= 1).
        min_delta: Smallest increase of the score that counts as improvement.
        state_dir: Where the state is written after every epoch and read back
            when training starts at a later epoch (a resumed run). ``None``:
            kept in memory only.
        write_state: Whether this process writes ``state_dir`` (the chief of a
            multi-worker run; every worker reads it, so all stop together).

    Attributes:
        history: Per epoch, the validation metrics and ``score``.
        best_epoch: 0-based epoch whose weights were kept (``None`` before the
            first epoch ends).
        stopped_epoch: 0-based epoch after which training stopped early, or
            ``None``.

    >>> callback = RetrievalEarlyStopping(lambda model: {"recall@10": 0.5,
    ...                                                  "mrr@10": 0.25})
    >>> callback.patience
    2
    """

    def __init__(
        self,
        evaluate: Callable[[tf.keras.Model], Mapping[str, float]],
        patience: int = 2,
        min_delta: float = 0.0,
        state_dir: str | os.PathLike | None = None,
        write_state: bool = True,
    ) -> None:
        super().__init__()
        if patience < 1:
            raise ConfigError(f"patience must be >= 1, received {patience}.")
        self.evaluate = evaluate
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.history: list[dict[str, float]] = []
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._best_score = -float("inf")
        self._best_weights: list[Any] | None = None
        self._waited = 0
        self.state_dir = None if state_dir is None else pathlib.Path(state_dir)
        self.write_state = write_state
        self._started = False

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._waited = 0
        self.stopped_epoch = None
        self._started = False

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._started:
            return
        self._started = True
        if self.state_dir is None:
            return
        if epoch == 0:  # a fresh run: a state left by another run is stale
            if self.write_state:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            return
        if not self._restore(epoch):
            logger.warning(
                "early stopping: no saved state for the %d epoch(s) already done in "
                "%r; counting patience and the best epoch from epoch %d", epoch,
                str(self.state_dir), epoch + 1)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = dict(self.evaluate(self.model))
        missing = [m for m in SCORE if m not in metrics]
        if missing:
            raise ConfigError(f"the validation metrics lack {missing}; received "
                              f"{sorted(metrics)}.")
        score = sum(metrics[m] for m in SCORE) / len(SCORE)
        self.history.append({"epoch": epoch + 1, "score": score,
                             **{m: float(metrics[m]) for m in SCORE}})
        if logs is not None:
            logs.update({f"val_{m}": metrics[m] for m in SCORE})
        improved = score > self._best_score + self.min_delta
        logger.info("epoch %d: validation recall@10 %.4f, mrr@10 %.4f%s", epoch + 1,
                    metrics["recall@10"], metrics["mrr@10"],
                    " (best so far)" if improved else "")
        if improved:
            self._best_score = score
            self.best_epoch = epoch
            self._best_weights = self.model.get_weights()
            self._waited = 0
        else:
            self._waited += 1
            if self._waited >= self.patience:
                self.stopped_epoch = epoch
                self.model.stop_training = True
        self._save(epoch + 1, improved)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.state_dir is not None and self.write_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)  # the run is over
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)
            # debug: training.run logs the epoch kept (info)
            logger.debug("kept the weights of epoch %d of %d (best validation "
                         "score %.4f)", self.best_epoch + 1, len(self.history),
                         self._best_score)

    def _save(self, done: int, improved: bool) -> None:
        """Writes the state after ``done`` epochs: ``state-<done>.json`` and, when
        the epoch improved, ``best-<done>.npz``; keeps the last two states (the
        epoch backup is written after this callback, so a kill in between
        resumes from the state before) and the weights they name."""
        if self.state_dir is None or not self.write_state:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        best_file = (None if self.best_epoch is None
                     else f"best-{self.best_epoch + 1}.npz")
        if improved:
            write_atomic(self.state_dir / best_file, lambda handle: np.savez(
                handle, *self._best_weights))
        state = {"epochs_done": done, "history": self.history,
                 "best_epoch": self.best_epoch, "best_score": self._best_score,
                 "waited": self._waited, "best_file": best_file}
        write_json_atomic(self.state_dir / f"state-{done}.json", state)
        keep = {f"state-{done}.json", f"state-{done - 1}.json"}
        named = {best_file}
        previous = self.state_dir / f"state-{done - 1}.json"
        if previous.exists():
            named.add(json.loads(previous.read_text()).get("best_file"))
        for path in self.state_dir.iterdir():
            if path.name not in keep | named:
                path.unlink(missing_ok=True)

    def _restore(self, epochs_done: int) -> bool:
        """Reads the state written after ``epochs_done`` epochs; ``False`` if absent."""
        path = self.state_dir / f"state-{epochs_done}.json"
        try:
            state = json.loads(path.read_text())
            weights = None
            if state["best_file"] is not None:
                with np.load(self.state_dir / state["best_file"]) as saved:
                    weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        except (OSError, ValueError, KeyError):
            return False
        self.history = list(state["history"])
        self.best_epoch = state["best_epoch"]
        self._best_score = float(state["best_score"])
        self._waited = int(state["waited"])
        self._best_weights = weights
        logger.info("early stopping: resumed its state after epoch %d (best epoch %s, "
                    "%d epoch(s) without improvement)", epochs_done,
                    "none" if self.best_epoch is None else self.best_epoch + 1,
                    self._waited)
        return True

    def summary(self) -> dict[str, Any]:
        """What ``export.json`` records: epochs run, the epoch kept, the curve."""
        return {
            "epochs_run": len(self.history),
            "epoch_kept": None if self.best_epoch is None else self.best_epoch + 1,
            "stopped_early": self.stopped_epoch is not None,
            "patience": self.patience,
            "validation": [{k: round(v, 4) if isinstance(v, float) else v
                            for k, v in h.items()} for h in self.history],
        }


__all__ = ["RetrievalEarlyStopping"]
