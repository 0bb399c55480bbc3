"""The CLI explains itself before TensorFlow loads: help texts with defaults,
``--version``, and argument / file mistakes that fail in a fraction of a second."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tfdssm import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Runs `tfdssm ARGV` for each JSON argv list in turn, in one process, and
# reports each call's exit code, seconds and whether TensorFlow was imported.
PROBE = """
import json, sys, time
from tfdssm.cli import main
for argv in json.loads(sys.argv[1]):
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                      "tensorflow": "tensorflow" in sys.modules}), flush=True)
"""


def _probe(calls: list[list[str]], cwd: pathlib.Path) -> tuple[list[dict], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls)],
                          capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def _subparsers(parser: argparse.ArgumentParser):
    yield "tfdssm", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    checked = 0
    for name, sub in _subparsers(parser):
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction,
                                   cli._VersionAction)):
                continue
            shown = formatter._expand_help(action) if action.help else ""
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert shown.strip(), f"{label} has no help text"
            # A required option has no default; every other names its own.
            in_group = any(action in g._group_actions and g.required
                           for g in sub._mutually_exclusive_groups)
            assert action.required or in_group or "default" in shown, (
                f"{label}: help does not show a default: {shown!r}")
            checked += 1
    assert checked > 50  # the walk reached every subcommand's options


def test_help_shows_per_pipeline_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default movielens: 6; pairs: 20)" in out  # --epochs
    assert "(default movielens: 64; pairs: 128)" in out  # --dim
    assert "(default: query)" in out  # --query-column


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tfdssm {cli._version()}"
    assert cli._version()[0].isdigit()


def test_mistakes_fail_before_tensorflow_loads(tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text("query\tdoc\nsort a list\tsorted(x)\n")  # tab-separated .csv
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "export.json").write_text("{}")
    calls = {
        "missing file": ["train", "--pipeline", "pairs", "--data", "nope.csv",
                         "--export-dir", "out"],
        "misspelt column": ["train", "--pipeline", "pairs", "--data", str(data),
                            "--query-column", "qury", "--export-dir", "out"],
        "wrong sep": ["train", "--pipeline", "pairs", "--data", str(data),
                      "--sep", ",", "--export-dir", "out"],
        "not an export": ["evaluate", "--export-dir", str(tmp_path), "--data",
                          str(data)],
        "bad number": ["train", "--pipeline", "pairs", "--data", str(data),
                       "--export-dir", "out", "--epochs", "0"],
        "bad port": ["serve", "--export-dir", str(tmp_path), "--grpc-port", "70000"],
        "bad server": ["query", "--server", "localhost", "kiwi"],
        "bad feature": ["query", "--export-dir", str(tmp_path / "e"), "--feature",
                        "user_id"],
    }
    results, err = _probe(list(calls.values()), tmp_path)
    assert len(results) == len(calls), err
    for case, result in zip(calls, results, strict=True):
        assert result["code"] == 2, (case, err)
        assert not result["tensorflow"], f"{case}: TensorFlow was imported"
        assert result["seconds"] < 1.0, (case, result)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len([line for line in lines if line.startswith("tfdssm: error:")]) == 5
    assert "argument --epochs: must be >= 1" in err
    assert "tab-separated" in err and "--sep tab" in err
    assert "expected HOST:PORT like localhost:8500, received 'localhost'" in err


def test_scaling_serving_and_filter_mistakes_fail_before_tensorflow_loads(tmp_path):
    """The checks of the options that came with file-sharded input, Beam
    indexing, the shard front, batching files and restrict columns."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part-0.csv").write_text("query\tdoc\nsort\tsorted(x)\n")
    data = tmp_path / "pairs.csv"
    data.write_text("query,doc\nsort a list,sorted(x)\n")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "export.json").write_text("{}")
    calls = {
        "glob, tab in .csv": ["train", "--pipeline", "pairs", "--data",
                              str(tmp_path / "parts" / "part-*.csv"),
                              "--export-dir", "out"],
        "glob, no file": ["train", "--pipeline", "pairs", "--data",
                          str(tmp_path / "nothing-*.csv"), "--export-dir", "out"],
        "restrict column": ["train", "--pipeline", "pairs", "--data", str(data),
                            "--restrict-columns", "genres", "--export-dir", "out"],
        "batching file": ["serve", "--export-dir", str(tmp_path / "e"),
                          "--batching-parameters-file", "nope.txt"],
        "front and export": ["serve", "--export-dir", str(tmp_path / "e"),
                             "--shards", "127.0.0.1:1,127.0.0.1:2"],
        "neither": ["serve"],
        "index corpus": ["index", "--export-dir", str(tmp_path / "e"), "--corpus",
                         str(tmp_path / "none-*.parquet")],
    }
    results, err = _probe(list(calls.values()), tmp_path)
    assert len(results) == len(calls), err
    for case, result in zip(calls, results, strict=True):
        assert result["code"] == 2, (case, err)
        assert not result["tensorflow"], f"{case}: TensorFlow was imported"
    assert "Traceback" not in err
    assert "streamed with their suffix's delimiter" in err
    assert "no file matches" in err and "nothing-*.csv" in err
    assert "no column(s) ['genres']" in err
    assert "--batching-parameters-file 'nope.txt' does not exist" in err
    assert "not both" in err
    assert "tfdssm serve needs --export-dir DIR" in err
    assert "--corpus" in err and "matches no file" in err
