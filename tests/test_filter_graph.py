"""The ``top_k_filter`` graph's size: what loading a retrieval version and its
first call pay for (tracing only, nothing saved).

A larger graph costs ``tf.saved_model.load`` (every function is rebuilt in
Python), the first call (Grappler optimises every branch) and memory; see
docs/model_load.md. The filter rule is computed once whatever the number of
namespaces, and the ScaNN model's filtered search holds one oversampled and one
exact search.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import numpy as np
import pytest
import scann  # noqa: F401 - registers ScaNN's ops
import tensorflow as tf

from tfdssm.export import index, restricts


def _module(cls, namespaces: int):
    rng = np.random.default_rng(0)
    n, dim = 1200, 4
    embeddings = rng.normal(size=[n, dim]).astype(np.float32)
    names = [f"ns{i}" for i in range(namespaces)]
    labels = [{name: [f"t{(c + i) % 3}"] for i, name in enumerate(names)}
              for c in range(n)]
    spec = {"x": tf.TensorSpec([None, dim], tf.float32, name="x")}
    return cls(lambda features: features["x"], spec, embeddings,
               [f"m{c}" for c in range(n)], max_k=10,
               restricts=restricts.Restricts.from_tokens(labels, names))


def _functions(module) -> dict[str, list[str]]:
    """``{function name: op types}`` reachable from ``top_k_filter``."""
    graph = module.signatures()["top_k_filter"].get_concrete_function().graph
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    return {name: [node.op for node in f.node_def] for name, f in library.items()}


@pytest.mark.parametrize("cls", [index.BruteForceRetrieval, index.ScannRetrieval])
def test_filter_graph_does_not_grow_with_namespaces(cls):
    one, three = _functions(_module(cls, 1)), _functions(_module(cls, 3))
    # One union of the request's tokens (a while loop for the broad ones)
    # whatever the number of namespaces: the same functions, a few more
    # nodes (one name comparison per namespace).
    assert len(three) == len(one), (sorted(one), sorted(three))
    nodes = [sum(len(ops) for ops in f.values()) for f in (one, three)]
    assert nodes[1] - nodes[0] < 40, nodes
    assert sum(ops.count("While") for ops in three.values()) == 1


def test_scann_filtered_search_holds_each_path_once():
    ops = _functions(_module(index.ScannRetrieval, 2))
    scann_searches = sum(o.startswith("Scann>") and "Search" in o
                         for f in ops.values() for o in f)
    # One unfiltered search (an empty filter) and one oversampled search.
    assert scann_searches == 2, scann_searches
    # exact_search's three ways (one row, gathered, whole corpus) once each:
    # the exact path is in the graph once.
    brute = _functions(_module(index.BruteForceRetrieval, 2))
    wheres = [sum(o == "Where" for f in g.values() for o in f) for g in (ops, brute)]
    assert wheres[0] - wheres[1] <= 4, wheres
