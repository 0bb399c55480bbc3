"""The feature-kind registry: ``kind`` -> spec class, and back from a config.

Every kind registers itself with :func:`register_feature_kind` when its module
is imported; importing :mod:`tfdssm.features` imports them all, so
:func:`feature_from_config` knows every kind that ships with tfdssm (and any
kind a user registers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tfdssm.errors import ConfigError

if TYPE_CHECKING:
    from tfdssm.features.protocol import Feature

_KINDS: dict[str, type] = {}


def register_feature_kind(cls: type) -> type:
    """Lets :func:`feature_from_config` rebuild specs of ``cls`` (by its
    ``kind``); usable as a decorator. A new kind is one module that defines a
    :class:`tfdssm.features.Feature` and decorates it."""
    _KINDS[cls.kind] = cls
    return cls


def feature_kind(kind: str) -> type:
    """The registered spec class of ``kind``.

    Raises:
        ConfigError: for an unknown ``kind``.
    """
    if kind not in _KINDS:
        raise ConfigError(
            f"unknown feature kind {kind!r}; expected one of {sorted(_KINDS)}."
        )
    return _KINDS[kind]


def feature_from_config(config: dict[str, Any]) -> Feature:
    """Rebuilds a spec from :meth:`to_config` output.

    Raises:
        ConfigError: for an unknown ``kind`` or unknown fields.
    """
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _KINDS:
        raise ConfigError(
            f"unknown feature kind {kind!r}; expected one of {sorted(_KINDS)}."
        )
    for key in ("vocabulary", "word_ngrams"):
        if key in config:
            config[key] = tuple(config[key])
    try:
        return _KINDS[kind](**config)
    except TypeError as error:
        raise ConfigError(f"bad {kind} feature config {config}: {error}") from None


def vocabulary_of(
    values: Iterable[Any], separator: str | None = None
) -> tuple[str, ...]:
    """Sorted distinct values of a column (split by ``separator`` if given).

    >>> vocabulary_of(["b|a", "a", ""], separator="|")
    ('a', 'b')
    """
    seen: set[str] = set()
    for value in values:
        text = str(value)
        parts = text.split(separator) if separator else [text]
        seen.update(p for p in parts if p)
    return tuple(sorted(seen))

