"""Training throughput: tfdssm's paper preset vs two PyTorch baselines.

Data: real text pairs from the Python standard library, available offline: the
query is an object's qualified name split into words (``os path join``), the
document its docstring (first 400 characters). All train the DSSM paper's tower
(30k trigram buckets -> 300 -> 300 -> 128, tanh) with Adam, on 2 threads:

* **tfdssm**: raw strings in, hashing in-graph, in-batch softmax, batch 1024,
  ``tfdssm.model.optimizers.Adam`` (what ``tfdssm train`` uses);
* **PyTorch, strong**: trigram ids hashed once up front (not timed) into numpy
  arrays, ``nn.EmbeddingBag(30000, 300, mode="sum")`` -> tanh -> 300 -> tanh ->
  128, in-batch softmax, batch 1024; ``torch.optim.Adam`` as it comes, and again
  with ``fused=True`` (its single-kernel update, the analogue of ours);
* **PyTorch, the seed's way** (seed 000): its ``DSSMWrapper.train_step`` on one
  (query, positive, 4 random negatives) example per step, one tower shared by
  queries and documents (``nn.Linear(30000, 300)`` -> tanh -> 300 -> tanh ->
  128), dense 30k count vectors built in Python, gamma = 10 cosine softmax;
* **the seed's model, batched**: the same model and loss on 256 examples per
  step (not the seed's code; shows how much of the gap is batching alone).
"""

from __future__ import annotations

import importlib
import inspect
import re
import time
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import common
from tfdssm.text.hashing import trigram_ids_py
from tfdssm.text.normalize import encode_text

MODULES = (
    "os", "re", "json", "collections", "itertools", "functools", "pathlib", "typing",
    "argparse", "logging", "urllib.parse", "unittest", "asyncio", "subprocess",
    "shutil", "tarfile", "zipfile", "csv", "datetime", "decimal", "statistics",
    "random", "string", "textwrap", "difflib", "inspect", "ast", "pickle", "sqlite3",
    "threading", "socket", "configparser", "tempfile", "glob", "io", "codecs",
    "calendar", "heapq", "bisect", "enum", "dataclasses", "contextlib", "math",
    "operator", "copy", "pprint", "weakref", "types", "traceback", "warnings", "time",
    "queue", "hashlib", "base64", "struct", "zlib", "gzip", "uuid", "ipaddress",
    "email.utils", "mimetypes", "http.client", "tokenize", "shlex", "timeit", "doctest",
)
BUCKETS, HIDDEN, DIM, MAX_LENGTH = 30000, (300, 300), 128, 400


def stdlib_pairs() -> pd.DataFrame:
    """(qualified name as words, docstring) pairs from the standard library."""
    rows = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr, obj in inspect.getmembers(module):
            if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            members = [(attr, obj)]
            if inspect.isclass(obj):
                members += [(f"{attr}.{m}", o) for m, o in vars(obj).items()
                             if not m.startswith("_") and inspect.isroutine(o)]
            for qualified, item in members:
                doc = inspect.getdoc(item)
                if doc and len(doc) > 40:
                    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", f"{name}.{qualified}")
                    query = re.sub(r"[._]+", " ", words).lower()
                    rows.append((query, " ".join(doc.split())[:MAX_LENGTH]))
    return pd.DataFrame(rows, columns=["query", "doc"]).drop_duplicates("query")


def _tfdssm(frame: pd.DataFrame, batch: int, steps: int) -> float:
    import tensorflow as tf  # noqa: PLC0415

    from tfdssm.model import optimizers  # noqa: PLC0415
    from tfdssm.recipes import pairs  # noqa: PLC0415

    prepared = pairs.prepare(frame, hidden=HIDDEN, dim=DIM, num_buckets=BUCKETS,
                             max_length=MAX_LENGTH, test_fraction=0.0)
    model = prepared.model
    model.compile(optimizer=optimizers.Adam(1e-3))  # what `tfdssm train` uses
    data = tf.data.Dataset.from_tensor_slices(
        {"query": frame["query"].to_numpy(), "doc": frame["doc"].to_numpy()}
    ).shuffle(len(frame), seed=0).repeat().batch(batch, drop_remainder=True)
    data = data.prefetch(tf.data.AUTOTUNE)
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch / (time.perf_counter() - start)


def _torch_tower(torch: Any) -> Any:
    nn = torch.nn
    return nn.ModuleDict({"first": nn.EmbeddingBag(BUCKETS, HIDDEN[0], mode="sum"),
                          "rest": nn.Sequential(
                              nn.Tanh(), nn.Linear(HIDDEN[0], HIDDEN[1]), nn.Tanh(),
                              nn.Linear(HIDDEN[1], DIM), nn.Tanh())})


