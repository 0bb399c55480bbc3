"""Letter-trigram word hashing (DSSM, Huang et al. 2013) over Unicode code points.

The paper's word hashing turns ``good`` into ``#go goo ood od#``: each word gets
``#`` boundaries and is cut into letter trigrams. tfdssm does this over normalised
code points (see :mod:`tfdssm.text`) with integer arithmetic only, so the same
function runs in the SavedModel and, with TFLite builtin ops, on a phone.

**Definition (hashing version 1; exported models depend on it).** Given code
points ``x[0..L)`` of normalised text padded with 0:

* ``x[i]`` is a *boundary* if it is 0 (pad), negative or above U+10FFFF, a Unicode
  whitespace (``str.isspace``) or a control character (category Cc);
* every non-boundary position ``i`` yields one trigram ``(c0, c1, c2)`` with
  ``c1 = x[i]`` and ``c0``/``c2`` its neighbours, where a boundary neighbour (or
  the edge of the sequence) is the virtual code point ``BOUNDARY = 0x110000``
  (the paper's ``#``; a literal ``#`` in text stays a letter);
* the trigram's id is a polynomial hash modulo the Mersenne prime ``2**31 - 1``::

      h = (c0 * A) mod P;  h = ((h + c1) * A) mod P;  h = ((h + c2) * A) mod P
      id = h mod num_buckets,   A = 1_000_000_007,  P = 2_147_483_647

  All intermediates stay below 2**63, so int64 ``Mul``/``FloorMod`` are exact in
  TensorFlow and TFLite alike.

So a word of ``n`` letters gives ``n`` trigrams (``#a#`` for ``a``), trigrams never
cross words, and runs of whitespace add nothing.

**Optional word n-grams** (:func:`word_ngram_ids`) use the same arithmetic: a
word's hash ``W`` is the sum of its trigrams' ``h`` modulo ``P`` (found with a
cumulative sum, so it also runs in TFLite builtins); a unigram's id is
``((W + 1) * A mod P) mod num_buckets`` and a bigram's of words ``W, W'`` is
``((((W * A mod P) + W') * A mod P + 2) * A mod P) mod num_buckets``. They share
the trigram buckets, as in fastText.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import tensorflow as tf

from tfdssm.text import unicode_table

HASHING_VERSION = 1
BOUNDARY = 0x110000
MULTIPLIER = 1_000_000_007
MODULUS = 2_147_483_647

# Code points that are whitespace or controls, as closed ranges. A unit test checks
# these against ``str.isspace`` / category Cc over all of Unicode.
BOUNDARY_RANGES: tuple[tuple[int, int], ...] = (
    (0x0000, 0x0020),
    (0x007F, 0x00A0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)


def is_boundary_py(cp: int) -> bool:
    """Whether a code point separates words (pure Python reference).

    >>> is_boundary_py(ord(" ")), is_boundary_py(ord("a")), is_boundary_py(0)
    (True, False, True)
    """
    if cp <= 0 or cp > 0x10FFFF:
        return True
    if 0xD800 <= cp <= 0xDFFF:
        return False
    char = chr(cp)
    return char.isspace() or unicodedata.category(char) == "Cc"


def trigram_hash_py(c0: int, c1: int, c2: int, num_buckets: int) -> int:
    """The bucket of one trigram of code points (pure Python reference).

    >>> trigram_hash_py(BOUNDARY, ord("a"), BOUNDARY, 30000)
    2715
    """
    h = (c0 * MULTIPLIER) % MODULUS
    h = ((h + c1) * MULTIPLIER) % MODULUS
    h = ((h + c2) * MULTIPLIER) % MODULUS
    return h % num_buckets


def trigrams_py(code_points: list[int]) -> list[tuple[int, int, int]]:
    """Letter trigrams of a code-point sequence (pure Python reference).

    >>> ["".join("#" if c == BOUNDARY else chr(c) for c in t)
    ...  for t in trigrams_py([ord(c) for c in "good"])]
    ['#go', 'goo', 'ood', 'od#']
    """
    marked = [BOUNDARY if is_boundary_py(c) else c for c in code_points]
    out = []
    for i, c in enumerate(marked):
        if c == BOUNDARY:
            continue
        c0 = marked[i - 1] if i > 0 else BOUNDARY
        c2 = marked[i + 1] if i + 1 < len(marked) else BOUNDARY
        out.append((c0, c, c2))
    return out


def _h_py(c0: int, c1: int, c2: int) -> int:
    h = (c0 * MULTIPLIER) % MODULUS
    h = ((h + c1) * MULTIPLIER) % MODULUS
    return ((h + c2) * MULTIPLIER) % MODULUS


def word_ngram_ids_py(
    code_points: list[int], num_buckets: int, orders: tuple[int, ...] = (1, 2)
) -> list[int]:
    """Word unigram then bigram ids, in text order (pure Python reference).

    >>> len(word_ngram_ids_py([ord(c) for c in "new york"], 1000))
    3
    """
    words: list[int] = []
    for trigram in trigrams_py(code_points):
        if trigram[0] == BOUNDARY:  # first letter of a word
            words.append(0)
        words[-1] = (words[-1] + _h_py(*trigram)) % MODULUS
    out = []
    if 1 in orders:
        out += [((w + 1) * MULTIPLIER) % MODULUS % num_buckets for w in words]
    if 2 in orders:
        for w, nxt in zip(words, words[1:], strict=False):
            g = ((w * MULTIPLIER) % MODULUS + nxt) * MULTIPLIER % MODULUS
            out.append(((g + 2) * MULTIPLIER) % MODULUS % num_buckets)
    return out


def trigram_ids_py(code_points: list[int], num_buckets: int) -> list[int]:
    """Bucket ids of every trigram, in text order (pure Python reference).

    Args:
        code_points: Normalised code points, possibly padded with 0.
        num_buckets: Number of hash buckets.

    Returns:
        One id in ``[0, num_buckets)`` per non-boundary code point.
    """
    return [trigram_hash_py(*t, num_buckets) for t in trigrams_py(code_points)]


def boundary_mask(code_points: tf.Tensor) -> tf.Tensor:
    """Marks word boundaries with comparisons only (TFLite builtins).

    Args:
        code_points: int32 or int64 ``[batch, length]``.

    Returns:
        bool ``[batch, length]``, True at pad, whitespace, controls and invalid
        values.
    """
    x = tf.cast(code_points, tf.int64)
    mask = tf.logical_or(x <= 0, x > 0x10FFFF)
    for low, high in BOUNDARY_RANGES:
        if low == high:
            mask = tf.logical_or(mask, tf.equal(x, low))
        else:
            mask = tf.logical_or(mask, tf.logical_and(x >= low, x <= high))
    return mask


def trigram_ids(
    code_points: tf.Tensor, num_buckets: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Hashes every position's letter trigram (integer ops only).

    Args:
        code_points: int32 ``[batch, length]`` from :class:`tfdssm.text.TextNormalizer`
            (or an app's encoder).
        num_buckets: Number of hash buckets.

    Returns:
        A pair ``(ids, valid)``: int32 ``[batch, length]`` bucket ids (0 where
        invalid) and bool ``[batch, length]``, True where a trigram is centred.

    >>> ids, valid = trigram_ids(tf.constant([[97, 0, 0]]), 30000)
    >>> ids.numpy().tolist(), valid.numpy().tolist()
    ([[2715, 0, 0]], [[True, False, False]])
    """
    h, valid = trigram_hashes(code_points)
    ids = tf.math.floormod(h, tf.constant(num_buckets, tf.int64))
    ids = tf.where(valid, ids, tf.zeros_like(ids))
    return tf.cast(ids, tf.int32), valid


