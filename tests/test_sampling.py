"""Tests for tfdssm.model.sampling.NegativeSampler."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pytest
import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.model.sampling import NegativeSampler

IDS = np.array([f"item{i}" for i in range(8)])
TITLES = np.array([f"title of item{i}" for i in range(8)])
PRICES = np.arange(8, dtype=np.float32) * 1.5


def _draw_indices(sampler: NegativeSampler, rounds: int = 1) -> np.ndarray:
    lookup = {v: i for i, v in enumerate(IDS)}
    out = []
    for _ in range(rounds):
        features, _ = sampler.sample()
        out += [lookup[v.decode()] for v in features["id"].numpy()]
    return np.asarray(out)


def test_sample_shapes_and_dtypes():
    sampler = NegativeSampler({"id": IDS, "title": TITLES, "price": PRICES}, 16)
    features, probability = sampler.sample()
    assert set(features) == {"id", "title", "price"}
    for column in features.values():
        assert column.shape == (16,)
    assert features["id"].dtype == tf.string
    assert features["price"].dtype == tf.float32
    assert probability.shape == (16,)
    assert probability.dtype == tf.float32
    assert sampler.num_negatives == 16
    assert sampler.distribution == "uniform"


def test_sampled_columns_are_aligned():
    sampler = NegativeSampler({"id": IDS, "title": TITLES, "price": PRICES}, 64, seed=3)
    for _ in range(3):
        features, _ = sampler.sample()
        ids = [v.decode() for v in features["id"].numpy()]
        titles = [v.decode() for v in features["title"].numpy()]
        prices = features["price"].numpy()
        assert titles == [f"title of {i}" for i in ids]
        np.testing.assert_allclose(prices, [1.5 * int(i[4:]) for i in ids])


def test_uniform_draws_every_candidate_with_probability_one_over_n():
    sampler = NegativeSampler({"id": IDS}, 400, seed=1)
    index = _draw_indices(sampler, rounds=5)
    counts = np.bincount(index, minlength=len(IDS))
    assert (counts > 0).all()
    # 2000 draws over 8 candidates: 250 expected each, sd ~ 14.8.
    assert np.abs(counts - 250).max() < 80
    _, probability = sampler.sample()
    np.testing.assert_allclose(probability.numpy(), 1.0 / len(IDS), rtol=1e-6)


def test_popularity_frequencies_follow_smoothed_counts():
    counts = np.array([1, 2, 5, 10, 20, 50, 100, 400], dtype=np.float64)
    sampler = NegativeSampler(
        {"id": IDS}, 20000, distribution="popularity", counts=counts, seed=0
    )
    assert sampler.distribution == "popularity"
    expected = counts**0.75 / (counts**0.75).sum()
    features, probability = sampler.sample()
    lookup = {v: i for i, v in enumerate(IDS)}
    index = np.array([lookup[v.decode()] for v in features["id"].numpy()])
    # Each draw reports its own probability under the sampler.
    np.testing.assert_allclose(probability.numpy(), expected[index], rtol=1e-5)
    observed = np.bincount(index, minlength=len(IDS))
    want = expected * len(index)
    chi2 = ((observed - want) ** 2 / want).sum()
    assert chi2 < 30.0  # 7 degrees of freedom: p(chi2 > 30) ~ 1e-4
    # ... and clearly not the raw counts (alpha=1) nor uniform.
    for other in (counts / counts.sum(), np.full(8, 1 / 8)):
        alt = other * len(index)
        assert ((observed - alt) ** 2 / alt).sum() > 200.0


def test_popularity_alpha_and_zero_counts():
    counts = np.array([0, 1, 1, 2, 0, 0, 4, 0], dtype=np.float64)
    sampler = NegativeSampler(
        {"id": IDS}, 4000, distribution="popularity", counts=counts, alpha=1.0
    )
    index = _draw_indices(sampler)
    observed = np.bincount(index, minlength=len(IDS))
    assert observed[counts == 0].sum() == 0  # never drawn
    np.testing.assert_allclose(observed / len(index), counts / counts.sum(), atol=0.04)


def test_same_seed_same_draws_and_draws_change_between_calls():
    a = NegativeSampler({"id": IDS}, 32, seed=7)
    b = NegativeSampler({"id": IDS}, 32, seed=7)
    c = NegativeSampler({"id": IDS}, 32, seed=8)
    first_a, first_b, first_c = _draw_indices(a), _draw_indices(b), _draw_indices(c)
    np.testing.assert_array_equal(first_a, first_b)
    assert not np.array_equal(first_a, first_c)
    assert not np.array_equal(first_a, _draw_indices(a))


def test_sample_inside_tf_function_advances():
    sampler = NegativeSampler({"id": IDS, "price": PRICES}, 32, seed=2)

    @tf.function
    def draw():
        features, probability = sampler.sample()
        return features["price"], probability

    first, probability = draw()
    second, _ = draw()
    assert first.shape == (32,)
    assert not np.array_equal(first.numpy(), second.numpy())
    np.testing.assert_allclose(probability.numpy(), 1 / 8, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(candidates={}, num_negatives=4), "non-empty"),
        (dict(candidates={"id": np.array([])}, num_negatives=4), "non-empty"),
        (dict(candidates={"id": IDS, "title": TITLES[:3]}, num_negatives=4),
         "equal length"),
        (dict(candidates={"id": IDS}, num_negatives=0), "num_negatives"),
        (dict(candidates={"id": IDS}, num_negatives=4, distribution="zipf"),
         "distribution"),
        (dict(candidates={"id": IDS}, num_negatives=4, distribution="popularity"),
         "counts"),
        (dict(candidates={"id": IDS}, num_negatives=4, distribution="popularity",
              counts=np.ones(3)), "counts"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NegativeSampler(**kwargs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "counts", [np.zeros(8), np.array([-1.0, 1, 1, 1, 1, 1, 1, 1])],
    ids=["all_zero", "negative"],
)
def test_popularity_rejects_degenerate_counts(counts):
    with pytest.raises(ConfigError, match="counts"):
        NegativeSampler({"id": IDS}, 4, distribution="popularity", counts=counts)
