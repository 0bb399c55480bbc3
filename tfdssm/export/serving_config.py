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

**The commit record.** ``models.config`` is an export's commit record: it is
written last, atomically (temporary file + rename), after every SavedModel
version, the candidate files and ``export.json``, and it pins each model to the
version that export wrote with ``model_version_policy { specific { versions: N }
}``. Stock TF Serving (which re-reads the file with
``--model_config_file_poll_wait_seconds``) and ``tfdssm serve`` serve exactly
the pinned versions, never simply the newest directory, so an export killed or
failed before its commit leaves the previous export's whole set served (its
orphan versions are ignored), and a committed export becomes the served set as a
whole. ``export.json`` records the same versions (and a digest of the candidate
files): a ``models.config`` whose pins differ from ``export.json`` marks an
export that died between the two, and :func:`check_committed` says so.
``models.stock.config`` carries the same pins (written just before).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Mapping, Sequence

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tfdssm.errors import ExportError
from tfdssm.export.versioning import version_dirs

CONFIG_FILE = "models.config"
STOCK_CONFIG_FILE = "models.stock.config"
CONTAINER_ROOT = "/models"
SCANN_MODELS = ("retrieval",)


def model_config_text(
    names: Sequence[str], root: str = CONTAINER_ROOT,
    versions: Mapping[str, int] | None = None,
) -> str:
    """A ``ModelServerConfig`` text proto serving ``names`` from ``root/<name>``,
    each pinned to ``versions[name]`` when given.

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
        if versions and name in versions:
            entry.model_version_policy.specific.versions.append(int(versions[name]))
    return text_format.MessageToString(config)


def config_entry(names: Sequence[str]) -> dict:
    """The ``model_config`` entry of ``export.json`` for configs serving ``names``."""
    stock = [n for n in names if n not in SCANN_MODELS]
    return {"all": CONFIG_FILE, "stock": STOCK_CONFIG_FILE, "models": list(names),
            "stock_models": stock, "container_root": CONTAINER_ROOT,
            "pinned": "model_version_policy { specific { versions: N } }"}


def write_model_configs(
    export_dir: str | os.PathLike, names: Sequence[str],
    versions: Mapping[str, int] | None = None,
) -> dict:
    """Writes ``models.stock.config`` then ``models.config`` (all of ``names``),
    each atomically and synced; ``models.config`` last: it commits the export
    (see the module docstring).

    Args:
        export_dir: The export directory.
        names: The models to serve.
        versions: ``{name: version}`` to pin (TF Serving's ``specific`` policy);
            without it, servers serve each model's newest version.

    Returns:
        The ``model_config`` entry of ``export.json``.
    """
    export_dir = pathlib.Path(export_dir)
    stock = [n for n in names if n not in SCANN_MODELS]
    for file, models in ((STOCK_CONFIG_FILE, stock), (CONFIG_FILE, names)):
        tmp = export_dir / f".{file}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(model_config_text(models, versions=versions))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, export_dir / file)
        finally:
            if tmp.exists():
                tmp.unlink()
    return config_entry(names)


def pinned_versions(
    export_dir: str | os.PathLike, config_file: str | os.PathLike | None = None
) -> dict[str, int | None]:
    """``{model: pinned version or None}`` of a config (see
    :func:`read_model_specs`)."""
    return {name: version for name, _, version in
            read_model_specs(export_dir, config_file)}


def check_committed(export_dir: str | os.PathLike, info: Mapping) -> None:
    """Checks that ``export.json`` (``info``) and the top-level data files
    (``corpus.parquet``, ``candidates.npy``, ``candidate_ids.txt``) belong to the
    export ``models.config`` commits: the same pinned versions, the same digests.

    Raises:
        ExportError: they differ: an export stopped after writing them and
            before its commit; re-run it.
    """
    export_dir = pathlib.Path(export_dir)
    pins = pinned_versions(export_dir)
    commit = info.get("commit") or {}
    recorded = commit.get("versions") or {
        name: (info.get(name) or {}).get("version") for name in pins}
    differ = sorted(
        n for n in pins if pins[n] is not None and pins[n] != recorded.get(n)
    )
    if differ:
        raise ExportError(
            f"{str(export_dir)!r}: {CONFIG_FILE} serves "
            f"{ {n: pins[n] for n in differ} } but export.json describes "
            f"{ {n: recorded.get(n) for n in differ} }: an export stopped before its "
            "commit. Re-run the export (`tfdssm train`).")
    for name, want in (commit.get("sha256") or {}).items():
        digest = hashlib.sha256()
        try:
            with open(export_dir / name, "rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
        except OSError as error:
            raise ExportError(f"{str(export_dir / name)!r} cannot be read ({error}); "
                              "re-run the export.") from None
        if digest.hexdigest() != want:
            raise ExportError(
                f"{str(export_dir / name)!r} is not the file of the committed export "
                f"(sha256 {digest.hexdigest()[:12]}..., export.json records "
                f"{want[:12]}...): an export stopped before its commit. Re-run the "
                "export (`tfdssm train`).")


def read_model_config(
    export_dir: str | os.PathLike, config_file: str | os.PathLike | None = None
) -> list[tuple[str, pathlib.Path]]:
    """``[(model name, local base path)]`` (see :func:`read_model_specs`)."""
    return [(name, path) for name, path, _ in read_model_specs(export_dir, config_file)]


def read_model_specs(
    export_dir: str | os.PathLike, config_file: str | os.PathLike | None = None
) -> list[tuple[str, pathlib.Path, int | None]]:
    """``[(model name, local base path, pinned version)]`` from a config, else
    from the directory.

    The pinned version is the one of a ``model_version_policy { specific {
    versions: N } }`` (the largest, if several are listed; ``tfdssm serve``
    serves one version per model), else ``None``: serve the newest.

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
        models = [(c.name, resolve_base_path(c.base_path, export_dir),
                   _pinned(c, path)) for c in config.model_config_list.config]
        _check_names([(n, p) for n, p, _ in models], path)
    elif config_file:
        raise ExportError(f"model config {str(path)!r} not found.")
    else:
        models = [(p.name, p, None) for p in sorted(export_dir.iterdir())
                  if p.is_dir() and version_dirs(p)]
    if not models:
        raise ExportError(f"nothing to serve in {str(export_dir)!r}: no {CONFIG_FILE} "
                          "and no <model>/<version> SavedModels.")
    return models


def _pinned(entry, path: pathlib.Path) -> int | None:
    policy = entry.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "specific":
        if not policy.specific.versions:
            raise ExportError(
                f"{str(path)!r}: model {entry.name!r} has a specific version policy "
                "with no versions; list one (versions: N) or drop the policy.")
        return max(int(v) for v in policy.specific.versions)
    return None  # latest (or all: tfdssm serve serves the newest one)


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