def trigram_hashes(code_points: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Each position's trigram hash ``h`` before ``mod num_buckets``.

    Args:
        code_points: int32 ``[batch, length]``.

    Returns:
        ``(h, valid)``: int64 ``[batch, length]`` in ``[0, P)`` and bool
        ``[batch, length]``.
    """
    boundary = boundary_mask(code_points)
    x = tf.where(boundary, tf.constant(BOUNDARY, tf.int64),
                 tf.cast(code_points, tf.int64))
    edge = tf.fill([tf.shape(x)[0], 1], tf.constant(BOUNDARY, tf.int64))
    left = tf.concat([edge, x[:, :-1]], axis=1)
    right = tf.concat([x[:, 1:], edge], axis=1)
    a = tf.constant(MULTIPLIER, tf.int64)
    p = tf.constant(MODULUS, tf.int64)
    h = tf.math.floormod(left * a, p)
    h = tf.math.floormod((h + x) * a, p)
    h = tf.math.floormod((h + right) * a, p)
    return h, tf.logical_not(boundary)


def word_ngram_ids(
    code_points: tf.Tensor,
    num_buckets: int,
    orders: tuple[int, ...] = (1, 2),
    dense: bool = False,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Word unigram and/or bigram bucket ids (integer ops only).

    Args:
        code_points: int32 ``[batch, length]``.
        num_buckets: Number of hash buckets.
        orders: Which n-grams: ``(1,)``, ``(2,)`` or ``(1, 2)``.
        dense: Sum per word with a ``[batch, length, length]`` membership mask
            (static shapes; TFLite builtins) instead of a segment sum.

    Returns:
        ``(ids, valid)``: int32 ``[batch, length * len(orders)]`` and bool, unigrams
        first; word ``k`` of a row sits at index ``k`` (bigrams: ``length + k``).

    >>> ids, valid = word_ngram_ids(tf.constant([[110, 101, 119, 32, 121, 0]]), 1000)
    >>> int(tf.reduce_sum(tf.cast(valid, tf.int32)))
    3
    """
    h, valid = trigram_hashes(code_points)
    length = tf.shape(h)[1]
    batch = tf.shape(h)[0]
    previous = tf.concat([tf.zeros_like(valid[:, :1]), valid[:, :-1]], axis=1)
    start = tf.logical_and(valid, tf.logical_not(previous))
    word = tf.cumsum(tf.cast(start, tf.int32), axis=1) - 1
    h = tf.where(valid, h, tf.zeros_like(h))
    if dense:
        member = tf.logical_and(
            tf.equal(word[:, tf.newaxis, :],
                     tf.range(length)[tf.newaxis, :, tf.newaxis]),
            valid[:, tf.newaxis, :],
        )
        sums = tf.reduce_sum(
            tf.where(member, h[:, tf.newaxis, :], tf.zeros_like(h)[:, tf.newaxis, :]),
            axis=2,
        )
    else:
        segment = tf.range(batch)[:, tf.newaxis] * length + tf.maximum(word, 0)
        sums = tf.math.unsorted_segment_sum(
            tf.reshape(h, [-1]), tf.reshape(segment, [-1]), batch * length
        )
        sums = tf.reshape(sums, [batch, length])
    a = tf.constant(MULTIPLIER, tf.int64)
    p = tf.constant(MODULUS, tf.int64)
    n = tf.constant(num_buckets, tf.int64)
    words = tf.math.floormod(sums, p)
    count = tf.reduce_sum(tf.cast(start, tf.int32), axis=1, keepdims=True)
    exists = tf.range(length)[tf.newaxis, :] < count
    ids, masks = [], []
    if 1 in orders:
        ids.append(tf.math.floormod(tf.math.floormod((words + 1) * a, p), n))
        masks.append(exists)
    if 2 in orders:
        following = tf.concat([words[:, 1:], tf.zeros_like(words[:, :1])], axis=1)
        g = tf.math.floormod(tf.math.floormod(words * a, p) + following, p)
        g = tf.math.floormod(tf.math.floormod(g * a, p) + 2, p)
        ids.append(tf.math.floormod(tf.math.floormod(g * a, p), n))
        masks.append(tf.range(length)[tf.newaxis, :] < count - 1)
    if not ids:
        raise ValueError(f"orders must contain 1 and/or 2, received {orders}.")
    ids = tf.concat(ids, axis=1)
    valid = tf.concat(masks, axis=1)
    return tf.cast(tf.where(valid, ids, tf.zeros_like(ids)), tf.int32), valid


def hashing_info() -> dict[str, Any]:
    """The hashing parameters exported models depend on."""
    return {
        "version": HASHING_VERSION,
        "boundary": BOUNDARY,
        "multiplier": MULTIPLIER,
        "modulus": MODULUS,
        "normalization": "NFKC + casefold",
        "unicode_table": unicode_table.TABLE_FILE,
        "unicode_version": unicode_table.UNICODE_VERSION,
        "pad": 0,
    }
