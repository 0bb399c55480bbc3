"""``tfdssm serve`` under load, as a separate process on loopback ports.

In CI, 1 and 8 concurrent gRPC clients (one channel each) for 1 s, then 32
for 8 s: zero failed requests, p50/p99 latency and requests/s reported, the
server's RSS growth bounded, a new ``retrieval`` version swapped in under load
(the 32-client run) without a failed request, then SIGTERM under load: requests
in flight finish, the process exits 0. The server binds to loopback only by
default. The in-process baseline (the same requests as direct calls of the
loaded SavedModels, as many threads for as long) runs and measures; no
assertion is made on the gRPC / in-process ratios (machines are noisy).

The full run (1 and 8 clients x 15 s, 32 x 30 s) is marked ``bench``
(``make bench``, or ``python -m benchmarks.run --suite serving`` on
MovieLens-100k); the scenario itself is ``benchmarks/serving.py``. Figures print
with ``pytest -s``.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import json
import pathlib
import sys

import pytest
from serving_helpers import trained_export

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives beside `tests`
    sys.path.insert(0, str(ROOT))

from benchmarks import serving  # noqa: E402


def _check(result: dict, levels: list[tuple[int, float]],
           max_growth_mb: float) -> None:
    load, swap, sigterm = result["load"], result["swap"], result["sigterm"]
    clients, seconds = levels[-1]
    print(f"\nlevels: {json.dumps(result['levels'], indent=1)}\n"
          f"swap: {json.dumps(swap)}\nsigterm: {json.dumps(sigterm)}\n"
          f"bind: {result['bind']}\nlog: {result['log']}")
    assert result["warmup_failed"] == 0 and not result["failures"], result["failures"]
    # Every level, over gRPC and in-process: measured, nothing failed.
    assert [level["clients"] for level in result["levels"]] == [c for c, _ in levels]
    for level, (n, secs) in zip(result["levels"], levels, strict=True):
        for name in ("grpc", "in_process"):
            run = level[name]
            assert run["clients"] == n and run["seconds"] >= secs, (name, run)
            assert run["failed"] == 0 and run["requests"] > 0, (name, run)
            assert run["requests_per_s"] > 0, (name, run)
            assert 0 < run["p50_ms"] <= run["p99_ms"], (name, run)
        assert level["p50_overhead"] > 0 and level["throughput_ratio"] > 0, level
    # The last gRPC level: the load, the memory, the version swap.
    assert load == result["levels"][-1]["grpc"]
    assert load["requests"] >= 5 * clients * seconds  # a few requests/s each at least
    assert load["p99_ms"] < 2000
    assert load["rss_growth_mb"] < max_growth_mb, load
    # A new version swapped in under load: served, and no request failed.
    assert swap["new_version"] == 2 and swap["versions_served"] == [1, 2], swap
    # SIGTERM under load: what was in flight finished, then a clean exit.
    assert sigterm["in_flight"] >= 1, sigterm
    assert sigterm["in_flight_failed"] == [], sigterm
    assert sigterm["slow_ok"], sigterm
    assert sigterm["exit_code"] == 0 and sigterm["exit_seconds"] < 20, sigterm
    assert any("stopped in" in line for line in result["log"]), result["log"]
    # Loopback only, by default.
    assert result["bind"] and all(addresses == ["127.0.0.1"]
                                  for addresses in result["bind"].values()), result
    # The report renders every level.
    assert serving.markdown(result).count("\n| ") == len(levels) + 1


def test_1_8_32_clients_against_in_process_then_sigterm():
    export_dir, prepared, _ = trained_export()
    # The last level swaps in a new `retrieval` version a quarter into it
    # (loading and warming it up under 32 clients): 54 MB of growth on a busy
    # machine, 64.3 MB once on an overloaded one (load 6 on 2 cores). The bound
    # is a leak guard with that margin; the filter graph's size, which once
    # doubled the swap's cost (71 MB), is guarded by test_filter_graph.py.
    levels = [(1, 1.0), (8, 1.0), (32, 8.0)]
    result = serving.measure(export_dir, prepared, levels)
    _check(result, levels, max_growth_mb=80)


@pytest.mark.bench
def test_1_8_32_clients_for_15_15_30_seconds_then_sigterm():
    export_dir, prepared, _ = trained_export()
    levels = [(1, 15.0), (8, 15.0), (32, 30.0)]
    result = serving.measure(export_dir, prepared, levels, batching=True)
    batched = result.pop("batched")
    _check(result, levels, max_growth_mb=64)
    # Batching on: the same levels, swap and SIGTERM, nothing failed.
    print(f"\nbatched: {json.dumps(batched['levels'], indent=1)}")
    assert batched["warmup_failed"] == 0 and not batched["failures"], batched
    assert [level["clients"] for level in batched["levels"]] == [c for c, _ in levels]
    for level in batched["levels"]:
        assert level["grpc"]["failed"] == 0 and level["grpc"]["requests"] > 0, level
        assert level["throughput_ratio"] > 0 and level["p99_vs_unbatched"] > 0
    assert batched["swap"]["versions_served"] == [1, 2], batched["swap"]
    assert batched["sigterm"]["in_flight_failed"] == [], batched["sigterm"]
    assert batched["sigterm"]["exit_code"] == 0, batched["sigterm"]
    assert serving.markdown({**result, "batched": batched}).count("\n| ") == 2 * (
        len(levels) + 1)
