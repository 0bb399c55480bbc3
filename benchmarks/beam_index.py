"""``tfdssm index`` (Apache Beam) against single-process embedding; a 2-shard
front against one index.

1. Embedding throughput. A one-epoch pairs model (text towers, 64-d) embeds a
   synthetic corpus of N documents (Parquet, 8 files; ``make bench``: 1,000,000
   rows, ``--quick``: 50,000):

   * baseline, today's path: one process reads the corpus with pandas and
     embeds it with ``tfdssm.model.runner.embed`` (batches of 1024) over the
     towers SavedModel's ``candidate`` signature, as ``tfdssm train`` does;
   * ``tfdssm index``'s pipeline (``tfdssm.indexing.embed_corpus``): read,
     RunInference, write embedding records, read them back; DirectRunner engine,
     ``multi_processing`` with 2 workers (the local default), and ``in_memory``
     with 1 worker.

   Each runs in its own process; reported: rows/s over the work (from loading
   the towers to the embeddings in memory; Beam's worker start-up included,
   the interpreter's TensorFlow import not), the ratio to the baseline, and
   peak RSS (the process; for Beam also the largest worker process).
2. Scatter-gather. The same corpus (first ``min(N, 200,000)`` rows) indexed once
   and in 2 shards; three ``tfdssm serve`` processes (whole, shard 0, shard 1)
   and a front (``tfdssm serve --shards``). 4 client threads send brute-force
   ``top_k`` (k=10) for S seconds to the single index, then to the front:
   queries/s, p50, p99.

``python -m benchmarks.run --suite beam_index [--quick]``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from benchmarks import common

WORDS = ("apple banana cherry dates elder figs grape honey kiwi lemon mango nut olive "
         "pear quince rice salt tea vanilla walnut yam zest bread cake pie soup stew "
         "salad sauce roast grill bake fry boil fresh sweet sour spicy").split()


def _train_export(directory: pathlib.Path) -> pathlib.Path:
    import pandas as pd  # noqa: PLC0415

    from tfdssm.recipes import pairs  # noqa: PLC0415
    from tfdssm.training import run as train  # noqa: PLC0415

    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, 6)) for _ in range(500)]
    rows = [{"query": " ".join(rng.choice(d.split(), 2)), "doc": d, "doc_id": f"d{i}"}
            for i, d in enumerate(docs) for _ in range(4)]
    prepared = pairs.prepare(pd.DataFrame(rows), "query", "doc", "doc_id",
                             num_buckets=5000, hidden=(128,), dim=64)
    export_dir = directory / "export"
    train.run(prepared, export_dir, epochs=1, batch_size=256, verbose=0)
    return export_dir


def _corpus(directory: pathlib.Path, rows: int, files: int = 8) -> list[str]:
    import pandas as pd  # noqa: PLC0415

    rng = np.random.default_rng(1)
    paths = []
    per = -(-rows // files)
    for f in range(files):
        n = min(per, rows - f * per)
        words = rng.choice(WORDS, size=(n, 6))
        frame = pd.DataFrame({"doc_id": [f"c{f * per + i}" for i in range(n)],
                              "doc": [" ".join(w) for w in words]})
        path = directory / f"corpus-{f:02d}.parquet"
        frame.to_parquet(path, index=False)
        paths.append(str(path))
    return paths


_BASELINE = """
import json, resource, sys, time
start = time.perf_counter()
import tfdssm, numpy as np, pandas as pd, tensorflow as tf
from tfdssm.model.runner import embed
from tfdssm.export.loading import load_towers
work = time.perf_counter()
towers = load_towers(sys.argv[1])
frame = pd.concat([pd.read_parquet(p) for p in sys.argv[2:]])
vectors = embed(towers.signatures["candidate"],
                {"doc": frame["doc"].to_numpy(object)}, batch_size=1024)
