"""Use TensorFlow's BFC pool allocator for CPU memory (set before TF loads).

TensorFlow's default CPU allocator is ``malloc``. glibc serves every block
over 32 MiB with a fresh ``mmap``, and gives it back on ``free``, so a tensor
that big costs a page fault per 4 KiB page on first touch, every time it is
allocated. Training the paper preset allocates several a step (the dense
30k x 300 gradient of the trigram table, Adam's temporaries): 8,800 page
faults and ~25 ms of kernel time for each, measured on 2 cores; with the BFC
allocator the memory is reused from a pool and the step's optimizer update
went from ~70 to ~25 ms of CPU time (docs/training_speed.md).

``TF_CPU_ALLOCATOR_USE_BFC`` is read once, when TensorFlow creates its CPU
allocator, so it must be set before TensorFlow is imported; a value the user
set (``0`` to keep ``malloc``) is left alone.

A server gains nothing from the pool (no tensor that big per request) and its
memory would grow to the pool's high-water mark (measured: +117 MB of RSS under
32 clients against +64 MB allowed by tests/test_load.py), so ``tfdssm serve``
calls :func:`keep_default_allocator` before TensorFlow loads.
"""

import os
import sys

VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"
# Set beside VARIABLE when tfdssm chose it, so a child process (which inherits
# both) can tell tfdssm's default from the user's own choice.
MARKER = "TFDSSM_CHOSE_BFC_ALLOCATOR"


def prefer_bfc_allocator() -> bool:
    """Sets ``TF_CPU_ALLOCATOR_USE_BFC=1`` unless the user set it or
    TensorFlow is already imported.

    Returns:
        Whether the variable was set here.
    """
    if VARIABLE in os.environ or "tensorflow" in sys.modules:
        return False
    os.environ[VARIABLE] = os.environ[MARKER] = "1"
    return True


def keep_default_allocator() -> bool:
    """Undoes :func:`prefer_bfc_allocator` (in this process or a parent) while
    TensorFlow is not loaded yet.

    Returns:
        Whether the variable was removed (tfdssm set it, not the user).
    """
    if os.environ.get(MARKER) != "1" or "tensorflow" in sys.modules:
        return False
    os.environ.pop(VARIABLE, None)
    os.environ.pop(MARKER, None)
    return True
