"""Old module paths (before the layered subpackages), importable for one release.

``import tfdssm.towers`` still works and warns (``DeprecationWarning``) with the
new place. A path whose module was split in two is a module that looks each
name up in the new modules, in order. :data:`ALIASES` is the whole table; it is
installed by ``import tfdssm``.

>>> import sys, warnings
>>> _ = sys.modules.pop("tfdssm.towers", None)  # as in a fresh process
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     from tfdssm.towers import Tower
>>> Tower.__module__, caught[0].category.__name__
('tfdssm.model.towers', 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

REMOVED_IN = "0.3"

#: Old dotted name -> new module(s), searched in order for each attribute.
ALIASES: dict[str, tuple[str, ...]] = {
    "tfdssm.hashing": ("tfdssm.text.hashing",),
    "tfdssm.unicode_table": ("tfdssm.text.unicode_table",),
    "tfdssm.layers": ("tfdssm.features.layers",),
    "tfdssm.history": ("tfdssm.features.history", "tfdssm.model.shared"),
    "tfdssm.towers": ("tfdssm.model.towers",),
    "tfdssm.multihead": ("tfdssm.model.multihead",),
    "tfdssm.losses": ("tfdssm.model.losses",),
    "tfdssm.sampling": ("tfdssm.model.sampling",),
    "tfdssm.optimizers": ("tfdssm.model.optimizers",),
    "tfdssm.youtube": ("tfdssm.model.youtube", "tfdssm.model.item_tower",
                       "tfdssm.features.example_age"),
    "tfdssm.datasets": ("tfdssm.data.movielens",),
    "tfdssm.evaluate": ("tfdssm.training.metrics", "tfdssm.model.runner"),
    "tfdssm.train": ("tfdssm.training.run", "tfdssm.training.evaluation",
                     "tfdssm.data.readers", "tfdssm.export.tflite"),
    "tfdssm.checkpoints": ("tfdssm.training.checkpoints",),
    "tfdssm.distribute": ("tfdssm.training.distribute",),
    "tfdssm.index": ("tfdssm.export.index",),
    "tfdssm.sharding": ("tfdssm.export.sharding",),
    "tfdssm.candidates": ("tfdssm.export.candidates",),
    "tfdssm.warmup": ("tfdssm.export.warmup",),
    "tfdssm.tflite": ("tfdssm.export.tflite",),
    "tfdssm.serving.config": ("tfdssm.export.serving_config",),
    "tfdssm.pipelines": ("tfdssm.recipes",),
    "tfdssm.pipelines.movielens": ("tfdssm.recipes.movielens",),
    "tfdssm.pipelines.pairs": ("tfdssm.recipes.pairs",),
    "tfdssm.pipelines.history": ("tfdssm.data.history",
                                 "tfdssm.recipes.movielens_history"),
}
# Old modules whose name is now a package (tfdssm.text, .features, .model,
# .data, .export) keep their attributes through the package's lazy exports.


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of :data:`ALIASES` and loads their new modules."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=False)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a fresh module; exec_module replaces it

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__
        targets = ALIASES[old]
        warnings.warn(
            f"{old} moved to {' and '.join(targets)}; import it from there (the "
            f"old path goes away in tfdssm {REMOVED_IN}).",
            DeprecationWarning, stacklevel=_caller_stacklevel())
        if len(targets) == 1:  # the module itself: importlib returns sys.modules[old]
            sys.modules[old] = importlib.import_module(targets[0])
            return
        modules = [importlib.import_module(t) for t in targets]

        def __getattr__(name: str) -> Any:
            for new in modules:
                if hasattr(new, name):
                    return getattr(new, name)
            raise AttributeError(f"module {old!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__all__ = sorted({n for m in modules for n in getattr(m, "__all__", [])})
        module.__doc__ = f"Deprecated alias of {', '.join(targets)}."


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside importlib and this module."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
            frame.f_code.co_filename == __file__
            or "importlib" in frame.f_code.co_filename
            or frame.f_code.co_filename.startswith("<frozen")):
        frame, level = frame.f_back, level + 1
    return level


_FINDER = _AliasFinder()


def install() -> None:
    """Puts the alias finder first on ``sys.meta_path`` (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
