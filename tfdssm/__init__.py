"""tfdssm: DSSM / two-tower retrieval in TensorFlow.

Importing tfdssm selects Keras 2 (``TF_USE_LEGACY_KERAS=1``) before TensorFlow is
loaded, as TensorFlow Recommenders requires, and TensorFlow's pooling CPU
allocator (``TF_CPU_ALLOCATOR_USE_BFC=1``, unless set; see ``_allocator``);
everything else is imported on first use (``tfdssm.DSSM`` loads the model, not
the server).

The package is layered; each layer imports only those below it:

==============  ============================================================
``errors``      typed exceptions
``text``        normalisation and letter-trigram hashing
``features``    the :class:`~tfdssm.features.Feature` protocol and every kind
``model``       towers, :class:`DSSM`, losses, sampling, optimizers, presets
``data``        tables and ``tf.data``, MovieLens, history columns
``export``      the export directory: SavedModels, indexes, TFLite, warm-up
``training``    fit, evaluate and export a prepared run; tf.distribute
``serving``     a TF Serving API server (``client``: its gRPC client)
``recipes``     one data source each (``movielens``, ``pairs``); ``cli``
==============  ============================================================

>>> import tfdssm
>>> tfdssm.DSSM.__module__
'tfdssm.model.dssm'
"""

from tfdssm._allocator import prefer_bfc_allocator
from tfdssm._keras_setup import ensure_keras2

ensure_keras2()
prefer_bfc_allocator()

from tfdssm import _compat  # noqa: E402
from tfdssm._lazy import lazy_attributes  # noqa: E402
from tfdssm.errors import (  # noqa: E402
    ConfigError,
    DataError,
    DataWarning,
    ExportError,
    ServingError,
    TfdssmError,
    TfdssmWarning,
)

__version__ = "0.1.0"

_compat.install()

_EXPORTS = {
    # features
    "Feature": "tfdssm.features",
    "TextFeature": "tfdssm.features",
    "CategoricalFeature": "tfdssm.features",
    "MultiValuedFeature": "tfdssm.features",
    "NumericFeature": "tfdssm.features",
    "HistoryFeature": "tfdssm.features",
    "ContextFeature": "tfdssm.features",
    "ExampleAgeFeature": "tfdssm.features",
    "history_features": "tfdssm.features",
    "feature_from_config": "tfdssm.features",
    "register_feature_kind": "tfdssm.features",
    # model
    "DSSM": "tfdssm.model.dssm",
    "Tower": "tfdssm.model.towers",
    "SharedTower": "tfdssm.model.towers",
    "paper_tower": "tfdssm.model.towers",
    "MultiHeadTower": "tfdssm.model.multihead",
    "ItemEmbeddingTower": "tfdssm.model.item_tower",
    "NegativeSampler": "tfdssm.model.sampling",
    "youtube_dnn": "tfdssm.model.youtube",
    # data, export, training
    "read_table": "tfdssm.data.readers",
    "make_dataset": "tfdssm.data.readers",
    "export_model": "tfdssm.export.savedmodel",
    "read_export": "tfdssm.export.layout",
    "load_towers": "tfdssm.export.loading",
    "Prepared": "tfdssm.training.run",
    "run": "tfdssm.training.run",
    # retrieval and serving clients
    "LocalRetriever": "tfdssm.retrieve",
    "Client": "tfdssm.client",
}

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

__all__ = [
    "ConfigError",
    "DataError",
    "DataWarning",
    "ExportError",
    "ServingError",
    "TfdssmError",
    "TfdssmWarning",
    "__version__",
    *_EXPORTS,
]
