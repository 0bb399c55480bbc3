"""Tests for tfdssm.features.history (history features) and tfdssm.data.history
(history construction without leakage)."""

from __future__ import annotations

import math

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfdssm import export
from tfdssm.data import history as pipeline
from tfdssm.errors import ConfigError, DataError
from tfdssm.export import warmup
from tfdssm.features import CategoricalFeature, feature_from_config
from tfdssm.features.history import (
    ContextFeature,
    HistoryEmbedding,
    HistoryFeature,
    history_features,
)
from tfdssm.model.dssm import DSSM
from tfdssm.model.shared import link_shared_embeddings
from tfdssm.model.towers import Tower

ITEMS = tuple(str(i) for i in range(1, 21))
DAY = 86400.0


def layer_for(pooling: str, max_length: int = 5, now: bool = False,
              half_life_days: float = 2.0) -> HistoryEmbedding:
    spec = HistoryFeature("h", ITEMS, embedding_dim=4, max_length=max_length,
                          pooling=pooling, half_life=half_life_days,
                          timestamps=None if pooling in ("mean", "sum") else "h_ts",
                          now="now" if now else None)
    return spec.make_layer()


def reference(layer: HistoryEmbedding, ids: str, stamps: str | None = None,
              now: float | None = None) -> np.ndarray:
    """numpy pooling of one history, item vectors looked up one by one."""
    tokens = [t for t in ids.split("|") if t.strip()][-layer.max_length:]
    if not tokens:
        return np.zeros(layer.output_dim)
    vectors = np.stack([layer.items(tf.constant([t])).numpy()[0] for t in tokens])
    if layer.pooling == "mean":
        return vectors.mean(axis=0)
    if layer.pooling == "sum":
        return vectors.sum(axis=0)
    times = np.array([float(t) for t in stamps.split("|") if t.strip()],
                     np.float64)[-layer.max_length:]
    ref = times.max() if now is None else now
    weights = 2.0 ** (-np.maximum(ref - times, 0.0) / layer.half_life_seconds)
    if layer.pooling == "time_decay":
        weights /= weights.sum()
    return (weights[:, None] * vectors).sum(axis=0)


T0 = 881250949
HISTORIES = [  # (ids, timestamps): short, empty, over-long, with empty tokens
    ("3|7|12", f"{T0}|{T0 + 3 * 86400}|{T0 + 10 * 86400}"),
    ("", ""),
    ("|".join(str(i) for i in range(1, 10)),
     "|".join(str(T0 + i * 40000) for i in range(1, 10))),
    ("5||9|", f"{T0 + 7200}||{T0 + 90000}|"),
    ("99|4", f"{T0}|{T0 + 20 * 86400}"),  # "99": unknown id (OOV row)
]


@pytest.mark.parametrize("pooling", ["time_decay", "time_decay_sum"])
def test_time_decay_matches_numpy_reference(pooling):
    layer = layer_for(pooling, now=True)
    now = np.array([T0 + 12 * DAY, T0 + 1, T0 + 5 * DAY, T0 + 2 * DAY,
                    T0 + 10 * DAY], np.float32)
    got = layer({"ids": tf.constant([h for h, _ in HISTORIES]),
                 "timestamps": tf.constant([t for _, t in HISTORIES]),
                 "now": tf.constant(now)}).numpy()
    for row, (ids, stamps) in enumerate(HISTORIES):
        want = reference(layer, ids, stamps, float(now[row]))
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-6)
    assert np.abs(got[0]).sum() > 0 and not got[1].any()  # empty -> zeros


def test_time_decay_without_now_uses_the_latest_event_and_ignores_a_shift():
    layer = layer_for("time_decay")
    ids = tf.constant([h for h, _ in HISTORIES])
    stamps = [t for _, t in HISTORIES]
    got = layer({"ids": ids, "timestamps": tf.constant(stamps)}).numpy()
    for row, (history, times) in enumerate(HISTORIES):
        np.testing.assert_allclose(got[row], reference(layer, history, times),
                                   rtol=1e-5, atol=1e-6)
    # Normalised weights: the same events 30 days later give the same vector,
    # and "now" only clips (an event after now counts as age 0).
    later = ["|".join(str(int(t) + 30 * 86400) if t else "" for t in s.split("|"))
             for s in stamps]
    shifted = layer({"ids": ids, "timestamps": tf.constant(later)}).numpy()
    np.testing.assert_allclose(shifted, got, rtol=1e-5, atol=1e-6)
    with_now = layer_for("time_decay", now=True)
    with_now.items = layer.items
    far = with_now({"ids": ids, "timestamps": tf.constant(stamps),
                    "now": tf.fill([len(stamps)], float(T0 + 400 * DAY))}).numpy()
    np.testing.assert_allclose(far, got, rtol=1e-4, atol=1e-6)


