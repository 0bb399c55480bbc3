"""Resumable training: a backup every epoch, picked up after a crash.

:func:`backup` returns a ``tf.keras.callbacks.BackupAndRestore`` that saves the
model, the optimizer and the epoch counter at the end of every epoch into a
directory (``tfdssm train`` uses ``EXPORT_DIR/.checkpoints``). A run killed at
any moment (SIGKILL, OOM, preemption) loses at most the epoch in progress:
started again with ``resume=True`` (``tfdssm train ... --resume``) it restores
the last backup and continues with the next epoch. A finished run deletes its
backup.

The directory also holds ``run.json``, the parameters of the run that wrote the
backup; resuming with different model or training parameters is refused with a
message naming them (only ``epochs`` may change).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from tfdssm.errors import ConfigError

CHECKPOINT_DIR = ".checkpoints"
RUN_FILE = "run.json"
MAY_CHANGE = ("epochs",)


logger = logging.getLogger("tfdssm")


def _log(message: str) -> None:
    logger.info("%s", message)


def default_dir(export_dir: str | os.PathLike) -> pathlib.Path:
    """``EXPORT_DIR/.checkpoints`` (hidden: servers and version scans skip it)."""
    return pathlib.Path(export_dir) / CHECKPOINT_DIR


def has_backup(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds the backup of an unfinished run."""
    chief = pathlib.Path(directory) / "chief"
    return tf.train.latest_checkpoint(str(chief)) is not None


class Backup(tf.keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` (every epoch) that says where training resumes.

    Attributes:
        first_epoch: The 0-based epoch this process started with (``> 0`` when
            it resumed), set once training begins.
    """

    def __init__(self, directory: str | os.PathLike,
                 log: Callable[[str], None] = _log) -> None:
        super().__init__(str(directory), save_freq="epoch", delete_checkpoint=True)
        self.directory = pathlib.Path(directory)
        self.log = log
        self.first_epoch: int | None = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
            if epoch:
                self.log(f"resuming from the checkpoint in "
                         f"{str(self.directory)!r}: epoch {epoch + 1} of "
                         f"{self.params.get('epochs')} (epochs 1-{epoch} are done)")
        super().on_epoch_begin(epoch, logs)


def backup(
    directory: str | os.PathLike,
    run: Mapping[str, Any],
    resume: bool,
    chief: bool = True,
    log: Callable[[str], None] = _log,
) -> Backup:
    """Prepares ``directory`` and returns the callback to pass to ``fit``.

    Args:
        directory: Where the backups go.
        run: JSON-able parameters that must match to resume (model, data,
            batch size, learning rate, seed, ...).
        resume: Continue from a backup in ``directory`` if there is one; if not,
            a backup left there by an interrupted run is discarded (with a
            message) and training starts from epoch 1.
        chief: Whether this worker writes ``run.json`` and discards backups.
        log: Where messages go (default: the ``tfdssm`` logger, level info).

    Raises:
        ConfigError: resuming a backup written with different parameters, or
            ``directory`` is not a directory.
    """
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"checkpoint dir {str(directory)!r} exists and is not a "
                          "directory; pass another --checkpoint-dir.")
    run = json.loads(json.dumps(dict(run), default=str))
    found = has_backup(directory)
    if found and resume:
        _check_same_run(directory, run)
    elif found and chief:
        log(f"discarding the checkpoint of an interrupted run in "
            f"{str(directory)!r} (pass --resume to continue it instead)")
        shutil.rmtree(directory / "chief", ignore_errors=True)
    elif resume:
        log(f"no checkpoint to resume in {str(directory)!r}; starting at "
            "epoch 1")
    if chief:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{RUN_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, directory / RUN_FILE)
    return Backup(directory, log)


def finish(directory: str | os.PathLike, chief: bool = True) -> None:
    """Removes ``run.json`` and the then empty directory after a finished run."""
    directory = pathlib.Path(directory)
    if not chief or has_backup(directory):
        return
    (directory / RUN_FILE).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # not empty (other files) or already gone
        pass


def _check_same_run(directory: pathlib.Path, run: Mapping[str, Any]) -> None:
    path = directory / RUN_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # a backup without run.json (written by fit directly): trust it
    changed = sorted(k for k in set(saved) | set(run)
                     if k not in MAY_CHANGE and saved.get(k) != run.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} then, {run.get(k)!r} now"
                            for k in changed[:4])
        raise ConfigError(
            f"--resume: the checkpoint in {str(directory)!r} was written by a run "
            f"with other parameters ({details}). Resume with the same arguments, or "
            "drop --resume to start over."
        )


__all__ = ["Backup", "CHECKPOINT_DIR", "backup", "default_dir", "finish", "has_backup"]
