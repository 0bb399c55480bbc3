"""`import tfdssm` selects Keras 2, and says what to do when it is too late."""

import concurrent.futures
import os
import subprocess
import sys

import pytest


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment,
        timeout=300,
    )


def _without_allocator_choice() -> dict[str, str]:
    # (This process imported tfdssm, so its environment has the variable.)
    return {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}


def _allocator_code(code: str) -> str:
    return code + "\nimport os\nprint(os.environ.get('TF_CPU_ALLOCATOR_USE_BFC'))"


# The fresh processes that import TensorFlow (~5 s each): started side by side
# when the module's first test runs, each test reading its own result.
TENSORFLOW_RUNS = {
    "keras2_and_tfrs": lambda: run(
        "import tfdssm, tensorflow as tf, tensorflow_recommenders\n"
        "print(tf.keras.layers.Dense.__module__)"),
    # TensorFlow first: Keras 2 is still selected, but it is too late to choose
    # an allocator (one process for both: environment without the variable).
    "tensorflow_first": lambda: subprocess.run(
        [sys.executable, "-c", _allocator_code(
            "import tensorflow as tf\nimport tfdssm\n"
            "print(tf.keras.layers.Dense.__module__)")],
        capture_output=True, text=True, timeout=300, env={
            k: v for k, v in _without_allocator_choice().items()
            if k != "TF_USE_LEGACY_KERAS"}),
    "keras3_resolved": lambda: run(
        "import tensorflow as tf\n"
        "tf.keras.layers.Dense\n"  # resolves tf.keras to Keras 3
        "try:\n"
        "    import tfdssm\n"
        "except Exception as e:\n"
        "    print(type(e).__name__ + ': ' + str(e))\n"),
}


@pytest.fixture(scope="module")
def tensorflow_runs():
    with concurrent.futures.ThreadPoolExecutor(len(TENSORFLOW_RUNS)) as pool:
        futures = {name: pool.submit(start) for name, start in TENSORFLOW_RUNS.items()}
        yield {name: future.result for name, future in futures.items()}


def test_import_selects_keras2_and_tfrs_loads(tensorflow_runs):
    result = tensorflow_runs["keras2_and_tfrs"]()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tf_keras")


def test_tensorflow_imported_first_is_fine_while_keras_unresolved(tensorflow_runs):
    result = tensorflow_runs["tensorflow_first"]()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("tf_keras")


def test_keras3_already_resolved_gives_clear_error(tensorflow_runs):
    result = tensorflow_runs["keras3_resolved"]()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConfigError: ")
    assert "TF_USE_LEGACY_KERAS=1" in result.stdout
    assert "restart" in result.stdout.lower()


@pytest.mark.parametrize("value", ["0", "false"])
def test_conflicting_environment_variable(value):
    result = run("import tfdssm", TF_USE_LEGACY_KERAS=value)
    assert result.returncode != 0
    assert "TF_USE_LEGACY_KERAS is set to" in result.stderr


def test_import_selects_the_bfc_cpu_allocator_unless_set(tensorflow_runs):
    def allocator(code: str, value: str | None) -> str:
        environment = _without_allocator_choice()
        if value is not None:
            environment["TF_CPU_ALLOCATOR_USE_BFC"] = value
        result = subprocess.run(
            [sys.executable, "-c", _allocator_code(code)],
            capture_output=True, text=True, env=environment, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert allocator("import tfdssm", None) == "1"
    assert allocator("import tfdssm", "0") == "0"  # the user's choice stays
    # TensorFlow first: too late to choose an allocator, so nothing is claimed.
    # (The Keras test's process, which imports TensorFlow first.)
    result = tensorflow_runs["tensorflow_first"]()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "None"


def test_serve_keeps_the_default_allocator_unless_the_user_chose_one():
    code = ("import os, sys\nimport tfdssm\nfrom tfdssm._allocator import "
            "keep_default_allocator\nprint(keep_default_allocator(), "
            "os.environ.get('TF_CPU_ALLOCATOR_USE_BFC'))")

    def run(environment):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                text=True, env=environment, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    clean = {k: v for k, v in os.environ.items()
             if k not in ("TF_CPU_ALLOCATOR_USE_BFC", "TFDSSM_CHOSE_BFC_ALLOCATOR")}
    assert run(clean) == "True None"  # tfdssm's own default is undone
    assert run({**clean, "TF_CPU_ALLOCATOR_USE_BFC": "1"}) == "False 1"  # the user's
    # A child of a process that imported tfdssm (e.g. `tfdssm serve` started
    # from Python) inherits tfdssm's choice and may undo it.
    assert run({**clean, "TF_CPU_ALLOCATOR_USE_BFC": "1",
                "TFDSSM_CHOSE_BFC_ALLOCATOR": "1"}) == "True None"
