"""A new feature kind is one class: defined and registered here alone, it trains
in a Tower, exports, gets warm-up requests, and TFLite takes or refuses it as
its :meth:`tfdssm.features.Feature.tflite_input` says."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfdssm.export import savedmodel, tflite, warmup
from tfdssm.features import (
    CategoricalFeature,
    Feature,
    feature_from_config,
    register_feature_kind,
)
from tfdssm.features.protocol import ColumnFeature, TFLiteInput
from tfdssm.model.dssm import DSSM
from tfdssm.model.towers import Tower

REFUSAL = "a test pair asked to be refused"


@tf.keras.utils.register_keras_serializable(package="tfdssm_test")
class PairLayer(tf.keras.layers.Layer):
    """``x -> [x * scale, x * x]``: float32 ``[batch]`` -> ``[batch, 2]``."""

    def __init__(self, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, tf.float32)
        return tf.stack([x * self.scale, x * x], axis=1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class PairFeature(ColumnFeature):
    """A float column fed as ``[x * scale, x * x]`` (the new kind under test)."""

    name: str
    scale: float = 0.5
    tflite: bool = True
    kind: ClassVar[str] = "test_pair"
    dtype: ClassVar[tf.DType] = tf.float32
    width: ClassVar[int] = 2

    def make_layer(self) -> tf.keras.layers.Layer:
        return PairLayer(self.scale, name=f"{self.name}_pair")

    def example_value(self) -> np.float32:
        return np.float32(1.5)

    def tflite_input(self) -> TFLiteInput | str:
        if not self.tflite:
            return REFUSAL
        return TFLiteInput(spec={"shape": [1], "dtype": "float32"},
                           field=lambda layer, x: layer(x),
                           sample=lambda i, count: float(i - count // 2))

    @staticmethod
    def encode_tflite(value: Any, item: Mapping[str, Any],
                      vocabulary: Sequence[str]) -> np.ndarray:
        return np.asarray([float(value)], np.float32)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


USERS = tuple(f"u{i}" for i in range(6))
DOCS = tuple(f"d{i}" for i in range(6))


def _train(accept: bool) -> DSSM:
    tf.keras.utils.set_random_seed(5)
    features = [CategoricalFeature("user", USERS, 4), PairFeature("x", tflite=accept)]
    query = Tower(features, (8,), 4, input_activation=True)
    model = DSSM(query, Tower([CategoricalFeature("doc", DOCS, 4)], (8,), 4),
                 candidate_id="doc")
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    index = np.arange(48) % 6
    data = tf.data.Dataset.from_tensor_slices({
        "user": np.array(USERS, object)[index],
        "x": (index / 3.0).astype(np.float32),
        "doc": np.array(DOCS, object)[index],
    }).batch(12)
    model.fit(data, epochs=1, verbose=0)
    return model


def test_the_new_kind_follows_the_protocol():
    feature = PairFeature("x")
    assert isinstance(feature, Feature)
    assert feature_from_config(json.loads(json.dumps(feature.to_config()))) == feature
    assert feature.served_columns == ("x",)


@pytest.mark.parametrize("accept", [True, False])
def test_a_new_kind_trains_exports_warms_up_and_meets_tflite(accept, tmp_path):
    model = _train(accept)
    assert model.query_tower.input_bias.shape == [4 + 2]  # width from the kind
    assert model.query_tower.feature_names == ["user", "x"]
    # The retrieval models (query tower inside) once; the refusal case exports
    # the towers alone (what TFLite reads), two SavedModels less.
    corpus = pd.DataFrame({"doc": list(DOCS)}) if accept else None
    info = savedmodel.export_model(model, tmp_path, corpus=corpus)
    assert info["num_candidates"] == (len(DOCS) if accept else None)

    (version,) = (tmp_path / "towers").iterdir()
    loaded = tf.saved_model.load(str(version))
    got = loaded.signatures["query"](user=tf.constant(["u1"]),
                                     x=tf.constant([0.25]))["embedding"]
    want = model.query_tower({"user": tf.constant(["u1"]), "x": tf.constant([0.25])})
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)

    requests = {r.model_spec.signature_name: r for r in warmup.read_warmup(version)}
    assert list(requests["query"].inputs["x"].float_val) == [1.5]
    assert list(requests["query"].inputs["user"].string_val) == [b"u0"]

    if accept:
        entry = info["tflite"]
        assert entry["parity"]["max_abs_diff"] <= 1e-5
        spec = json.loads((tmp_path / tflite.SPEC_FILE).read_text())
        assert spec["inputs"][1] == {"name": "x", "kind": "test_pair",
                                     "shape": [1], "dtype": "float32"}
    else:
        assert REFUSAL in info["tflite"]["skipped"]
        assert "test_pair" in info["tflite"]["skipped"]
        assert not (tmp_path / tflite.TFLITE_FILE).exists()
