"""Text normalisation: in-graph tables vs Python's unicodedata."""

import unicodedata

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tfdssm  # noqa: F401
from tfdssm.text.normalize import (
    PAD,
    TextNormalizer,
    _code_table,
    encode_text,
    normalize_code_points_py,
)
from tfdssm.text.unicode_table import UNICODE_VERSION, build_table_dict, load_table

NORMALIZER = TextNormalizer()

CASES = [
    "лучшие рестораны в Москве", "北京烤鸭", "🙂👨\u200d👩\u200d👧", "Café crème",
    "Cafe\u0301", "E\u0301COLE", "", "   \t\n ", "ΣΟΦΊΑ ΟΔΟΣ", "Straße ﬁne Ｔｏｋｙｏ",
    "Vie\u0323\u0302t Nam", "İstanbul", "x" * 300, "½ ㍿ ℃",
]


def graph(texts, length):
    return NORMALIZER(tf.constant(texts), length).numpy()


@pytest.mark.parametrize("text", CASES)
def test_in_graph_equals_reference_and_unicodedata(text):
    length = 64
    row = graph([text], length)[0].tolist()
    reference = normalize_code_points_py(text)[:length]
    assert row == reference + [PAD] * (length - len(reference))
    assert row == encode_text(text, length).tolist()  # what an app computes


def test_casefold_not_lower():
    # casefold is context-free: final sigma folds to sigma, ß to ss.
    assert graph(["ΟΔΟΣ ß"], 8)[0].tolist() == [ord(c) for c in "οδοσ ss"] + [0]


def test_truncation_and_padding_shape():
    out = graph(["abc", "x" * 300, ""], 5)
    assert out.shape == (3, 5) and out.dtype == np.int32
    assert out[0].tolist() == [97, 98, 99, 0, 0]
    assert out[1].tolist() == [120] * 5
    assert out[2].tolist() == [0] * 5


def test_invalid_utf8_becomes_replacement_character():
    out = graph([b"ok\xff\xfeok"], 8)[0].tolist()
    assert out[:2] == [111, 107] and 0xFFFD in out and out[-4:-2] == [111, 107]


def test_frozen_table_is_unicode_14_and_regenerates_on_python_311():
    # Ids depend on this table, not on the running Python's Unicode version.
    table = load_table()
    assert UNICODE_VERSION == "14.0.0"
    assert (len(table.expand_keys), len(table.compose_keys)) == (6278, 941)
    if unicodedata.unidata_version == UNICODE_VERSION:  # Python 3.11
        raw = build_table_dict()
        assert [cp for cp, _ in raw["expand"]] == table.expand_keys.tolist()
        assert len(raw["compose"]) == len(table.compose_keys)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_text_normalises_like_the_reference(text):
    row = graph([text], 64)[0].tolist()
    reference = normalize_code_points_py(text)[:64]
    assert row == reference + [PAD] * (64 - len(reference))


# The vectors README.md gives app developers to check their own encoders.
README_VECTORS = {
    "Straße": [115, 116, 114, 97, 115, 115, 101, 0],
    "ÉCOLE": [233, 99, 111, 108, 101, 0, 0, 0],
    "Ｔｏｋｙｏ": [116, 111, 107, 121, 111, 0, 0, 0],
    "ΟΔΟΣ": [959, 948, 959, 963, 0, 0, 0, 0],
}


@pytest.mark.parametrize("text", list(README_VECTORS))
def test_readme_encoder_vectors(text):
    assert encode_text(text, 8).tolist() == README_VECTORS[text]
    assert graph([text], 8)[0].tolist() == README_VECTORS[text]


def test_mixed_batch_equals_row_by_row():
    # Composition is skipped for a batch only when no code point can end a
    # composing pair; a batch mixing both kinds must still match row by row.
    rows = graph(CASES, 64).tolist()
    for text, row in zip(CASES, rows, strict=True):
        reference = normalize_code_points_py(text)[:64]
        assert row == reference + [PAD] * (64 - len(reference)), repr(text)


@pytest.mark.parametrize("texts, expected", [
    (["plain ascii", "北京烤鸭", "ΣΟΦΊΑ"], False),
    (["plain ascii", "Cafe\u0301"], True),  # U+0301 COMBINING ACUTE ends a pair
    (["\U00011099\U000110ba"], True),  # Kaithi: a pair outside the BMP
    ([""], False),
])
def test_may_compose_flags_exactly_the_batches_that_need_composition(texts, expected):
    points = tf.cast(tf.strings.unicode_decode(tf.constant(texts), "UTF-8"), tf.int64)
    codes = NORMALIZER._codes(points.flat_values)
    assert bool(NORMALIZER._may_compose(codes)) is expected


def test_code_table_answers_expansion_and_pair_ending_for_every_code_point():
    table = load_table()
    page_slots, slot_codes = _code_table(table)
    expansion = {int(cp): i for i, cp in enumerate(table.expand_keys)}
    ends = {int(k) % 0x110000 for k in table.compose_keys}
    rng = np.random.default_rng(0)
    probes = np.concatenate([table.expand_keys, sorted(ends),
                             rng.integers(0, 0x110000, 20000),
                             [0, 0x10FFFF, 0xD800, 0xFFFD]])
    codes = slot_codes[page_slots[probes >> 8] * 256 + (probes & 255)]
    assert (codes >> 1).tolist() == [expansion.get(int(cp), -1) + 1 for cp in probes]
    assert (codes & 1).tolist() == [int(int(cp) in ends) for cp in probes]
    assert slot_codes.nbytes < 200_000  # ~70 pages, not a 1.1M-entry array
