"""Where a training step's time goes: the paper preset at batch 1024.

    python -m benchmarks.training_profile [--reps 10] [--two-towers]

Times the parts of one step of ``tfdssm train``'s model on the training suite's
data (stdlib docstrings), each as its own compiled function, median of
``--reps`` runs after a warm-up:

* input pipeline: pulling one batch (raw strings; cached ids);
* hashing: :meth:`TextEmbedding.hash_ids` of a batch's query and doc texts;
* bag: the trigram bags of the batch's ids (forward; forward + backward);
* forward: the whole loss on cached ids (bags, MLP, in-batch softmax);
* forward + backward: the loss and its gradients;
* step: forward, backward and the Adam update (``model.train_step``), on cached
  ids and on raw strings (hashing in-graph).

MLP + loss = forward - bag forward; backward = (forward + backward) - forward;
optimizer = step - (forward + backward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import tfdssm  # noqa: F401  (Keras 2 before TensorFlow)
from benchmarks import training

CLOCK = time.perf_counter  # main(--cpu-time) uses time.process_time


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = CLOCK()
        out = fn()
        if hasattr(out, "numpy"):
            out.numpy()
        times.append(CLOCK() - start)
    return 1000 * statistics.median(times)


def _total(gradients: list[Any]) -> Any:
    """Sums gradients without densifying ``IndexedSlices`` (which the
    optimizer may avoid)."""
    import tensorflow as tf  # noqa: PLC0415

    return tf.add_n([tf.reduce_sum(getattr(g, "values", g)) for g in gradients])


def profile(reps: int = 10, shared: bool = True, batch: int = 1024) -> dict[str, float]:
    """Milliseconds of each part of a step (see the module docstring)."""
    import tensorflow as tf  # noqa: PLC0415

    from tfdssm.data import hash_cache  # noqa: PLC0415
    from tfdssm.model import optimizers  # noqa: PLC0415
    from tfdssm.recipes import pairs  # noqa: PLC0415

    frame = training.stdlib_pairs()
    tf.keras.utils.set_random_seed(0)
    prepared = pairs.prepare(frame, hidden=training.HIDDEN, dim=training.DIM,
                             num_buckets=training.BUCKETS,
                             max_length=training.MAX_LENGTH, test_fraction=0.0,
                             shared_towers=shared)
    model = prepared.model
    model.compile(optimizer=optimizers.Adam(1e-3))
    layers = hash_cache.cacheable_columns(model)
    strings = {n: tf.constant(frame[n].to_numpy()[:batch].astype(str))
               for n in ("query", "doc")}
    start = time.perf_counter()
    cache = hash_cache.HashCache()
    cached_data = hash_cache.make_cached_dataset(
        frame, prepared.features, layers, cache, batch, drop_remainder=True,
        candidate_id=model.candidate_id).repeat()
    build_ms = 1000 * (time.perf_counter() - start)
    from tfdssm.data import readers  # noqa: PLC0415

    string_data = readers.make_dataset(frame, prepared.features, batch,
                                       drop_remainder=True).repeat()
    cached_batch = next(iter(cached_data))
    string_batch = next(iter(string_data))
    string_iter, cached_iter = iter(string_data), iter(cached_data)
    out: dict[str, float] = {"rows": float(len(frame)), "cache_build": build_ms}
    out["input strings"] = _median_ms(lambda: next(string_iter), reps)
    out["input cached"] = _median_ms(lambda: next(cached_iter), reps)

    hash_fn = tf.function(lambda s: [layers[n].hash_ids(s[n]) for n in s])
    out["hashing"] = _median_ms(lambda: hash_fn(strings)[0].flat_values, reps)

    bag_layers = {n: layers[n] for n in ("query", "doc")}
    variables = list({id(v): v for lay in bag_layers.values()
                      for v in lay.trainable_variables}.values())

    @tf.function
    def bag_forward(b: dict) -> tf.Tensor:
        return tf.add_n([tf.reduce_sum(bag_layers[n](b[n])) for n in bag_layers])

    @tf.function
    def bag_both(b: dict) -> Any:
        with tf.GradientTape() as tape:
            total = tf.add_n([tf.reduce_sum(tf.tanh(bag_layers[n](b[n])))
                              for n in bag_layers])
        return _total(tape.gradient(total, variables))

    out["bag forward"] = _median_ms(lambda: bag_forward(cached_batch), reps)
    out["bag forward+backward"] = _median_ms(lambda: bag_both(cached_batch), reps)

    @tf.function
    def forward(b: dict) -> tf.Tensor:
        return model.compute_loss(b, training=True)

    @tf.function
    def forward_backward(b: dict) -> Any:
        with tf.GradientTape() as tape:
            loss = model.compute_loss(b, training=True)
        grads = tape.gradient(loss, model.trainable_variables)
        return _total(grads)

    out["forward"] = _median_ms(lambda: forward(cached_batch), reps)
    out["forward+backward"] = _median_ms(lambda: forward_backward(cached_batch), reps)
    step = tf.function(model.train_step)
    out["step cached"] = _median_ms(lambda: step(cached_batch)["loss"], reps)
    out["step strings"] = _median_ms(lambda: step(string_batch)["loss"], reps)
    out["mlp+loss"] = out["forward"] - out["bag forward"]
    out["backward"] = out["forward+backward"] - out["forward"]
    out["optimizer"] = out["step cached"] - out["forward+backward"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--two-towers", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="CPU time of this "
                        "process (all threads) instead of wall time: steadier on "
                        "a shared machine")
    args = parser.parse_args(argv)
    global CLOCK  # noqa: PLW0603
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    result = profile(args.reps, shared=not args.two_towers)
    for name, value in result.items():
        print(f"{name:>22}: {value:8.1f}" + ("" if name == "rows" else " ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
