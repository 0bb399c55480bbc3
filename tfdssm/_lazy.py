"""Lazy package attributes (PEP 562): a name's module is imported on first use.

``import tfdssm`` must stay cheap and must run before TensorFlow loads (it
selects Keras 2), so packages list what they export and import it on demand.

>>> import types
>>> getattr_, dir_ = lazy_attributes("demo", {"sqrt": "math"})
>>> getattr_("sqrt")(9.0)
3.0
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_attributes(
    package: str,
    exports: Mapping[str, str],
    fallback: Iterable[str] = (),
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` resolving names lazily.

    Lookup order: ``exports`` (name -> module holding it), then a submodule of
    ``package`` of that name, then each ``fallback`` module (names a package
    kept from the module it replaced).

    Args:
        package: The package's ``__name__``.
        exports: Attribute name -> dotted module that defines it.
        fallback: Modules searched last, in order.

    Returns:
        ``(__getattr__, __dir__)`` to assign at the package's top level.
    """
    fallback = tuple(fallback)

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            module = sys.modules.get(package)
            if module is not None:
                setattr(module, name, value)
            return value
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            if importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError:
            pass
        for where in fallback:
            found = vars(importlib.import_module(where))
            if name in found:
                return found[name]
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        module = sys.modules.get(package)
        return sorted({*vars(module), *exports} if module else set(exports))

    return __getattr__, __dir__
