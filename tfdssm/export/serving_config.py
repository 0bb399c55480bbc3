"""TF Serving model configs (``models.config``), written by export, read by serve.

An export directory holds two configs in TF Serving's text format
(``tensorflow.serving.ModelServerConfig``):

* ``models.config``: ``towers``, ``retrieval`` (ScaNN) and ``retrieval_brute_force``,
  for ``tfdssm serve`` and ScaNN-enabled TF Serving builds;
* ``models.stock.config``: ``towers`` and ``retrieval_brute_force`` only, for
  the stock ``tensorflow/serving`` image, which cannot load ScaNN's ops.

``base_path`` is ``/models/<name>``: mount the export directory at ``/models``
in the container. ``tfdssm serve`` maps ``/models/<name>`` back to
``<export dir>/<name>``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tfdssm.errors import ExportError
from tfdssm.export.versioning import version_dirs

CONFIG_FILE = "models.config"
STOCK_CONFIG_FILE = "models.stock.config"
CONTAINER_ROOT = "/models"
SCANN_MODELS = ("retrieval",)


def model_config_text(names: Sequence[str], root: str = CONTAINER_ROOT) -> str:
    """A ``ModelServerConfig`` text proto serving ``names`` from ``root/<name>``.

    >>> print(model_config_text(["towers"]).strip())
    model_config_list {
      config {
        name: "towers"
        base_path: "/models/towers"
        model_platform: "tensorflow"
      }
    }
    """
    config = model_server_config_pb2.ModelServerConfig()
    for name in names:
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = f"{root.rstrip('/')}/{name}"
        entry.model_platform = "tensorflow"
    return text_format.MessageToString(config)


def write_model_configs(export_dir: str | os.PathLike, names: Sequence[str]) -> dict:
    """Writes ``models.config`` (all of ``names``) and ``models.stock.config``.

    Returns:
        The ``model_config`` entry of ``export.json``.
    """
    export_dir = pathlib.Path(export_dir)
    stock = [n for n in names if n not in SCANN_MODELS]
    for file, models in ((CONFIG_FILE, names), (STOCK_CONFIG_FILE, stock)):
        tmp = export_dir / f".{file}.tmp-{os.getpid()}"
        tmp.write_text(model_config_text(models))
        os.replace(tmp, export_dir / file)
    return {"all": CONFIG_FILE, "stock": STOCK_CONFIG_FILE, "models": list(names),
            "stock_models": stock, "container_root": CONTAINER_ROOT}


def read_model_config(
    export_dir: str | os.PathLike, config_file: str | os.PathLike | None = None
) -> list[tuple[str, pathlib.Path]]:
    """``[(model name, local base path)]`` from a config, else from the directory.

    Without a config file, every subdirectory holding version directories
    (:func:`tfdssm.export.versioning.parse_version`) is a model named after it.

    Raises:
        ExportError: unreadable config, a model named twice or not at all, or
            nothing to serve.
    """
    export_dir = pathlib.Path(export_dir)
    path = pathlib.Path(config_file) if config_file else export_dir / CONFIG_FILE
    if not export_dir.is_dir():
        problem = "is not a directory" if export_dir.exists() else "does not exist"
        raise ExportError(f"export dir {str(export_dir)!r} {problem}; pass the "
                          "--export-dir used with `tfdssm train`.")
    if path.is_file():
        config = model_server_config_pb2.ModelServerConfig()
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as error:
            raise ExportError(f"{str(path)!r} is not a valid TF Serving model "
                              f"config: {error}") from None
        models = [(c.name, resolve_base_path(c.base_path, export_dir))
                  for c in config.model_config_list.config]
        _check_names(models, path)
    elif config_file:
        raise ExportError(f"model config {str(path)!r} not found.")
    else:
        models = [(p.name, p) for p in sorted(export_dir.iterdir())
                  if p.is_dir() and version_dirs(p)]
    if not models:
        raise ExportError(f"nothing to serve in {str(export_dir)!r}: no {CONFIG_FILE} "
                          "and no <model>/<version> SavedModels.")
    return models


def _check_names(
    models: Sequence[tuple[str, pathlib.Path]], path: pathlib.Path
) -> None:
    """Refuses a config naming a model twice or a model without a name, as TF
    Serving does ("Illegal to list model X multiple times in config list")."""
    seen: dict[str, int] = {}
    for number, (name, _) in enumerate(models, 1):
        if not name:
            raise ExportError(
                f"{str(path)!r}: model config entry {number} has no name; give "
                'every config a name: "...".')
        if name in seen:
            raise ExportError(
                f"{str(path)!r} lists model {name!r} more than once (config entries "
                f"{seen[name]} and {number}); TF Serving refuses such a config too. "
                "Keep one entry per model name.")
        seen[name] = number


def resolve_base_path(base_path: str, export_dir: pathlib.Path) -> pathlib.Path:
    """Maps a config ``base_path`` to a local directory.

    ``/models/<name>`` (the container path tfdssm writes) becomes
    ``export_dir/<name>``; other absolute paths are kept; relative paths are
    relative to the export directory.

    >>> str(resolve_base_path("/models/towers", pathlib.Path("/data/ml")))
    '/data/ml/towers'
    """
    path = pathlib.PurePosixPath(base_path)
    root = pathlib.PurePosixPath(CONTAINER_ROOT)
    if path.is_relative_to(root) and not pathlib.Path(base_path).exists():
        return export_dir / path.relative_to(root)
    if path.is_absolute():
        return pathlib.Path(base_path)
    return export_dir / base_path
