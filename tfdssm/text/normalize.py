"""Text -> normalised Unicode code points: the part of hashing that needs strings.

This stage runs inside the SavedModel (core TensorFlow ops only: ``UnicodeDecode``
and hash-table lookups, so stock TF Serving loads it) and, on a phone, in the app
with the platform's own Unicode library. Its output is the input of the integer
stage in :mod:`tfdssm.text.hashing`, which is what the TFLite model runs.

The definition (see :mod:`tfdssm.text.unicode_table` for the frozen table):

1. decode UTF-8; invalid bytes become U+FFFD;
2. NFKC and full case folding, i.e. ``unicodedata.normalize("NFKC", t).casefold()``;
3. keep the first ``max_length`` code points and pad with 0 to ``max_length``.

Whitespace and control characters are left in place: the integer stage treats them
(and the pad value 0) as word boundaries.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.text.unicode_table import MAX_CODE_POINT, load_table

PAD = 0
"""The pad value of code-point tensors (NUL is a boundary anyway)."""

_COMPOSE_PASSES = 2
_PAGE_BITS = 8
_PAGE_MASK = (1 << _PAGE_BITS) - 1
_LAST_PAGE = MAX_CODE_POINT >> _PAGE_BITS


def _page_table(keys: np.ndarray,
                values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A two-level dense map from code points to values (instead of a hash table).

    Args:
        keys: int64 ``[n]`` distinct code points.
        values: int64 ``[n]`` their values; every other code point maps to 0.

    Returns:
        ``page_slots``: int64 ``[(MAX_CODE_POINT >> 8) + 1]``, the slot of each
        256-code-point page (slot 0: a page of zeros); ``slot_values``: int64
        ``[(pages + 1) * 256]``. A code point's value is
        ``slot_values[page_slots[cp >> 8] * 256 + (cp & 255)]``. tfdssm's keys
        touch 69 pages, so this is ~160 KB.
    """
    keys = np.asarray(keys, np.int64)
    pages = np.unique(keys >> _PAGE_BITS)
    page_slots = np.zeros([_LAST_PAGE + 1], np.int64)
    page_slots[pages] = np.arange(1, len(pages) + 1)
    slot_values = np.zeros([(len(pages) + 1) << _PAGE_BITS], np.int64)
    slots = (page_slots[keys >> _PAGE_BITS] << _PAGE_BITS) + (keys & _PAGE_MASK)
    slot_values[slots] = values
    return page_slots, slot_values


def _code_table(table: Any) -> tuple[np.ndarray, np.ndarray]:
    """The page table of each code point's code: ``2 * (expansion + 1) + ends``.

    ``expansion`` is the code point's row in the expansion table (-1: none);
    ``ends`` is 1 if it can end a composing pair. One lookup answers both
    questions the normaliser asks of every code point.
    """
    seconds = np.unique(table.compose_keys % (MAX_CODE_POINT + 1))
    keys = np.union1d(table.expand_keys, seconds)
    codes = np.zeros(len(keys), np.int64)
    codes[np.searchsorted(keys, table.expand_keys)] += 2 * (
        np.arange(len(table.expand_keys)) + 1)
    codes[np.searchsorted(keys, seconds)] += 1
    return _page_table(keys, codes)


def encode_text(text: str, max_length: int) -> np.ndarray:
    """Reference encoder: what an app does before calling the TFLite tower.

    Args:
        text: Any Python string.
        max_length: Number of code points the model takes.

    Returns:
        int32 ``[max_length]``: code points of ``NFKC(text).casefold()``, truncated
        to ``max_length`` and padded with 0.

    >>> encode_text("Straße", 8).tolist()
    [115, 116, 114, 97, 115, 115, 101, 0]
    """
    normalised = unicodedata.normalize("NFKC", text).casefold()
    points = [ord(c) for c in normalised[:max_length]]
    out = np.zeros([max_length], dtype=np.int32)
    out[: len(points)] = points
    return out


