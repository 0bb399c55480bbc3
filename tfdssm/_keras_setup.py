"""Make sure TensorFlow uses Keras 2 (tf-keras), which TFRS requires.

TensorFlow >= 2.16 resolves ``tf.keras`` lazily, on first attribute access, from
the ``TF_USE_LEGACY_KERAS`` environment variable. Setting the variable before that
first access is enough, even if ``tensorflow`` itself was imported earlier. Once
``tf.keras`` has resolved to Keras 3 it is too late for this process.
"""

import os
import sys

from tfdssm.errors import ConfigError

_FIX = (
    "tfdssm (like TensorFlow Recommenders) needs Keras 2 from the `tf-keras` package, "
    "but TensorFlow in this process already resolved tf.keras to Keras {version}. "
    "Fix: set TF_USE_LEGACY_KERAS=1 before TensorFlow is imported -- run "
    "`import os; os.environ['TF_USE_LEGACY_KERAS'] = '1'` as the very first cell, or "
    "simply `import tfdssm` before `import tensorflow`. In Colab or Jupyter, restart "
    "the runtime (Runtime > Restart session) after changing the order; in a shell, "
    "`export TF_USE_LEGACY_KERAS=1`."
)


def ensure_keras2() -> None:
    """Sets ``TF_USE_LEGACY_KERAS=1`` and checks ``tf.keras`` is Keras 2.

    Raises:
        ConfigError: if TensorFlow already bound ``tf.keras`` to Keras 3, or the
            variable was set to something other than ``1`` / ``true``.
    """
    value = os.environ.get("TF_USE_LEGACY_KERAS")
    if value is not None and value.strip().lower() not in ("1", "true"):
        raise ConfigError(
            f"TF_USE_LEGACY_KERAS is set to {value!r}, but tfdssm needs Keras 2. "
            "Fix: unset it or set it to 1 before TensorFlow is imported."
        )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        return
    import tensorflow as tf  # noqa: PLC0415 - already imported by the user

    module = getattr(tf.keras.layers.Dense, "__module__", "")
    if not module.startswith("tf_keras"):
        keras = sys.modules.get("keras")
        version = getattr(keras, "__version__", "3")
        raise ConfigError(_FIX.format(version=version))
