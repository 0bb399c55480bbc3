"""The package's layers import only downwards (DESIGN.md, "Layout").

Every module's imports are read with ``ast`` (function-level imports too) and
each ``tfdssm`` import is checked against the layer table below: a module may
import its own layer and the layers below it, never one above. The model
server must not need the training stack: ``serving`` may import only the
export layer's TensorFlow-light modules.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tfdssm"

# Lowest first. A module belongs to the longest prefix listed.
LAYERS: list[tuple[str, ...]] = [
    ("tfdssm", "tfdssm.errors", "tfdssm._keras_setup", "tfdssm._lazy",
     "tfdssm._allocator",
     "tfdssm._compat"),
    ("tfdssm.text",),
    ("tfdssm.features",),
    ("tfdssm.model",),
    ("tfdssm.data",),
    ("tfdssm.export",),
    ("tfdssm.indexing",),  # Beam embedding / re-indexing: over export, not training
    ("tfdssm.training",),
    ("tfdssm.serving", "tfdssm.client"),
    ("tfdssm.retrieve", "tfdssm.recipes"),
    ("tfdssm.cli",),
]
# What the model server may import from tfdssm (besides itself).
SERVING_MAY_IMPORT = ("tfdssm.errors", "tfdssm.text.normalize", "tfdssm.export.layout",
                      "tfdssm.export.versioning", "tfdssm.export.serving_config",
                      "tfdssm.export.warmup")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    best, length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and len(prefix) > length:
                best, length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer; add it to LAYERS")
    return best


def tfdssm_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every tfdssm import in a file, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import sub` imports pkg.sub
                full = f"{base}.{alias.name}"
                is_module = (ROOT.parent / full.replace(".", "/")).with_suffix(
                    ".py").is_file() or (ROOT.parent / full.replace(".", "/")).is_dir()
                found.append((node.lineno, full if is_module else base))
    return [(line, m) for line, m in found if m == "tfdssm" or m.startswith("tfdssm.")]


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_go_down_only(path):
    name = module_name(path)
    own = layer_of(name)
    wrong = []
    for line, imported in tfdssm_imports(path):
        if not (ROOT.parent / imported.replace(".", "/")).with_suffix(".py").is_file() \
                and not (ROOT.parent / imported.replace(".", "/")).is_dir():
            wrong.append(f"line {line}: {imported} does not exist (an old path?)")
        elif layer_of(imported) > own:
            wrong.append(f"line {line}: {imported} (layer {layer_of(imported)}) is "
                         f"above {name} (layer {own})")
    assert not wrong, f"{name} imports upwards:\n" + "\n".join(wrong)


@pytest.mark.parametrize("path", sorted((ROOT / "serving").glob("*.py")),
                         ids=lambda p: p.name)
def test_serving_imports_only_export_layout_and_warmup(path):
    outside = [(line, m) for line, m in tfdssm_imports(path)
               if not m.startswith("tfdssm.serving") and m != "tfdssm"
               and m not in SERVING_MAY_IMPORT]
    assert not outside, outside


def test_the_layer_check_sees_function_level_imports(tmp_path, monkeypatch):
    module = ROOT / "text" / "_probe_for_test.py"
    module.write_text("def f():\n    from tfdssm.model import towers\n")
    try:
        imports = tfdssm_imports(module)
        assert imports == [(2, "tfdssm.model.towers")]
        assert layer_of(imports[0][1]) > layer_of("tfdssm.text._probe_for_test")
    finally:
        module.unlink()
