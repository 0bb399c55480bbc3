"""Native info lines (ScaNN's absl logging) stay off stderr (export.native_logs)."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import os
import sys

import numpy as np
import tensorflow as tf

from tfdssm.export import index, native_logs


def test_info_lines_go_to_the_debug_log_and_the_rest_to_stderr(capfd, caplog):
    with caplog.at_level("DEBUG", logger="tfdssm"), native_logs.quiet_native_info():
        os.write(2, b"I0000 00:00:1796070038.07 1975 kmeans.h:90] ran in 8ms\n")
        os.write(2, b"E1130 20:13:52.100 1975 x.cc:1] a native error\n")
        os.write(2, b"W0000 00:00:1796074931.98 4848 gmm.cc:1] zero norm\n")
        print("python's own stderr", file=sys.stderr)
    os.write(2, b"I0000 00:00:1.0 1 y.cc:2] after the block\n")
    err = capfd.readouterr().err
    assert "a native error" in err and "python's own stderr" in err
    assert "ran in 8ms" not in err and "zero norm" not in err
    assert "after the block" in err
    assert "ran in 8ms" in caplog.text


def test_building_a_scann_index_prints_nothing(capfd):
    points = np.random.default_rng(0).standard_normal([600, 8]).astype(np.float32)
    ids = np.array([f"c{i}" for i in range(600)])
    spec = {"q": tf.TensorSpec([None, 8], tf.float32, name="q")}
    tf.reduce_sum(points)  # TensorFlow's own start-up lines (no GPU) come first
    capfd.readouterr()
    options = {"mode": "tree_ah", "num_leaves": 10, "num_leaves_to_search": 5,
               "training_sample_size": 600, "dimensions_per_block": 2,
               "anisotropic_quantization_threshold": 0.2, "reorder": 50}
    index.ScannRetrieval(lambda f: f["q"], spec, points, ids, max_k=5, options=options)
    assert capfd.readouterr().err == ""
