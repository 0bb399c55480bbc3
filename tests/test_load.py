"""``tfdssm serve`` under load, as a separate process on loopback ports.

32 concurrent gRPC clients (one channel each) for 5 s in CI: zero failed
requests, p50/p99 latency and requests/s reported, the server's RSS growth
bounded, a new ``retrieval`` version swapped in under load without a failed
request, then SIGTERM under load: requests in flight finish, the process exits
0. The server binds to loopback only by default.

The full 32 clients x 30 s run is marked ``bench`` (``make bench``, or
``python -m benchmarks.run --suite serving`` on MovieLens-100k); the scenario
itself is ``benchmarks/serving.py``. Figures print with ``pytest -s``.
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


def _check(result: dict, clients: int, seconds: float, max_growth_mb: float) -> None:
    load, swap, sigterm = result["load"], result["swap"], result["sigterm"]
    print(f"\nload: {json.dumps(load)}\nswap: {json.dumps(swap)}\n"
          f"sigterm: {json.dumps(sigterm)}\nbind: {result['bind']}\n"
          f"log: {result['log']}")
    assert load["failed"] == 0 and result["warmup_failed"] == 0, result["failures"]
    assert load["clients"] == clients and load["seconds"] >= seconds
    assert load["requests"] >= 5 * clients * seconds  # a few requests/s each at least
    assert 0 < load["p50_ms"] <= load["p99_ms"] < 2000
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


def test_32_clients_for_5_seconds_then_sigterm():
    export_dir, prepared, _ = trained_export()
    result = serving.measure(export_dir, prepared, clients=32, seconds=5.0)
    _check(result, 32, 5.0, max_growth_mb=64)


@pytest.mark.bench
def test_32_clients_for_30_seconds_then_sigterm():
    export_dir, prepared, _ = trained_export()
    result = serving.measure(export_dir, prepared, clients=32, seconds=30.0)
    _check(result, 32, 30.0, max_growth_mb=64)
