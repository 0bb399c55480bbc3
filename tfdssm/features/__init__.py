"""Features: the :class:`Feature` protocol, the registry, and every kind.

Modules: :mod:`.protocol`, :mod:`.registry`, :mod:`.layers` (the Keras layers
of the basic kinds), :mod:`.basic` (text, categorical, multi-valued, numeric),
:mod:`.history` (item histories and their context columns) and
:mod:`.example_age` (YoutubeDNN's training-only example age). Importing this
package registers every kind.

>>> spec = TextFeature("query", num_buckets=30000, embedding_dim=300)
>>> feature_from_config(spec.to_config()) == spec
True
"""

from tfdssm.features.basic import (
    CategoricalFeature,
    MultiValuedFeature,
    NumericFeature,
    TextFeature,
)
from tfdssm.features.example_age import ExampleAgeFeature, example_ages
from tfdssm.features.history import ContextFeature, HistoryFeature, history_features
from tfdssm.features.protocol import Feature
from tfdssm.features.registry import (
    feature_from_config,
    register_feature_kind,
    vocabulary_of,
)

__all__ = [
    "CategoricalFeature",
    "ContextFeature",
    "ExampleAgeFeature",
    "Feature",
    "HistoryFeature",
    "MultiValuedFeature",
    "NumericFeature",
    "TextFeature",
    "example_ages",
    "feature_from_config",
    "history_features",
    "register_feature_kind",
    "vocabulary_of",
]