def test_time_decay_sum_fades_with_query_time():
    layer = layer_for("time_decay_sum", now=True, half_life_days=1.0)
    inputs = {"ids": tf.constant(["3"]), "timestamps": tf.constant([str(T0)])}
    fresh = layer({**inputs, "now": tf.constant([float(T0)])}).numpy()
    old = layer({**inputs, "now": tf.constant([float(T0 + 2 * DAY)])}).numpy()
    np.testing.assert_allclose(old, fresh / 4, rtol=1e-4)  # two half-lives


@pytest.mark.parametrize("pooling", ["mean", "sum", "time_decay", "attention"])
def test_over_long_history_keeps_the_most_recent_items(pooling):
    layer = layer_for(pooling, max_length=3)
    ids = "|".join(str(i) for i in range(1, 11))  # 10 items, most recent last
    stamps = "|".join(str(T0 + i * 3600) for i in range(1, 11))
    inputs = {"ids": tf.constant([ids, "8|9|10"])}
    if pooling not in ("mean", "sum"):
        inputs["timestamps"] = tf.constant([stamps, "|".join(stamps.split("|")[-3:])])
    got = layer(inputs).numpy()
    np.testing.assert_allclose(got[0], got[1], rtol=1e-6, atol=1e-7)
    if pooling in ("mean", "sum"):
        np.testing.assert_allclose(got[0], reference(layer, ids), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "sum", "time_decay", "attention"])
def test_empty_histories_give_zeros(pooling):
    layer = layer_for(pooling)
    inputs = {"ids": tf.constant(["", " ", "||"])}
    if pooling in ("time_decay", "attention"):
        inputs["timestamps"] = tf.constant(["", "", "|"])
    got = layer(inputs).numpy()
    assert got.shape == (3, 4) and not got.any()


