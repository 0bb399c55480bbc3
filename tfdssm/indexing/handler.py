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
    """Embeds chunks of rows, ``{column: [values]}``, with a towers SavedModel's
    ``candidate`` signature.

    The elements are already batches (the pipeline reads the corpus in chunks
    of ``batch_size`` rows), so ``RunInference`` hands over one chunk per call
    and no per-row Python work happens.

    Args:
        towers_path: ``EXPORT_DIR/towers/<version>`` (any path TensorFlow reads:
            local, ``gs://``, ...).
        columns: ``{column: "string" | "float"}``, the signature's inputs.
        signature: Signature to call (``candidate``).

    ``run_inference`` returns one ``PredictionResult(chunk, float32 [rows, dim])``
    per chunk.

    >>> handler = CandidateTowerHandler("towers/1", {"doc": "string"})
    >>> handler.batch_elements_kwargs()["max_batch_size"]
    1
    """

    def __init__(
        self,
        towers_path: str,
        columns: Mapping[str, str],
        signature: str = "candidate",
    ) -> None:
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.towers_path = str(towers_path)
        self.columns = dict(columns)
        self.signature = signature

    def load_model(self) -> Any:
        """The loaded SavedModel (its signature is called per chunk)."""
        import tensorflow as tf  # noqa: PLC0415 - after tfdssm (module top)

        return tf.saved_model.load(self.towers_path)

    def run_inference(
        self,
        batch: Sequence[dict],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Embeds each chunk: float32 ``[chunk rows, dim]`` in one call."""
        import tensorflow as tf  # noqa: PLC0415

        out = []
        for chunk in batch:
            features = {}
            for name, kind in self.columns.items():
                if kind == "string":
                    features[name] = tf.constant(
                        np.asarray(chunk[name], dtype=object), tf.string)
                else:
                    features[name] = tf.constant(np.asarray(chunk[name], np.float32))
            vectors = model.signatures[self.signature](**features)["embedding"]
            out.append(PredictionResult(chunk, vectors.numpy()))
        return out

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(str(v)) for chunk in batch for values in chunk.values()
                   for v in values)

    def get_metrics_namespace(self) -> str:
        return "tfdssm_index"

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return dict(self._batching_kwargs)


__all__ = ["CandidateTowerHandler", "DEFAULT_BATCH_SIZE"]
