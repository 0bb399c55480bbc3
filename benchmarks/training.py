"""Training throughput: tfdssm's paper preset vs two PyTorch baselines.

Data: real text pairs from the Python standard library, available offline: the
query is an object's qualified name split into words (``os path join``), the
document its docstring (first 400 characters). All train the DSSM paper's tower
(30k trigram buckets -> 300 -> 300 -> 128, tanh) with Adam, on 2 threads:

* **tfdssm**: raw strings hashed once per run (the hash cache,
  :mod:`tfdssm.data.hash_cache`; also measured hashing in-graph in every step,
  and for a first epoch that pays the hashing), in-batch softmax, batch 1024,
  ``tfdssm.model.optimizers.Adam`` (what ``tfdssm train`` uses), one tower
  shared by queries and documents (``tfdssm train``'s default; also measured
  with two towers like the PyTorch baselines);
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
            if attr.startswith("_") or not (
                inspect.isroutine(obj) or inspect.isclass(obj)
            ):
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


def _tfdssm(frame: pd.DataFrame, batch: int, steps: int, rounds: int = 1,
            shared: bool = True) -> dict[str, list[float]]:
    """tfdssm's pairs/s, ``rounds`` times: hashing in-graph and with the hash
    cache (steady state, epochs after the first), and a first epoch with the
    cache built from scratch (the hashing a run pays once)."""
    import tensorflow as tf  # noqa: PLC0415

    from tfdssm.data import hash_cache, readers  # noqa: PLC0415
    from tfdssm.model import optimizers  # noqa: PLC0415
    from tfdssm.recipes import pairs  # noqa: PLC0415

    tf.keras.utils.set_random_seed(0)
    prepared = pairs.prepare(frame, hidden=HIDDEN, dim=DIM, num_buckets=BUCKETS,
                             max_length=MAX_LENGTH, test_fraction=0.0,
                             shared_towers=shared)
    model = prepared.model
    model.compile(optimizer=optimizers.Adam(1e-3))  # what `tfdssm train` uses
    layers = hash_cache.cacheable_columns(model)

    def cached(cache: hash_cache.HashCache) -> tf.data.Dataset:
        return hash_cache.make_cached_dataset(
            frame, prepared.features, layers, cache, batch, drop_remainder=True,
            candidate_id=model.candidate_id)

    strings = readers.make_dataset(frame, prepared.features, batch,
                                   drop_remainder=True).repeat()
    warm = cached(hash_cache.HashCache())
    repeated = warm.repeat()
    epoch_steps = len(frame) // batch
    out: dict[str, list[float]] = {"in-graph": [], "cached": [], "first epoch": []}

    def rate(dataset: Any, count: int | None) -> float:
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=count, epochs=1, verbose=0)
        return (count or epoch_steps) * batch / (time.perf_counter() - start)

    rate(strings, 2)  # trace and warm up both input signatures
    rate(repeated, 2)
    for _ in range(rounds):
        out["in-graph"].append(rate(strings, steps))
        out["cached"].append(rate(repeated, steps))
        start = time.perf_counter()
        fresh = cached(hash_cache.HashCache())  # hashes every text again
        model.fit(fresh, epochs=1, verbose=0)
        out["first epoch"].append(epoch_steps * batch / (time.perf_counter() - start))
    return out


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
                  fused: bool = False, ids: Any = None) -> float:
    import torch  # noqa: PLC0415

    torch.set_num_threads(2)
    torch.manual_seed(0)
    query_ids, doc_ids = ids or (_ids(list(frame["query"])), _ids(list(frame["doc"])))
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


def _median(values: list[float]) -> float:
    return float(np.median(values))


def run(quick: bool = False) -> dict[str, Any]:
    frame = stdlib_pairs()
    steps = 4 if quick else 15
    rounds = 1 if quick else 3
    # The machine is shared: tfdssm and the two PyTorch baselines take turns,
    # round after round, and each ratio is the median of its rounds' ratios.
    ours: dict[str, list[float]] = {}
    strong, fused = [], []
    ids = (_ids(list(frame["query"])), _ids(list(frame["doc"])))  # not timed
    for _ in range(rounds):
        for key, values in _tfdssm(frame, 1024, steps).items():
            ours.setdefault(key, []).extend(values)
        strong.append(_torch_strong(frame, 1024, steps, ids=ids))
        fused.append(_torch_strong(frame, 1024, steps, fused=True, ids=ids))
    two = _tfdssm(frame, 1024, steps, shared=False)
    seed = _torch_seed(frame, 1, 20 if quick else 100)
    batched = _torch_seed(frame, 256, 2 if quick else 4)
    cached = _median(ours["cached"])

    def ratios(base: list[float], key: str = "cached") -> float:
        return _median([a / b for a, b in zip(ours[key], base, strict=True)])

    # A step's time is 1 / rate: hashing's share of an in-graph step is
    # (t_in_graph - t_cached) / t_in_graph = 1 - rate_in_graph / rate_cached.
    in_graph_share = _median([1 - h / c for c, h in zip(
        ours["cached"], ours["in-graph"], strict=True)])
    rows = [
        ["tfdssm, hash cache (steady state: epochs after the first)", cached, 1.0],
        ["tfdssm, first epoch (hashing every text once, then training)",
         _median(ours["first epoch"]), cached / _median(ours["first epoch"])],
        ["tfdssm, hashing in-graph in every step (`--no-hash-cache`)",
         _median(ours["in-graph"]), cached / _median(ours["in-graph"])],
        ["tfdssm, two towers (like the PyTorch baselines), hash cache",
         _median(two["cached"]), cached / _median(two["cached"])],
        ["PyTorch strong (ids pre-hashed, EmbeddingBag)", _median(strong),
         ratios(strong)],
        ["PyTorch strong with fused Adam (`fused=True`)", _median(fused),
         ratios(fused)],
        ["PyTorch seed's way (dense 30k vectors, 4 negatives, 1 example/step)",
         seed, cached / seed],
        ["the seed's model and loss, batched 256", batched, cached / batched],
    ]
    markdown = (
        f"### Training: DSSM paper preset on {len(frame):,} real text pairs "
        f"(stdlib docstrings, median {int(frame['doc'].str.len().median())} chars)\n\n"
        + common.table(["implementation", "pairs/s", "tfdssm speed-up"], rows)
        + f"\n\nPairs/s are medians of {rounds} round(s); tfdssm and PyTorch take "
        "turns and each PyTorch speed-up is the median of the rounds' ratios. "
        "tfdssm trains one shared tower as `tfdssm train` does (the PyTorch "
        "baselines two; the two-tower row is tfdssm's like for like: "
        f"{_median(two['cached']) / _median(fused):.2f}× fused Adam, "
        f"{_median(two['cached']) / _median(strong):.2f}× plain). Hashing's "
        f"share of a step hashing in-graph: {100 * in_graph_share:.0f} %; with the "
        "hash cache no step hashes (0 %), the run hashes once before its first "
        "epoch.\n\nTargets: ≥ 80× the seed's way, ≥ 1.3× PyTorch strong, "
        "≥ 1.0× with fused Adam; hashing ≤ 10 % of a steady-state step.")
    return {"markdown": markdown, "rows": rows,
            "hashing_share_in_graph": in_graph_share}
