"""The Colab quickstart notebook runs green, headless, on a real Jupyter kernel.

``pipelines/colab_quickstart.ipynb`` is executed with ``nbclient`` on a kernel
that runs this interpreter (the project's virtualenv), in test mode
(``TFDSSM_NOTEBOOK_TEST=1``: tiny synthetic data, no ``pip install``). Any cell
error fails the test; the notebook's last cell writes ``summary.json``, which
the tests check.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "pipelines" / (
    "colab_quickstart.ipynb")
KERNEL = "tfdssm-notebook-test"


def _source(nb, kind: str | None = None) -> str:
    return "\n".join(c.source for c in nb.cells if kind in (None, c.cell_type))


@pytest.fixture(scope="module")
def notebook():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


@pytest.fixture(scope="module")
def executed(notebook, tmp_path_factory):
    """Runs the notebook once; returns ``(executed notebook, work dir, seconds)``."""
    root = tmp_path_factory.mktemp("notebook")
    spec_dir = root / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    work = root / "work"
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tfdssm (test)", "language": "python",
        "env": {"TFDSSM_NOTEBOOK_TEST": "1", "TFDSSM_NOTEBOOK_DIR": str(work),
                "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
    }))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root / "jupyter"))
        client = NotebookClient(
            nbformat.from_dict(notebook), kernel_name=KERNEL, timeout=120,
            startup_timeout=60, resources={"metadata": {"path": str(root)}},
        )
        start = time.perf_counter()
        client.execute()  # raises CellExecutionError (with the traceback) on failure
        seconds = time.perf_counter() - start
    print(f"notebook executed in {seconds:.1f}s")
    return client.nb, work, seconds


# --------------------------------------------------------------------------- #
# structure (no kernel)
# --------------------------------------------------------------------------- #


def test_parameter_cell_comes_first_and_switches_to_test_mode(notebook):
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "TFDSSM_NOTEBOOK_TEST" in code[0].source and "REPO_URL" in code[0].source
    assert not any(cell.get("outputs") for cell in code)  # committed without outputs


def test_steps_come_in_order(notebook):
    text = _source(notebook, "code")
    steps = ["pip\", \"install\"", "import tfdssm", "import tensorflow as tf",
             "data.make_dataset", "model.compile", "TensorBoard(", "ModelCheckpoint(",
             "EarlyStopping(", "BackupAndRestore(", "model.fit(", "model.evaluate(",
             "evaluate_frame(", "export.export_model(", "tf.saved_model.load(",
             "top_k(", "add_tflite(", "TFLiteQueryTower("]
    positions = [text.find(step) for step in steps]
    missing = [s for s, p in zip(steps, positions, strict=True) if p == -1]
    assert not missing, missing
    assert positions == sorted(positions), "steps out of order"


def test_explains_keras3_and_the_restart(notebook):
    text = _source(notebook)
    for phrase in ("Keras 3", "TF_USE_LEGACY_KERAS", "Restart session", "tf-keras",
                   "Python 3.11", "RESTART NEEDED"):
        assert phrase in text, phrase


def test_install_cell_refuses_the_placeholder_url(notebook, monkeypatch):
    """Outside test mode the install cell would pip-install REPO_URL; with the
    placeholder it stops with a clear message before running pip."""
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    install = next(source for source in code if "pip" in source)
    monkeypatch.delenv("TFDSSM_NOTEBOOK_TEST", raising=False)
    namespace = {"REPO_URL": "https://github.com/YOUR-ORG/tfdssm.git",
                 "TEST_MODE": False}
    with pytest.raises(ValueError, match="Set REPO_URL"):
        exec(compile(install, "install-cell", "exec"), namespace)  # noqa: S102


# --------------------------------------------------------------------------- #
# execution on a kernel
# --------------------------------------------------------------------------- #


def test_notebook_runs_green_and_fast_enough(executed):
    nb, work, seconds = executed
    errors = [o for c in nb.cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    install = next(c for c in nb.cells if c.cell_type == "code" and "pip" in c.source)
    assert "no pip install" in "".join(o.get("text", "") for o in install.outputs)
    assert (work / "summary.json").is_file()
    assert seconds < 120


def test_notebook_fit_learns_with_the_keras_callbacks(executed):
    _, work, _ = executed
    summary = json.loads((work / "summary.json").read_text())
    assert 1 <= summary["epochs_run"] <= 3
    assert summary["loss"][-1] < summary["loss"][0]
    assert list((work / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    assert list((work / "checkpoints").glob("best*.index"))  # ModelCheckpoint
    assert not list((work / "backup").rglob("*.index"))  # BackupAndRestore: cleaned
    assert summary["reload_diff"] < 1e-6  # save_weights -> from_config -> load_weights


def test_notebook_evaluates_exports_queries_and_converts(executed):
    _, work, _ = executed
    summary = json.loads((work / "summary.json").read_text())
    metrics = summary["metrics"]
    assert metrics["num_candidates"] == 18 and metrics["num_queries"] == 14
    assert metrics["recall@5"] > 5 / 18 and metrics["auc"] > 0.6  # beats chance
    export = work / "export"
    assert (export / "towers" / str(summary["towers_version"])).is_dir()
    assert len(summary["top_ids"]) == 2 and all(len(r) == 5 for r in summary["top_ids"])
    assert (export / "query_tower.tflite").is_file()
    assert summary["tflite_diff"] < 1e-5
    assert summary["tflite_parity"]["max_abs_diff"] < 1e-5