end = time.perf_counter()
print(json.dumps({"rows": len(vectors), "seconds": end - start, "work": end - work,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_rss_mb": 0}))
"""

_BEAM = """
import json, logging, resource, sys, time
start = time.perf_counter()
import tfdssm
from tfdssm.indexing import embed_corpus
logging.getLogger("apache_beam").setLevel(logging.ERROR)
options = json.loads(sys.argv[2])
work = time.perf_counter()
[(vectors, ids, _)] = embed_corpus(sys.argv[1], sys.argv[3:], beam_args=options)
end = time.perf_counter()
print(json.dumps({"rows": len(ids), "seconds": end - start, "work": end - work,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_rss_mb":
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _measure(script: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, env=env, timeout=6 * 3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def embedding(export_dir: pathlib.Path, files: list[str]) -> list[list[Any]]:
    """Rows of the throughput table."""
    runs = [("single process (today: pandas + embed)", _measure(
        _BASELINE, str(export_dir), *files))]
    for label, options in (
        ("tfdssm index: DirectRunner, multi_processing, 2 workers", []),
        ("tfdssm index: DirectRunner, in_memory, 1 worker",
         ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]),
    ):
        runs.append((label, _measure(_BEAM, str(export_dir), json.dumps(options),
                                     *files)))
    base = runs[0][1]["rows"] / runs[0][1]["work"]
    rows = []
    for label, r in runs:
        rate = r["rows"] / r["work"]
        rows.append([label, r["rows"], round(r["seconds"], 1), round(r["work"], 1),
                     round(rate), f"{rate / base:.2f}x", round(r["rss_mb"]),
                     round(r["children_rss_mb"]) or "-"])
    return rows


def _load(target: str, features: list[str], seconds: float, threads: int = 4
          ) -> dict[str, float]:
    from tfdssm.client import Client  # noqa: PLC0415

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(target, timeout=30) as client:
            model = "retrieval_brute_force"
            client.top_k({"query": [features[0]]}, k=10, model=model)
            while time.monotonic() < stop:
                query = features[int(rng.integers(len(features)))]
                start = time.perf_counter()
                try:
                    client.top_k({"query": [query]}, k=10, model=model)
                except Exception:  # noqa: BLE001 - counted
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    ms = np.asarray(latencies) * 1000
    return {"qps": len(ms) / seconds, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "errors": errors[0]}


def scatter_gather(export_dir: pathlib.Path, files: list[str], seconds: float
                   ) -> list[list[Any]]:
    """Rows of the scatter-gather table."""
    from benchmarks.serving import start_serve  # noqa: PLC0415
    from tfdssm.indexing import reindex  # noqa: PLC0415

    local = ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]
    reindex.index_corpus(export_dir, files, max_k=50, beam_args=local)
    reindex.index_corpus(export_dir, files, num_shards=2, max_k=50, beam_args=local)
    rng = np.random.default_rng(2)
    queries = [" ".join(rng.choice(WORDS, 2)) for _ in range(200)]
    procs = []
    try:
        whole = start_serve(export_dir)
        procs.append(whole)
        shards = [start_serve(reindex.shard_dir(export_dir, i)) for i in range(2)]
        procs += shards
        single = _load(f"127.0.0.1:{whole.grpc_port}", queries, seconds)
        front_args = ",".join(f"127.0.0.1:{s.grpc_port}" for s in shards)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        front = subprocess.Popen(
            [sys.executable, "-m", "tfdssm.cli", "serve", "--shards", front_args,
             "--grpc-port", "0", "--rest-port", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        line = ""
        for line in front.stderr:
            if "gRPC on" in line:
                break
        port = line.split("gRPC on ")[1].split(",")[0].rsplit(":", 1)[1]
        try:
            sharded = _load(f"127.0.0.1:{port}", queries, seconds)
        finally:
            front.terminate()
            front.wait(30)
    finally:
        for proc in procs:
            proc.proc.terminate()
            proc.proc.wait(30)
    return [["one index (tfdssm serve)", round(single["qps"], 1),
             round(single["p50"], 1), round(single["p99"], 1), single["errors"],
             "1.00x"],
            ["2 shards + front (tfdssm serve --shards)", round(sharded["qps"], 1),
             round(sharded["p50"], 1), round(sharded["p99"], 1), sharded["errors"],
             f"{sharded['qps'] / single['qps']:.2f}x"]]


def run(quick: bool = False, rows: int | None = None) -> dict[str, Any]:
    rows = rows or (50_000 if quick else 1_000_000)
    seconds = 5.0 if quick else 20.0
    with tempfile.TemporaryDirectory(prefix="bench-beam-") as tmp:
        directory = pathlib.Path(tmp)
        export_dir = _train_export(directory)
        files = _corpus(directory, rows)
        throughput = embedding(export_dir, files)
        serve_files = files
        if rows > 200_000:
            (directory / "serve").mkdir()
            serve_files = _corpus(directory / "serve", 200_000)
        latency = scatter_gather(export_dir, serve_files, seconds)
    serve_rows = min(rows, 200_000)
    markdown = "\n\n".join([
        f"### tfdssm index (Apache Beam) vs single-process embedding, {rows:,} rows",
        common.table(["embedding", "rows", "process wall s", "work s", "rows/s (work)",
                      "vs baseline", "peak RSS MiB", "largest worker RSS MiB"],
                     throughput),
        "work s: from loading the towers to the embeddings in memory (the process's "
        "Python + TensorFlow import excluded; Beam's worker start-up included).",
        f"### Scatter-gather: 2 shards behind a front vs one index, {serve_rows:,} "
        f"candidates, brute force top-10, 4 client threads x {seconds:g} s",
        common.table(["served by", "queries/s", "p50 ms", "p99 ms", "errors",
                      "vs one index"], latency),
    ])
    return {"markdown": markdown, "throughput": throughput, "latency": latency}


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else None
    print(run(quick=size is None, rows=size)["markdown"])
