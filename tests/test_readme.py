"""Every command and snippet in README.md runs, so the README cannot rot.

Each fenced block in the README carries a marker on the line above it:

* ``<!-- test: ci -->``: run here, in CI, on tiny data (below);
* ``<!-- test: bench -->``: run for real by ``make bench`` (``-m bench``): the
  long ones (``make demo``, full trainings);
* ``<!-- test: output -->``: what the block before it prints; ``make bench``
  checks it against the real output (``...`` and numbers match anything, a
  ranked row any ranked row).

A block without a marker fails :func:`test_every_block_is_marked`.

How a ``ci`` block runs (the mapping that makes it tiny and fast):

* the working directory is a scratch copy holding ``examples/stdlib_pairs.csv``
  and ``examples/stdlib_held_out.csv`` cut to their first rows, and
  ``saved_models/movielens`` = the session's tiny MovieLens export
  (``tests/conftest.py``) in place of ``make demo``'s;
* bash blocks are read command by command: ``.venv/bin/tfdssm ARGS`` calls
  ``tfdssm.cli.main(ARGS)`` in process (``train`` gets :data:`TINY` appended:
  one epoch, tiny towers); ``tfdssm serve ... &`` starts the same server in
  process on free ports, which replace 8500 / 8501 in the commands after it;
  ``until ...`` is skipped (the server is up when started); ``curl`` runs for
  real; ``kill %1`` stops the server. Anything else fails: mark such a block
  ``bench`` or teach this file;
* python blocks run with :data:`PY_TINY` applied (tiny towers, one epoch).

``ci`` blocks run in README order and may use what earlier ones wrote.
"""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
from typing import Any

import pytest

from tfdssm import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KINDS = ("ci", "bench", "output")
TINY = ["--epochs", "1", "--batch-size", "16", "--hidden", "16", "--dim", "8",
        "--buckets", "500", "--quiet",
        # The pairs defaults' hybrid export and BM25 mining are tested in
        # test_hybrid.py / test_negatives.py; here they would only cost CI time.
        "--no-hybrid", "--hard-negatives", "none"]
PY_TINY = [(r'paper_tower\("(\w+)"\)',
            r'paper_tower("\1", num_buckets=500, hidden=(16,), output_dim=8)'),
           (r"epochs=\d+", "epochs=1"), (r"batch_size=\d+", "batch_size=16")]
SAMPLE_ROWS = {"stdlib_pairs.csv": 80, "stdlib_held_out.csv": 12}


