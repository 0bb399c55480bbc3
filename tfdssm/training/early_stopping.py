"""Early stopping on retrieval quality, keeping the best epoch's weights.

Keras's ``EarlyStopping`` watches a logged number; what matters for a retrieval
model is how well held-out queries find their candidates, which no training
loss tells. :class:`RetrievalEarlyStopping` scores a validation split over the
candidate corpus after every epoch (Recall@10 and MRR@10 through the towers,
:func:`tfdssm.training.metrics.rank_metrics`), stops when ``patience`` epochs in a row
did not improve their mean, and puts the best epoch's weights back when
training ends. ``--epochs`` becomes the maximum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from tfdssm.errors import ConfigError

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

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._waited = 0
        self.stopped_epoch = None

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
            return
        self._waited += 1
        if self._waited >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)
            # debug: training.run logs the epoch kept (info)
            logger.debug("kept the weights of epoch %d of %d (best validation "
                         "score %.4f)", self.best_epoch + 1, len(self.history),
                         self._best_score)

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
