"""tfdssm.model.optimizers.Adam: Keras Adam's update on the fused kernel."""

import tfdssm  # noqa: F401  - selects Keras 2 before TensorFlow is imported

# isort: split

import numpy as np
import pytest
import tensorflow as tf

from tfdssm.model.optimizers import Adam


def _train(optimizer, steps=5):
    """Runs ``steps`` updates with a dense and a sparse (IndexedSlices) gradient."""
    rng = np.random.default_rng(0)
    table = tf.Variable(rng.normal(size=[50, 4]).astype("float32"))
    kernel = tf.Variable(rng.normal(size=[4, 3]).astype("float32"))
    for step in range(steps):
        rows = tf.constant([step, 7, 7, 30 + step])  # repeated row: summed
        sparse = tf.IndexedSlices(
            tf.constant(rng.normal(size=[4, 4]).astype("float32")), rows,
            tf.constant([50, 4]))
        dense = tf.constant(rng.normal(size=[4, 3]).astype("float32"))
        optimizer.apply_gradients([(sparse, table), (dense, kernel)])
    return table.numpy(), kernel.numpy()


@pytest.mark.parametrize("kwargs", [{}, {"learning_rate": 0.1, "beta_1": 0.8,
                                         "epsilon": 1e-3}])
def test_same_updates_as_keras_adam(kwargs):
    ours = _train(Adam(**kwargs))
    keras = _train(tf.keras.optimizers.Adam(**kwargs))
    for got, want in zip(ours, keras, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # ... and the update did something (rows never touched moved too: Adam's
    # momentum keeps moving rows seen in earlier steps).
    start, _ = _train(Adam(learning_rate=0.0), steps=1)
    assert not np.allclose(ours[0], start)


def test_inside_tf_function_and_amsgrad_fallback():
    for amsgrad in (False, True):
        optimizer = Adam(learning_rate=0.01, amsgrad=amsgrad)
        variable = tf.Variable([1.0, -2.0])

        @tf.function
        def step(opt=optimizer, var=variable):
            opt.apply_gradients([(tf.constant([0.5, -0.5]), var)])

        for _ in range(3):
            step()
        keras = tf.keras.optimizers.Adam(learning_rate=0.01, amsgrad=amsgrad)
        other = tf.Variable([1.0, -2.0])
        for _ in range(3):
            keras.apply_gradients([(tf.constant([0.5, -0.5]), other)])
        np.testing.assert_allclose(variable.numpy(), other.numpy(), rtol=1e-6)


def test_config_round_trip_and_checkpoint_compatible_with_keras_adam(tmp_path):
    optimizer = Adam(learning_rate=0.02, beta_2=0.99)
    restored = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(optimizer))
    assert type(restored) is Adam
    assert restored.get_config() == optimizer.get_config()
    # Same slot variables as Keras Adam: a checkpoint written by one restores
    # into the other.
    variable = tf.Variable([1.0, 2.0])
    optimizer.apply_gradients([(tf.constant([0.1, 0.2]), variable)])
    path = tf.train.Checkpoint(optimizer=optimizer, variable=variable).save(
        str(tmp_path / "ckpt"))
    keras = tf.keras.optimizers.Adam(learning_rate=0.02, beta_2=0.99)
    other = tf.Variable([0.0, 0.0])
    keras.build([other])
    tf.train.Checkpoint(optimizer=keras, variable=other).restore(path).assert_consumed()
    np.testing.assert_allclose(other.numpy(), variable.numpy())
    np.testing.assert_allclose(keras.variables[1].numpy(),
                               optimizer.variables[1].numpy())
