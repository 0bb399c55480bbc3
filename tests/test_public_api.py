"""The public API (``tfdssm.*``, lazy), old import paths, and what the server loads."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings

import pytest

import tfdssm


def _loaded_after(code: str) -> set[str]:
    """Top-level modules in ``sys.modules`` after running ``code`` afresh."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}


def test_import_tfdssm_is_cheap_and_selects_keras2():
    script = ("import os, sys, tfdssm; print(os.environ['TF_USE_LEGACY_KERAS'], "
              "'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert out.split() == ["1", "False"]


_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pandas", "tensorflow_recommenders", "scann"):
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_the_server_needs_neither_tfrs_nor_pandas():
    # TensorFlow's tf-keras imports pandas when it can, so the check is that
    # the server imports (and loads no training module) with both blocked.
    code = _BLOCK + (
        "import tfdssm.serving, tfdssm.serving.server, tfdssm.serving.models, "
        "tfdssm.serving.rest, tfdssm.serving.grpc_server, tfdssm.client\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('tfdssm'))))")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not {m for m in loaded if m.startswith(
        ("tfdssm.model", "tfdssm.training", "tfdssm.data", "tfdssm.features",
         "tfdssm.export.savedmodel", "tfdssm.export.index", "tfdssm.recipes"))}
    assert {"tfdssm.export.versioning", "tfdssm.export.warmup"} <= loaded


def test_import_tfdssm_serving_loads_neither_tfrs_nor_pandas():
    loaded = _loaded_after("import tfdssm.serving")
    assert not loaded & {"tensorflow_recommenders", "pandas", "tensorflow"}


@pytest.mark.parametrize("name", tfdssm.__all__)
def test_every_public_name_resolves(name):
    assert getattr(tfdssm, name) is not None


def test_public_names_are_the_library_objects():
    from tfdssm.model.dssm import DSSM
    from tfdssm.model.towers import Tower

    assert tfdssm.DSSM is DSSM and tfdssm.Tower is Tower
    assert "DSSM" in dir(tfdssm)
    with pytest.raises(AttributeError):
        tfdssm.no_such_name  # noqa: B018


@pytest.mark.parametrize("old", sorted(tfdssm._compat.ALIASES))
def test_old_module_paths_import_with_a_deprecation_warning(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message)
               for w in caught)
    for new in tfdssm._compat.ALIASES[old]:
        target = importlib.import_module(new)
        for name in getattr(target, "__all__", [n for n in vars(target)
                                                if not n.startswith("_")])[:20]:
            assert hasattr(module, name), (old, name)


@pytest.mark.parametrize("old, name", [
    ("tfdssm.towers", "SharedTower"), ("tfdssm.train", "run"),
    ("tfdssm.train", "corpus_of"), ("tfdssm.train", "evaluate_frame"),
    ("tfdssm.train", "add_tflite"), ("tfdssm.history", "link_shared_embeddings"),
    ("tfdssm.youtube", "ExampleAgeFeature"), ("tfdssm.youtube", "youtube_dnn"),
    ("tfdssm.evaluate", "embed"), ("tfdssm.evaluate", "rank_metrics"),
    ("tfdssm.pipelines.pairs", "prepare"), ("tfdssm.pipelines.history",
                                            "build_histories"),
    ("tfdssm.pipelines.history", "prepare_movielens"), ("tfdssm.index", "excluded"),
    ("tfdssm.serving.config", "read_model_config"),
])
def test_old_names_resolve(old, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert getattr(importlib.import_module(old), name) is not None


@pytest.mark.parametrize("package, name", [
    ("tfdssm.export", "export_model"), ("tfdssm.export", "read_export"),
    ("tfdssm.export", "load_towers"), ("tfdssm.export", "CORPUS_FILE"),
    ("tfdssm.export", "signature_spec"), ("tfdssm.export", "versions"),
    ("tfdssm.data", "make_dataset"), ("tfdssm.data", "read_table"),
    ("tfdssm.text", "TextNormalizer"), ("tfdssm.text", "encode_text"),
    ("tfdssm.model", "DSSM"), ("tfdssm.features", "TextFeature"),
])
def test_packages_keep_the_names_of_the_modules_they_replace(package, name):
    assert getattr(importlib.import_module(package), name) is not None


def test_from_old_package_import_submodule():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from tfdssm.pipelines import movielens, pairs
    from tfdssm.recipes import movielens as new_movielens
    from tfdssm.recipes import pairs as new_pairs

    assert movielens is new_movielens and pairs is new_pairs
