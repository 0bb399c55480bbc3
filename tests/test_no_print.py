"""Library code never prints: progress goes to ``logging.getLogger("tfdssm")``,
data problems are ``warnings.warn(..., DataWarning)``; only ``tfdssm.cli`` writes
to the terminal (and sets up where the messages go)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tfdssm"
LIBRARY = sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "cli.py")


def writes_to_terminal(tree: ast.AST) -> list[str]:
    """``print(...)`` calls and ``sys.stdout/stderr.write(...)``, as ``line: code``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "print":
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(func, ast.Attribute) and func.attr == "write"
              and isinstance(func.value, ast.Attribute)
              and func.value.attr in ("stdout", "stderr")):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_code_does_not_print(path):
    assert writes_to_terminal(ast.parse(path.read_text())) == []


def test_the_check_sees_prints():
    code = ("import sys\ndef f():\n    print('x', file=sys.stderr)\n"
            "    sys.stderr.write('y')\n")
    assert len(writes_to_terminal(ast.parse(code))) == 2
    assert writes_to_terminal(ast.parse('"""\n>>> print(1)\n"""')) == []
