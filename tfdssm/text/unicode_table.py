"""The frozen Unicode table behind tfdssm's text normalisation.

tfdssm normalises text as ``unicodedata.normalize("NFKC", text).casefold()`` would
(Unicode 14.0, the version of Python 3.11). Core TensorFlow has no normalisation op,
so the same mapping is carried into the graph as two tables, frozen in
``tfdssm/text/nfkc_casefold_unicode14.json`` so that hash ids never change with the
Python or ICU version of a machine:

* **compose**: canonical pairs ``(base, mark) -> composed`` (``e`` + U+0301 -> ``é``),
  applied in two greedy left-to-right passes;
* **expand**: every code point whose ``NFKC(c).casefold()`` differs from itself,
  mapped to that sequence (``Σ`` -> ``σ``, ``ß`` -> ``ss``, ``ﬁ`` -> ``fi``,
  fullwidth ``Ａ`` -> ``a``).

Composition is limited to pairs (no canonical reordering of several marks, no Hangul
jamo composition); text typed on ordinary keyboards is already precomposed, so the
difference from full NFKC only shows on unusual decomposed input.

Regenerate (only ever with a new table file name, since ids depend on it) with
``python scripts/generate_unicode_table.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import unicodedata

import numpy as np

TABLE_FILE = "nfkc_casefold_unicode14.json"
UNICODE_VERSION = "14.0.0"
MAX_CODE_POINT = 0x10FFFF


@dataclasses.dataclass(frozen=True)
class UnicodeTable:
    """Arrays of the frozen normalisation table.

    Attributes:
        compose_keys: int64 ``[num_pairs]``, ``base * 0x110000 + mark``.
        compose_values: int64 ``[num_pairs]``, the composed code point.
        expand_keys: int64 ``[num_expanded]``, code points that change.
        expand_splits: int64 ``[num_expanded + 1]``, row splits into
            ``expand_values``.
        expand_values: int32 ``[total]``, the replacement code points.
    """

    compose_keys: np.ndarray
    compose_values: np.ndarray
    expand_keys: np.ndarray
    expand_splits: np.ndarray
    expand_values: np.ndarray


def build_table_dict() -> dict[str, object]:
    """Builds the table from this Python's ``unicodedata`` (for regeneration).

    Returns:
        A JSON-serialisable dict with ``unicode_version``, ``compose`` (list of
        ``[base, mark, composed]``) and ``expand`` (list of ``[cp, [cps...]]``).
    """
    compose = []
    expand = []
    for cp in range(MAX_CODE_POINT + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        char = chr(cp)
        decomposition = unicodedata.decomposition(char)
        if decomposition and not decomposition.startswith("<"):
            parts = [int(p, 16) for p in decomposition.split()]
            pair = "".join(chr(p) for p in parts)
            if len(parts) == 2 and unicodedata.normalize("NFC", pair) == char:
                compose.append([parts[0], parts[1], cp])
        mapped = unicodedata.normalize("NFKC", char).casefold()
        if mapped != char:
            expand.append([cp, [ord(c) for c in mapped]])
    return {
        "unicode_version": unicodedata.unidata_version,
        "compose": compose,
        "expand": expand,
    }


@functools.lru_cache(maxsize=1)
def load_table() -> UnicodeTable:
    """Loads the frozen table shipped with tfdssm.

    Returns:
        The :class:`UnicodeTable` arrays.
    """
    path = pathlib.Path(__file__).parent / TABLE_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    compose = np.asarray(raw["compose"], dtype=np.int64).reshape(-1, 3)
    lengths = [len(values) for _, values in raw["expand"]]
    return UnicodeTable(
        compose_keys=compose[:, 0] * (MAX_CODE_POINT + 1) + compose[:, 1],
        compose_values=compose[:, 2],
        expand_keys=np.asarray([cp for cp, _ in raw["expand"]], dtype=np.int64),
        expand_splits=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        expand_values=np.asarray(
            [v for _, values in raw["expand"] for v in values], dtype=np.int32
        ),
    )