@dataclasses.dataclass
class Block:
    """One fenced block of the README."""

    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    kind: str | None  # the marker above it

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_blocks(text: str | None = None) -> list[Block]:
    """The README's fenced blocks with their markers."""
    text = README.read_text() if text is None else text
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = re.fullmatch(r"<!-- test: (\w+) -->", above.strip())
        blocks.append(Block(i + 1, fence[1], "\n".join(lines[i + 1:end]),
                            marker[1] if marker else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()


def test_every_block_is_marked():
    assert len(BLOCKS) >= 8
    for index, block in enumerate(BLOCKS):
        assert block.kind in KINDS, (
            f"{block} has no `<!-- test: ci|bench|output -->` marker above it")
        if block.kind == "output":
            assert index and BLOCKS[index - 1].kind in ("ci", "bench"), block
        else:
            assert block.lang in ("bash", "python"), block
    assert sum(b.kind == "ci" for b in BLOCKS) >= 4


def test_links_of_the_readme_and_docs_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 8
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = page.parent / target.split("#")[0]
            assert path.exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_an_unmarked_block_is_caught():
    blocks = readme_blocks("<!-- test: ci -->\n```bash\nls\n```\n\ntext\n"
                           "```bash\nls\n```\n")
    assert [b.kind for b in blocks] == ["ci", None]


# --------------------------------------------------------------------------- #
# ci blocks
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Workspace:
    root: pathlib.Path
    server: Any = None
    ports: dict[str, str] = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, movielens_export):
    root = tmp_path_factory.mktemp("readme")
    (root / "examples").mkdir()
    for name, rows in SAMPLE_ROWS.items():
        lines = (ROOT / "examples" / name).read_text(encoding="utf-8").splitlines()
        (root / "examples" / name).write_text("\n".join(lines[:rows + 1]) + "\n",
                                              encoding="utf-8")
    (root / "saved_models").mkdir()
    (root / "saved_models" / "movielens").symlink_to(movielens_export[0])
    space = Workspace(root)
    yield space
    if space.server is not None:
        space.server.stop(grace_seconds=1)


def commands(code: str) -> list[str]:
    """Shell commands of a bash block: continuation lines and quotes spanning
    lines joined."""
    out, pending = [], ""
    for line in code.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if pending.strip():
            out.append(pending)
        pending = ""
    assert not pending, f"unterminated command: {pending!r}"
    return out


def _ported(args: list[str], space: Workspace) -> list[str]:
    out = []
    for arg in args:
        for port, real in space.ports.items():
            arg = arg.replace(f"localhost:{port}", f"127.0.0.1:{real}")
        out.append(arg)
    return out


def _tfdssm(args: list[str], space: Workspace) -> str:
    if args and args[0] == "train":
        args = [*args, *TINY]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(_ported(args, space))
    assert code == 0, f"tfdssm {shlex.join(args)}: exit {code}\n{err.getvalue()}"
    return out.getvalue()


def _serve(args: list[str], space: Workspace) -> None:
    from tfdssm.serving.server import Server  # noqa: PLC0415

    parsed = cli.build_parser().parse_args(args)
    assert space.server is None, "a second background server"
    space.server = Server(parsed.export_dir, grpc_port=0, rest_port=0).start()
    space.ports = {"8500": str(space.server.grpc_port),
                   "8501": str(space.server.rest_port)}


def run_bash(block: Block, space: Workspace) -> list[str]:
    """Runs a bash block as the module docstring says; the commands' outputs."""
    outputs = []
    for command in commands(block.code):
        args = shlex.split(command, comments=True)
        program = args[0]
        if program == ".venv/bin/tfdssm" and args[-1] == "&":
            assert args[1] == "serve", f"{block}: only `serve` runs in the background"
            _serve(args[1:-1], space)
        elif program == ".venv/bin/tfdssm":
            outputs.append(_tfdssm(args[1:], space))
        elif program == "until":
            assert space.server is not None, f"{block}: waits for no server"
        elif program == "kill":
            space.server.stop(grace_seconds=1)
            space.server, space.ports = None, {}
        elif program == "curl":
            proc = subprocess.run(_ported(args, space), capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 0, f"{block}: {command}\n{proc.stderr}"
            outputs.append(proc.stdout)
        else:
            pytest.fail(f"{block}: test_readme cannot run {program!r}; mark the block "
                        "`bench` or teach tests/test_readme.py")
    return outputs


def run_python(block: Block) -> str:
    code = block.code
    for pattern, replacement in PY_TINY:
        code = re.sub(pattern, replacement, code)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(block), "exec"), {"__name__": "__readme__"})  # noqa: S102
    return out.getvalue()


CI_BLOCKS = [b for b in BLOCKS if b.kind == "ci"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("block", CI_BLOCKS, ids=[f"line{b.line}" for b in CI_BLOCKS])
def test_ci_block_runs(block, workspace, monkeypatch):
    monkeypatch.chdir(workspace.root)
    if block.lang == "bash":
        outputs = run_bash(block, workspace)
        assert outputs and all(o.strip() for o in outputs), block
        for out in outputs:
            if out.lstrip().startswith("{"):
                answer = json.loads(out)
                assert answer["predictions"][0]["ids"], out
    else:
        assert run_python(block).strip(), f"{block} printed nothing"


# --------------------------------------------------------------------------- #
# bench blocks: for real, from the repository root
# --------------------------------------------------------------------------- #


def _expected_lines(output: Block) -> list[re.Pattern]:
    """A pattern per output line: numbers and ``...`` match anything; a ranked
    row (``  1. Title (1993)  0.156  Genre``) matches any ranked row."""
    patterns = []
    for line in output.code.splitlines():
        if re.match(r"^\s*\d+\. ", line):
            patterns.append(re.compile(r"^\s*\d+\. .+\d\.\d{3}"))
            continue
        parts = [re.sub(r"\d[\d.,]*", r"[\\d.,e+-]+", re.escape(p))
                 for p in line.strip().split("...")]
        patterns.append(re.compile(".*".join(parts)))
    return patterns


BENCH_BLOCKS = [b for b in BLOCKS if b.kind == "bench"]


@pytest.mark.bench
@pytest.mark.parametrize("block", BENCH_BLOCKS,
                         ids=[f"line{b.line}" for b in BENCH_BLOCKS])
def test_bench_block_runs(block):
    """``make test`` is checked with ``make -n test`` (it is this suite)."""
    script = re.sub(r"^make test\b", "make -n test", block.code, flags=re.M)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600, env=env)
    assert proc.returncode == 0, (
        f"{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    index = BLOCKS.index(block)
    if index + 1 < len(BLOCKS) and BLOCKS[index + 1].kind == "output":
        seen = (proc.stdout + proc.stderr).splitlines()
        for pattern in _expected_lines(BLOCKS[index + 1]):
            assert any(pattern.search(line) for line in seen), (
                f"README.md:{BLOCKS[index + 1].line}: no output line matches "
                f"{pattern.pattern!r}")
