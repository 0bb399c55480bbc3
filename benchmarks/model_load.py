"""What loading a retrieval SavedModel costs: one measurement per fresh process.

Run it against any tree (``PYTHONPATH`` picks the ``tfdssm`` measured):

    python benchmarks/model_load.py export OUT [--restrict genres,year]
    python benchmarks/model_load.py tf_load OUT/retrieval/1
    python benchmarks/model_load.py servable OUT/retrieval/1
    python benchmarks/model_load.py graph OUT/retrieval/1

Each mode prints one JSON line: ``export`` the training run's export step and
each retrieval model's save (seconds); ``tf_load`` the time and RSS growth of
``tf.saved_model.load`` (ScaNN imported first) and the first and second call
of every signature (the warm-up requests, plus ``top_k_filter`` with a real
allow token); ``servable`` the server's full load
(``tfdssm.serving.models.load_servable``: load + warm-up replay); ``graph``
the size of ``saved_model.pb`` and the nodes each signature's function reaches
(its own and every function it calls, conditional branches included).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time


def _rss_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def export(out: str, restrict: str = "") -> dict:
    import tfdssm  # noqa: F401  (Keras 2 first)
    from tfdssm.export import savedmodel
    from tfdssm.recipes import movielens
    from tfdssm.training import run as train

    timings: dict[str, float] = {}
    saves: list[float] = []
    real_export, real_save = savedmodel.export_model, savedmodel.save_retrieval

    def timed_export(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_export(*args, **kwargs)
        finally:
            timings["export_s"] = time.perf_counter() - start

    def timed_save(module, export_dir, name, query_row):
        start = time.perf_counter()
        try:
            return real_save(module, export_dir, name, query_row)
        finally:
            timings[f"save_{name}_s"] = time.perf_counter() - start
            saves.append(timings[f"save_{name}_s"])

    savedmodel.export_model = timed_export
    savedmodel.save_retrieval = timed_save
    prepared = movielens.prepare(verbose=False)
    columns = tuple(c for c in restrict.split(",") if c)
    start = time.perf_counter()
    train.run(prepared, out, epochs=1, verbose=0, restrict_columns=columns)
    timings["train_run_s"] = time.perf_counter() - start
    return {key: round(value, 3) for key, value in timings.items()}


def _requests(path: str) -> list:
    from tfdssm.export import warmup

    return warmup.read_warmup(path)


def tf_load(path: str) -> dict:
    import scann  # noqa: F401  (registers the ScaNN ops)
    import tensorflow as tf

    import tfdssm  # noqa: F401

    rss0 = _rss_mb()
    start = time.perf_counter()
    loaded = tf.saved_model.load(path)
    out = {"load_s": time.perf_counter() - start, "load_rss_mb": _rss_mb() - rss0}
    calls = []
    for request in _requests(path):
        inputs = {name: tf.constant(tf.make_ndarray(proto))
                  for name, proto in request.inputs.items()}
        calls.append((request.model_spec.signature_name, inputs))
    # top_k_filter with a real token (the warm-up one has an empty filter).
    restricts = getattr(loaded, "restricts", None)
    vocabulary = getattr(restricts, "vocabulary", None)
    if vocabulary is not None and int(tf.size(vocabulary)) > 1:
        tokens = [t.decode() for t in vocabulary.numpy().tolist() if t]
        token = next((t for t in tokens if t.startswith("genres=")), tokens[0])
        name, inputs = next(c for c in calls if c[0] == "top_k_filter")
        calls.append(("top_k_filter[allow]",
                      {**inputs, "allow": tf.constant([[token]])}))
    for name, inputs in calls:
        signature = loaded.signatures[name.split("[")[0]]
        for attempt in ("first", "second"):
            rss = _rss_mb()
            start = time.perf_counter()
            signature(**inputs)
            out[f"{attempt}_{name}_ms"] = (time.perf_counter() - start) * 1000
            if attempt == "first":
                out[f"first_{name}_rss_mb"] = _rss_mb() - rss
    out["total_rss_mb"] = _rss_mb() - rss0
    return {key: round(value, 3) for key, value in out.items()}


def servable(path: str) -> dict:
    import tensorflow as tf  # noqa: F401

    import tfdssm  # noqa: F401
    from tfdssm.serving import models

    directory = pathlib.Path(path)
    rss0 = _rss_mb()
    start = time.perf_counter()
    models.load_servable(directory.parent.name, int(directory.name), directory)
    return {"servable_s": round(time.perf_counter() - start, 3),
            "servable_rss_mb": round(_rss_mb() - rss0, 1)}


def graph(path: str) -> dict:
    from tensorflow.core.protobuf import saved_model_pb2

    pb = pathlib.Path(path) / "saved_model.pb"
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(pb.read_bytes())
    meta = proto.meta_graphs[0]
    functions = {f.signature.name: f for f in meta.graph_def.library.function}

    def called(node) -> list[str]:
        names = []
        for value in node.attr.values():
            if value.HasField("func"):
                names.append(value.func.name)
            names.extend(f.name for f in value.list.func)
        if node.op in functions:
            names.append(node.op)
        return names

    def reach(root: str) -> set[str]:
        seen, todo = set(), [root]
        while todo:
            name = todo.pop()
            if name in seen or name not in functions:
                continue
            seen.add(name)
            for node in functions[name].node_def:
                todo.extend(called(node))
        return seen

    out = {"saved_model_pb_bytes": pb.stat().st_size,
           "functions": len(functions),
           "nodes_all_functions": sum(len(f.node_def) for f in functions.values())}
    for name, signature in meta.signature_def.items():
        # The signature's graph node is a StatefulPartitionedCall of its function.
        outputs = {t.name.split(":")[0] for t in signature.outputs.values()}
        roots = [f for node in meta.graph_def.node if node.name in outputs
                 for f in called(node)]
        reached = set().union(*(reach(r) for r in roots)) if roots else set()
        out[f"{name}_functions"] = len(reached)
        out[f"{name}_nodes"] = sum(len(functions[f].node_def) for f in reached)
    return out


def main(argv: list[str]) -> int:
    mode, path, *rest = argv
    if mode == "export":
        restrict = rest[1] if rest[:1] == ["--restrict"] else ""
        result = export(path, restrict)
    else:
        result = {"tf_load": tf_load, "servable": servable, "graph": graph}[mode](path)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