def test_attention_weights_are_a_distribution():
    spec = HistoryFeature("h", ITEMS, embedding_dim=4, pooling="attention")
    layer = spec.make_layer()
    one = layer({"ids": tf.constant(["7"])}).numpy()
    same = layer({"ids": tf.constant(["7|7|7"])}).numpy()  # any weights: same vector
    np.testing.assert_allclose(same, one, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(one[0], layer.items(tf.constant(["7"])).numpy()[0],
                               rtol=1e-5)
    two = layer({"ids": tf.constant(["7|8"])}).numpy()[0]
    a, b = (layer.items(tf.constant([x])).numpy()[0] for x in "78")
    weight = float(np.linalg.lstsq(np.stack([a - b]).T, two - b, rcond=None)[0][0])
    assert 0.0 < weight < 1.0
    assert len(layer.trainable_weights) == 4  # items, attention W and bias, v


def test_mismatched_timestamps_are_rejected():
    layer = layer_for("time_decay")
    with pytest.raises(tf.errors.InvalidArgumentError, match="as many timestamps"):
        layer({"ids": tf.constant(["1|2"]), "timestamps": tf.constant([str(T0)])})
    with pytest.raises(tf.errors.InvalidArgumentError):
        layer({"ids": tf.constant(["1"]), "timestamps": tf.constant(["yesterday"])})


def test_layer_and_spec_config_round_trip():
    layer = layer_for("time_decay", now=True)
    clone = HistoryEmbedding.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert isinstance(restored, HistoryEmbedding) and restored.pooling == "time_decay"
    context = ContextFeature("t", "string").make_layer()
    assert type(context).from_config(context.get_config()).get_config() == (
        context.get_config())
    assert context.read_columns({"t": tf.constant(["1"])}) is None
    for spec in history_features("h", timestamps="h_ts", now="now",
                                 pooling="time_decay_sum", vocabulary=ITEMS):
        assert feature_from_config(spec.to_config()) == spec
    assert HistoryFeature("h", ITEMS, half_life=12,
                          half_life_unit="hours").half_life_seconds == 12 * 3600.0


@pytest.mark.parametrize("kwargs, message", [
    ({"pooling": "max"}, "pooling must be one of"),
    ({"pooling": "time_decay"}, "needs timestamps"),
    ({"pooling": "time_decay_sum", "timestamps": "t"}, "pass now="),
    ({"now": "now"}, "only used with timestamps"),
    ({"half_life_unit": "weeks"}, "half_life_unit must be one of"),
    ({"half_life": 0}, "half_life must be a positive"),
    ({"max_length": 0}, "max_length must be >= 1"),
])
def test_spec_errors_say_what_to_do(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HistoryFeature("h", ITEMS, **kwargs)


def test_layer_needs_a_vocabulary_or_a_shared_embedding():
    with pytest.raises(ConfigError, match="neither a vocabulary nor a shared"):
        HistoryFeature("h").make_layer()
    with pytest.raises(ConfigError, match="value_type"):
        ContextFeature("t", "int64")


# --------------------------------------------------------------------------- #
# In a tower, sharing the candidate tower's item embedding, exported.
# --------------------------------------------------------------------------- #


def shared_model() -> DSSM:
    history = history_features("history", timestamps="history_ts", now="now",
                               pooling="time_decay", shared_embedding="item",
                               embedding_dim=6, half_life=3.0)
    user = Tower([CategoricalFeature("user", ("u1", "u2"), 4), *history],
                 hidden=(8,), output_dim=5, name="user_tower")
    item = Tower([CategoricalFeature("item", ITEMS, 6)], hidden=(), output_dim=5,
                 name="item_tower")
    return DSSM(user, item, candidate_id="item")


QUERIES = {
    "user": tf.constant(["u1", "u2", "u1"]),
    "history": tf.constant(["3|4|5", "", "20|1"]),
    "history_ts": tf.constant([f"{T0}|{T0 + 99}|{T0 + 5000}", "", f"{T0}|{T0 + 1}"]),
    "now": tf.constant([T0 + 9000.0, T0 + 1.0, T0 + 2.0]),
}


def test_shared_item_embedding_is_one_variable():
    model = shared_model()
    history_layer = model.query_tower.feature_layers[1]
    item_layer = model.candidate_tower.feature_layers[0]
    assert history_layer.items is item_layer
    model(dict(QUERIES, item=tf.constant(["3", "4", "5"])))
    table = item_layer.embedding.embeddings
    assert any(v is table for v in model.query_tower.trainable_variables)
    names = [id(v) for v in model.trainable_variables]
    assert len(names) == len(set(names))
    # One optimizer step moves the shared table once, seen by both towers.
    model.compile(optimizer=tf.keras.optimizers.SGD(0.5))
    before = table.numpy().copy()
    batch = dict(QUERIES, item=tf.constant(["3", "4", "5"]))
    model.fit(tf.data.Dataset.from_tensors(batch), verbose=0)
    assert not np.allclose(table.numpy(), before)
    rebuilt = DSSM.from_config(model.get_config())
    assert rebuilt.query_tower.feature_layers[1].items is (
        rebuilt.candidate_tower.feature_layers[0])


def test_unlinked_shared_history_says_how_to_link():
    spec = HistoryFeature("history", shared_embedding="item", embedding_dim=6)
    tower = Tower([spec], hidden=(), output_dim=3)
    with pytest.raises(ConfigError, match="link_shared_embeddings"):
        tower({"history": tf.constant(["1"])})
    other = Tower([CategoricalFeature("item", ITEMS, 6)], hidden=(), output_dim=3)
    assert link_shared_embeddings(tower, other) == 1
    assert tower({"history": tf.constant(["1"])}).shape == (1, 3)
    wrong = Tower([CategoricalFeature("item", ITEMS, 5)], hidden=(), output_dim=3)
    with pytest.raises(ConfigError, match="embedding_dim 6"):
        link_shared_embeddings(tower, wrong)
    with pytest.raises(ConfigError, match="not a categorical feature"):
        link_shared_embeddings(tower)


def test_tower_reads_context_columns_and_reports_missing_ones():
    model = shared_model()
    assert model.query_tower.feature_names == ["user", "history", "history_ts", "now"]
    out = model.query_tower(QUERIES)
    assert out.shape == (3, 5)
    with pytest.raises(DataError, match="history_ts"):
        model.query_tower({k: v for k, v in QUERIES.items() if k != "history_ts"})


def test_export_load_same_outputs_and_one_embedding_variable(tmp_path):
    model = shared_model()
    model(dict(QUERIES, item=tf.constant(["3", "4", "5"])))
    spec = export.signature_spec(model.query_tower)
    assert {n: s.dtype for n, s in spec.items()} == {
        "user": tf.string, "history": tf.string, "history_ts": tf.string,
        "now": tf.float32}
    saved = export.save_towers(model, tmp_path)
    loaded = tf.saved_model.load(str(saved))
    got = loaded.signatures["query"](**QUERIES)["embedding"].numpy()
    np.testing.assert_allclose(got, model.query_tower(QUERIES).numpy(), atol=1e-6)
    items = {"item": tf.constant(list(ITEMS))}
    np.testing.assert_allclose(loaded.signatures["candidate"](**items)["embedding"],
                               model.candidate_tower(items), atol=1e-6)
    # The SavedModel holds the shared table once: same parameter count.
    unique = {id(v): v for v in model.query_tower.variables
              + model.candidate_tower.variables}
    stored = [shape for name, shape in
              tf.train.list_variables(str(saved / "variables" / "variables"))
              if name.endswith("VARIABLE_VALUE")]
    assert len(stored) == len(unique)
    assert sum(int(np.prod(s)) for s in stored) == sum(
        int(np.prod(v.shape)) for v in unique.values())
    # The warm-up row (empty history) is a valid request.
    row = warmup.example_row(model.query_tower)
    assert row["history"] == "" and row["history_ts"] == "" and row["now"] == 0.0
    request = {k: tf.constant([v]) for k, v in row.items()}
    assert loaded.signatures["query"](**request)["embedding"].shape == (1, 5)


# --------------------------------------------------------------------------- #
# History construction: strictly earlier rows of the source, no leakage.
# --------------------------------------------------------------------------- #


def random_interactions(rows: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(1, 12, rows).astype(str),
        "movie_id": rng.integers(1, 60, rows).astype(str),
        "timestamp": T0 + rng.integers(0, 40, rows) * 1000,  # many ties
    })


def brute_force(row: pd.Series, source: pd.DataFrame, max_length: int) -> list[str]:
    earlier = source[(source["user_id"] == row["user_id"])
                     & (source["timestamp"] < row["timestamp"])]
    earlier = earlier.assign(_pos=np.arange(len(earlier))).sort_values(
        ["timestamp", "_pos"], kind="stable")
    return earlier["movie_id"].tolist()[-max_length:]


def test_histories_hold_only_strictly_earlier_rows_of_the_same_user():
    frame = random_interactions()
    built = pipeline.build_histories(frame, frame, max_length=7)
    assert list(built.index) == list(frame.index)
    for i, row in frame.iterrows():
        ids = [t for t in built.loc[i, "history"].split("|") if t]
        stamps = [int(t) for t in built.loc[i, "history_timestamps"].split("|") if t]
        assert ids == brute_force(row, frame, 7)
        assert len(stamps) == len(ids) and stamps == sorted(stamps)
        assert all(t < row["timestamp"] for t in stamps)  # ties left out


def test_held_out_rows_see_training_rows_only():
    frame = random_interactions(seed=1)
    train, test = frame.iloc[:300].reset_index(drop=True), frame.iloc[300:]
    train2, test2 = pipeline.add_history_columns(train, test, max_length=50)
    seen = set(zip(train["user_id"], train["movie_id"], train["timestamp"],
                   strict=True))
    for _, row in test2.iterrows():
        ids = [t for t in row["history"].split("|") if t]
        assert ids == brute_force(row, train, 50)
        stamps = [int(t) for t in row["history_timestamps"].split("|") if t]
        for movie, stamp in zip(ids, stamps, strict=True):
            assert (row["user_id"], movie, stamp) in seen  # a training rating
    assert len(train2) == len(train) and len(test2) == len(test)
    assert test2["history"].ne("").any()


def test_future_and_same_second_ratings_never_leak():
    frame = pd.DataFrame({"user_id": ["u"] * 4, "movie_id": ["a", "b", "c", "d"],
                          "timestamp": [10, 20, 20, 30]})
    built = pipeline.build_histories(frame, frame)
    assert built["history"].tolist() == ["", "a", "a", "a|b|c"]
    assert built["history_timestamps"].tolist() == ["", "10", "10", "10|20|20"]
    with pytest.raises(DataError, match="timestamp"):
        pipeline.build_histories(frame.drop(columns="timestamp"), frame)


def test_leave_last_out_test_row_gets_all_earlier_training_ratings(movielens_frame):
    from tfdssm.recipes import movielens

    frame = movielens_frame(60)
    frame["timestamp"] = T0 + np.arange(len(frame)) * 100
    frame.loc[frame.index[-1], "timestamp"] = frame["timestamp"].iloc[-2]  # a tie
    prepared = movielens.prepare(interactions=frame, split="leave_last_out",
                                 user_tower="history", hidden=(8,), dim=4,
                                 num_buckets=100, verbose=False)
    for _, row in prepared.test.iterrows():
        earlier = prepared.train[(prepared.train["user_id"] == row["user_id"])
                                 & (prepared.train["timestamp"] < row["timestamp"])]
        assert row["history"] == "|".join(earlier["movie_id"].tolist()[-50:])
    assert prepared.info["user_tower"] == "history"
    names = [f.name for f in prepared.features]
    assert "history" in names and "history_timestamps" in names
    assert math.isclose(prepared.info["half_life_days"], 7.0)
