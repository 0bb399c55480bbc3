"""A Beam ``RunInference`` model handler over the exported ``candidate`` signature.

Why not Beam's ``TFModelHandlerTensor``: it loads a *Keras* model
(``tf.keras.models.load_model``, through ``tensorflow_hub``, which it imports
at module level and which the stack does not install), and feeds one stacked
tensor per batch. The towers SavedModel is a plain ``tf.Module`` whose
``candidate`` signature takes one named ``[batch]`` tensor per column (``doc``,
``title``, ``year``, ...). This handler loads it with ``tf.saved_model.load``
(core ops only: no tfdssm, TFRS or Keras code runs on the workers) and feeds
rows as columns.
"""

from __future__ import annotations

import tfdssm  # noqa: F401 - Keras 2 before TensorFlow, also in Beam's workers

# isort: split
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

DEFAULT_BATCH_SIZE = 512


class CandidateTowerHandler(ModelHandler[dict, PredictionResult, Any]):
    """Embeds ``{column: value}`` rows with a towers SavedModel's ``candidate``
    signature.

    Args:
        towers_path: ``EXPORT_DIR/towers/<version>`` (any path TensorFlow reads:
            local, ``gs://``, ...).
        columns: ``{column: "string" | "float"}``, the signature's inputs.
        signature: Signature to call (``candidate``).
        min_batch_size: Smallest batch ``RunInference`` forms.
        max_batch_size: Largest batch (rows per signature call).

    ``run_inference`` returns one ``PredictionResult(row, float32 [dim])`` per row.

    >>> handler = CandidateTowerHandler("towers/1", {"doc": "string"})
    >>> handler.batch_elements_kwargs()["max_batch_size"]
    512
    """

    def __init__(
        self,
        towers_path: str,
        columns: Mapping[str, str],
        signature: str = "candidate",
        min_batch_size: int = 1,
        max_batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self.towers_path = str(towers_path)
        self.columns = dict(columns)
        self.signature = signature

    def load_model(self) -> Any:
        """The loaded SavedModel (its signature is called per batch)."""
        import tensorflow as tf  # noqa: PLC0415 - after tfdssm (module top)

        return tf.saved_model.load(self.towers_path)

    def run_inference(
        self,
        batch: Sequence[dict],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Embeds a batch of rows: float32 ``[len(batch), dim]`` in one call."""
        import tensorflow as tf  # noqa: PLC0415

        features = {}
        for name, kind in self.columns.items():
            values = [row[name] for row in batch]
            if kind == "string":
                features[name] = tf.constant(np.asarray(values, dtype=object),
                                             tf.string)
            else:
                features[name] = tf.constant(np.asarray(values, np.float32))
        vectors = model.signatures[self.signature](**features)["embedding"].numpy()
        return [PredictionResult(row, vector) for row, vector in zip(batch, vectors,
                                                                     strict=True)]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(str(v)) for row in batch for v in row.values())

    def get_metrics_namespace(self) -> str:
        return "tfdssm_index"

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return dict(self._batching_kwargs)


__all__ = ["CandidateTowerHandler", "DEFAULT_BATCH_SIZE"]