def prefix_bytes(max_length: int) -> int:
    """Bytes of a UTF-8 text that determine its first ``max_length`` code points.

    >>> prefix_bytes(256)
    4160
    """
    return 4 * (4 * max_length + 2 * _COMPOSE_PASSES + 12)


def to_valid_unicode(text: str) -> str:
    """Replaces lone surrogates (which UTF-8 cannot encode) with U+FFFD.

    Python strings can hold lone surrogates (from ``surrogateescape`` decoding or
    JSON ``"\\ud800"`` escapes); TensorFlow cannot encode them. Valid text is
    returned unchanged.

    >>> to_valid_unicode("a\\ud800b") == "a\\ufffdb"
    True
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def normalize_code_points_py(text: str | bytes) -> list[int]:
    """Pure-Python twin of the in-graph normalisation (same table, same rules).

    Unlike :func:`encode_text` this applies tfdssm's frozen table exactly as the
    graph does, so it is the reference that in-graph tests compare against.

    Args:
        text: Any Python string (lone surrogates become U+FFFD), or raw bytes
            (invalid UTF-8 becomes U+FFFD exactly as ``UnicodeDecode`` does).

    Returns:
        The normalised code points, not truncated.
    """
    compose, seconds, expand = _python_tables()
    if isinstance(text, bytes):
        data = text.decode("utf-8", errors="replace")
    else:
        data = to_valid_unicode(text)
    points = [ord(c) for c in data]
    # Only a code point in ``seconds`` can end a composing pair (as in-graph).
    passes = _COMPOSE_PASSES if not seconds.isdisjoint(points) else 0
    for _ in range(passes):
        hits = [
            (points[i] * (MAX_CODE_POINT + 1) + points[i + 1]) in compose
            for i in range(len(points) - 1)
        ] + [False]
        out: list[int] = []
        i = 0
        while i < len(points):
            starts = hits[i] and not (i > 0 and hits[i - 1])
            if starts:
                out.append(compose[points[i] * (MAX_CODE_POINT + 1) + points[i + 1]])
                i += 2
            else:
                out.append(points[i])
                i += 1
        points = out
    result: list[int] = []
    for cp in points:
        result.extend(expand.get(cp, (cp,)))
    return result


@functools.lru_cache(maxsize=1)
def _python_tables() -> tuple[dict[int, int], frozenset[int],
                               dict[int, tuple[int, ...]]]:
    """The frozen table as Python objects: pair key -> composed, the code points
    that can end a pair, code point -> expansion."""
    table = load_table()
    compose = dict(zip(table.compose_keys.tolist(), table.compose_values.tolist(),
                       strict=True))
    seconds = frozenset(k % (MAX_CODE_POINT + 1) for k in compose)
    splits = table.expand_splits.tolist()
    values = table.expand_values.tolist()
    expand = {
        cp: tuple(values[splits[i] : splits[i + 1]])
        for i, cp in enumerate(table.expand_keys.tolist())
    }
    return compose, seconds, expand


class TextNormalizer(tf.Module):
    """In-graph text normalisation with core TF ops (no tf-text, no custom ops).

    Example:

    >>> normalizer = TextNormalizer()
    >>> normalizer(tf.constant(["ÉCOLE"]), max_length=6).numpy().tolist()
    [[233, 99, 111, 108, 101, 0]]
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name)
        table = load_table()
        self._compose = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(table.compose_keys), tf.constant(table.compose_values)
            ),
            default_value=-1,
        )
        page_slots, slot_codes = _code_table(table)
        self._page_slots = tf.constant(page_slots)
        self._slot_codes = tf.constant(slot_codes)
        self._splits = tf.constant(table.expand_splits)
        self._values = tf.constant(table.expand_values)

    def __call__(self, texts: tf.Tensor, max_length: int) -> tf.Tensor:
        """Normalises a batch of strings into padded code points.

        Args:
            texts: string ``[batch]``.
            max_length: Static number of code points to keep.

        Returns:
            int32 ``[batch, max_length]``, padded with :data:`PAD`.
        """
        texts = tf.convert_to_tensor(texts, dtype=tf.string)
        # The first max_length output code points depend on at most the first
        # 4 * max_length + 9 decoded ones (two pairwise composition passes;
        # expansions never shorten), i.e. on at most 4 bytes each. Cutting the
        # rest before decoding keeps a 1 MB (or 64 MB) text as cheap as a short
        # one without changing the result.
        texts = tf.strings.substr(texts, 0, prefix_bytes(max_length), unit="BYTE")
        points = tf.strings.unicode_decode(
            texts, "UTF-8", errors="replace", replacement_char=0xFFFD
        )
        points = tf.cast(points, tf.int64)
        codes = self._codes(points.flat_values)
        # Only 63 code points can end a composing pair; text without any of
        # them (NFC text nearly always) skips both composition passes.
        points, codes = tf.cond(
            self._may_compose(codes),
            lambda: self._compose_all(points),
            lambda: (points, codes),
        )
        points = self._expand_points(points, codes)
        batch = tf.shape(texts)[0]
        points = points.to_tensor(default_value=PAD, shape=[None, max_length])
        return tf.reshape(tf.cast(points, tf.int32), [batch, max_length])

    def _codes(self, flat: tf.Tensor) -> tf.Tensor:
        """int64 ``[n]`` code points -> their codes (see :func:`_code_table`)."""
        page = tf.gather(self._page_slots, tf.minimum(
            tf.bitwise.right_shift(flat, _PAGE_BITS), _LAST_PAGE))
        return tf.gather(self._slot_codes, page * (_PAGE_MASK + 1)
                         + tf.bitwise.bitwise_and(flat, _PAGE_MASK))

    @staticmethod
    def _may_compose(codes: tf.Tensor) -> tf.Tensor:
        """Whether any of the code points can end a composing pair."""
        return tf.reduce_any(tf.bitwise.bitwise_and(codes, 1) > 0)

    def _compose_all(
        self, points: tf.RaggedTensor
    ) -> tuple[tf.RaggedTensor, tf.Tensor]:
        for _ in range(_COMPOSE_PASSES):
            points = self._compose_pairs(points)
        return points, self._codes(points.flat_values)

    def _compose_pairs(self, points: tf.RaggedTensor) -> tf.RaggedTensor:
        flat = points.flat_values
        rows = points.value_rowids()
        # Shift by appending then slicing, so that empty input stays empty.
        nxt = tf.concat([flat, [-1]], axis=0)[1:]
        same_row = tf.equal(tf.concat([rows, [-1]], axis=0)[1:], rows)
        composed = self._compose.lookup(flat * (MAX_CODE_POINT + 1) + nxt)
        hit = tf.logical_and(composed >= 0, same_row)
        previous_hit = tf.concat([[False], hit], axis=0)[:-1]
        starts = tf.logical_and(hit, tf.logical_not(previous_hit))
        consumed = tf.concat([[False], starts], axis=0)[:-1]
        flat = tf.where(starts, composed, flat)
        return tf.ragged.boolean_mask(
            points.with_flat_values(flat), tf.logical_not(
                points.with_flat_values(consumed)
            )
        )

    def _expand_points(self, points: tf.RaggedTensor,
                       codes: tf.Tensor) -> tf.RaggedTensor:
        flat = points.flat_values
        index = tf.bitwise.right_shift(codes, 1) - 1
        mapped = index >= 0
        safe = tf.maximum(index, 0)
        size = tf.shape(self._values, out_type=tf.int64)[0]
        position = tf.range(tf.shape(flat, out_type=tf.int64)[0])
        starts = tf.where(mapped, tf.gather(self._splits, safe), size + position)
        lengths = tf.where(
            mapped,
            tf.gather(self._splits, safe + 1) - tf.gather(self._splits, safe),
            tf.ones_like(flat),
        )
        pool = tf.concat([tf.cast(self._values, tf.int64), flat], axis=0)
        gathered = tf.gather(
            pool, tf.ragged.range(starts, starts + lengths).flat_values
        )
        row_lengths = tf.math.unsorted_segment_sum(
            lengths, points.value_rowids(), points.nrows()
        )
        return tf.RaggedTensor.from_row_lengths(gathered, row_lengths)
