"""Runs the benchmark suites and prints one Markdown report.

    python -m benchmarks.run [--suite quality --suite hashing ...] [--quick]

Writes ``benchmarks/results/report.md`` and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import sys
import time

import tfdssm  # noqa: F401  (Keras 2 before TensorFlow)

from benchmarks import common

SUITES = ("quality", "hashing", "training", "tflite", "retrieval", "memory", "serving")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=SUITES)
    parser.add_argument("--quick", action="store_true", help="small, fast versions")
    args = parser.parse_args(argv)
    parts = [f"## tfdssm benchmarks\n\nMachine: {common.machine()}  \n"
             f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
             f"{' (quick mode)' if args.quick else ''}"]
    for suite in args.suite or SUITES:
        start = time.perf_counter()
        print(f"benchmarks: running {suite} ...", file=sys.stderr)
        module = __import__(f"benchmarks.{suite}", fromlist=["run"])
        parts.append(module.run(quick=args.quick)["markdown"])
        print(f"benchmarks: {suite} done in {time.perf_counter() - start:.0f}s",
              file=sys.stderr)
    report = "\n\n".join(parts) + "\n"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
