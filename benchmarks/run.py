"""Runs the benchmark suites and prints one Markdown report.

    python -m benchmarks.run [--suite quality --suite hashing ...] [--quick]
                             [--readme docs/benchmarks.md]

Writes ``benchmarks/results/report.md`` (a full run; a run of chosen suites or
``--quick`` writes ``report-<suites>[-quick].md`` instead, so the full run's
report is kept) and PNG plots beside it; with
``--readme``, also puts the report between the README's ``bench:start`` and
``bench:end`` markers (a full run only: ``make bench`` does this).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time

import tfdssm  # noqa: F401  (Keras 2 before TensorFlow)
from benchmarks import common

SUITES = ("quality", "hashing", "training", "tflite", "retrieval", "memory", "serving",
          "text", "beam_index", "filters", "grpc_floor")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=SUITES)
    parser.add_argument("--quick", action="store_true", help="small, fast versions")
    parser.add_argument("--readme", type=pathlib.Path,
                        help="also put the report into this README (full runs only)")
    args = parser.parse_args(argv)
    if args.readme and (args.quick or args.suite):
        parser.error("--readme takes a full run: drop --quick and --suite")
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
    name = "report"
    if args.suite or args.quick:
        name += "".join(f"-{s}" for s in args.suite or ())
        name += "-quick" if args.quick else ""
    (common.RESULTS / f"{name}.md").write_text(report)
    print(report)
    if args.readme:
        update_readme(args.readme, report)
        print(f"benchmarks: updated {args.readme}", file=sys.stderr)
    return 0


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(path: pathlib.Path, report: str) -> None:
    """Replaces the text between the README's markers with ``report``.

    The report's own title is dropped and its plot paths are made relative to
    the page (``results/x.png`` -> ``benchmarks/results/x.png``, from ``docs/``
    ``../benchmarks/results/x.png``).
    """
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers to replace")
    body = report.split("\n", 1)[1].strip()
    prefix = "../benchmarks/results/" if path.parent.name == "docs" else (
        "benchmarks/results/")
    body = re.sub(r"\]\(results/", f"]({prefix}", body)
    head, rest = text.split(START, 1)
    path.write_text(f"{head}{START}\n{body}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    sys.exit(main())
