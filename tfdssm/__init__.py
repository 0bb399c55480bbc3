"""tfdssm: DSSM / two-tower retrieval in TensorFlow.

Importing tfdssm selects Keras 2 (``TF_USE_LEGACY_KERAS=1``) before TensorFlow is
loaded, as TensorFlow Recommenders requires.
"""

from tfdssm._keras_setup import ensure_keras2

ensure_keras2()

from tfdssm.errors import ConfigError, DataError, ExportError, TfdssmError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ExportError",
    "TfdssmError",
    "__version__",
]