def _ids(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(trigram_ids_py(encode_text(t, MAX_LENGTH).tolist(), BUCKETS),
                       np.int64) for t in texts]


def _torch_strong(frame: pd.DataFrame, batch: int, steps: int,
                  fused: bool = False) -> float:
    import torch  # noqa: PLC0415

    torch.set_num_threads(2)
    torch.manual_seed(0)
    query_ids, doc_ids = _ids(list(frame["query"])), _ids(list(frame["doc"]))
    towers = [_torch_tower(torch) for _ in range(2)]
    optimizer = torch.optim.Adam([p for t in towers for p in t.parameters()], 1e-3,
                                 fused=fused)
    rng = np.random.default_rng(0)

    def encode(tower: Any, rows: list[np.ndarray]) -> Any:
        offsets = np.cumsum([0] + [len(r) for r in rows[:-1]])
        out = tower["rest"](tower["first"](torch.from_numpy(np.concatenate(rows)),
                                           torch.from_numpy(offsets)))
        return torch.nn.functional.normalize(out, dim=1)

    def step() -> None:
        index = rng.integers(0, len(frame), batch)
        q = encode(towers[0], [query_ids[i] for i in index])
        d = encode(towers[1], [doc_ids[i] for i in index])
        loss = torch.nn.functional.cross_entropy(q @ d.T / 0.05, torch.arange(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def _seed_vectors(texts: list[str]) -> np.ndarray:
    out = np.zeros([len(texts), BUCKETS], np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            marked = f"#{word}#"
            for i in range(len(marked) - 2):
                out[row, hash(marked[i : i + 3]) % BUCKETS] += 1.0
    return out


def _seed_tower(torch: Any) -> Any:
    nn = torch.nn
    return nn.Sequential(nn.Linear(BUCKETS, HIDDEN[0]), nn.Tanh(),
                         nn.Linear(HIDDEN[0], HIDDEN[1]), nn.Tanh(),
                         nn.Linear(HIDDEN[1], DIM))


def _torch_seed(frame: pd.DataFrame, batch: int, steps: int) -> float:
    """Seed 000's training loop: one shared tower, ``batch`` examples a step.

    With ``batch=1`` this is the seed's ``train_step`` as written (its loss sums
    over everything, so it is only right for one example per step); larger
    batches apply the same loss per example.
    """
    import torch  # noqa: PLC0415

    torch.set_num_threads(2)
    torch.manual_seed(0)
    tower = _seed_tower(torch)
    optimizer = torch.optim.Adam(tower.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    queries, docs = list(frame["query"]), list(frame["doc"])
    cosine = torch.nn.functional.cosine_similarity

    def step() -> None:
        index = rng.integers(0, len(frame), batch)
        negatives = rng.integers(0, len(frame), [4, batch])
        query = tower(torch.from_numpy(_seed_vectors([queries[i] for i in index])))
        positive = tower(torch.from_numpy(_seed_vectors([docs[i] for i in index])))
        negative = [tower(torch.from_numpy(_seed_vectors([docs[i] for i in row])))
                    for row in negatives]
        cosines = torch.stack([cosine(query, positive)]
                              + [cosine(query, n) for n in negative], 1)
        loss = torch.nn.functional.cross_entropy(
            10.0 * cosines, torch.zeros(batch, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def run(quick: bool = False) -> dict[str, Any]:
    frame = stdlib_pairs()
    steps = 4 if quick else 15
    ours = _tfdssm(frame, 1024, steps)
    strong = _torch_strong(frame, 1024, steps)
    fused = _torch_strong(frame, 1024, steps, fused=True)
    seed = _torch_seed(frame, 1, 20 if quick else 100)
    batched = _torch_seed(frame, 256, 2 if quick else 4)
    rows = [
        ["tfdssm (hashing in-graph)", ours, 1.0],
        ["PyTorch strong (ids pre-hashed, EmbeddingBag)", strong, ours / strong],
        ["PyTorch strong with fused Adam (`fused=True`)", fused, ours / fused],
        ["PyTorch seed's way (dense 30k vectors, 4 negatives, 1 example/step)",
         seed, ours / seed],
        ["the seed's model and loss, batched 256", batched, ours / batched],
    ]
    markdown = (
        f"### Training: DSSM paper preset on {len(frame):,} real text pairs "
        f"(stdlib docstrings, median {int(frame['doc'].str.len().median())} chars)\n\n"
        + common.table(["implementation", "pairs/s", "tfdssm speed-up"], rows)
        + "\n\nTargets: ≥ 80× the seed's way, ≥ 1.0× the strong PyTorch baseline.")
    return {"markdown": markdown, "rows": rows}
