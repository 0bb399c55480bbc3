"""Letter-trigram hashing: golden ids, references, TFLite builtins parity."""

import unicodedata

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_text as tf_text
from hypothesis import given, settings
from hypothesis import strategies as st

import tfdssm  # noqa: F401  (Keras 2 before TensorFlow)
from tfdssm.text import hashing
from tfdssm.text.hashing import BOUNDARY, trigram_ids, trigram_ids_py, trigrams_py
from tfdssm.text.normalize import (
    TextNormalizer,
    normalize_code_points_py,
    to_valid_unicode,
)

BUCKETS = 30000

# Hash ids are a compatibility contract: exported models depend on them. These
# were produced by hashing version 1; a change here breaks every exported model.
GOLDEN = {
    "good": [10003, 24720, 15292, 25691],
    "лучшие рестораны в Москве": [
        7743, 5034, 13485, 10940, 29307, 1366, 7329, 9896, 4291, 28715, 6148,
        15667, 13007, 20845, 1598, 7781, 29480, 26168, 28333, 13865, 9214, 11379,
    ],
    "北京烤鸭": [10829, 11375, 6756, 26942],
    "🙂": [26875],
    "Crème Brûlée": [
        19406, 12621, 12606, 25885, 4095, 18575, 5541, 18388, 14215, 7982, 13160,
    ],
    "café": [8463, 13698, 13876, 21175],
    "": [],
    "   \t\n ": [],
    "C# c++": [13792, 2643, 29260, 27821, 27922],
}


def in_graph_ids(texts, max_length=64, buckets=BUCKETS):
    points = TextNormalizer()(tf.constant(texts), max_length)
    ids, valid = trigram_ids(points, buckets)
    return [row[mask].tolist() for row, mask in zip(ids.numpy(), valid.numpy())]


def test_hand_computed_single_letter_word():
    # "#a#": A = 1_000_000_007, P = 2**31 - 1, BOUNDARY = 0x110000 = 1114112
    #   h = (1114112 * A) mod P          = 1786702478
    #   h = ((h + 97) * A) mod P         =  691424156
    #   h = ((h + 1114112) * A) mod P    = 1705832715
    #   id = 1705832715 mod 30000        =       2715
    assert hashing.trigram_hash_py(BOUNDARY, ord("a"), BOUNDARY, BUCKETS) == 2715
    assert in_graph_ids(["a"]) == [[2715]]


def test_paper_example_trigrams():
    trigrams = trigrams_py([ord(c) for c in "good"])
    as_text = ["".join("#" if c == BOUNDARY else chr(c) for c in t) for t in trigrams]
    assert as_text == ["#go", "goo", "ood", "od#"]


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_ids_reference(text):
    assert trigram_ids_py(normalize_code_points_py(text), BUCKETS) == GOLDEN[text]


def test_golden_ids_in_graph():
    texts = list(GOLDEN)
    assert in_graph_ids(texts) == [GOLDEN[t] for t in texts]


def test_literal_hash_sign_is_not_a_boundary():
    assert in_graph_ids(["c#"]) != in_graph_ids(["c"])
    assert len(in_graph_ids(["c#"])[0]) == 2


def test_whitespace_runs_and_controls_add_nothing():
    one = in_graph_ids(["new york"])
    assert in_graph_ids(["  new \t\n\u3000 york \x00"]) == one
    assert in_graph_ids(["new\u00a0york"]) == one  # NBSP: NFKC -> space


def tf_text_trigram_ids(text, buckets=BUCKETS):
    """Independent reference built on tensorflow-text (ICU) ops.

    NFKC + case folding (ICU), whitespace split, '#' boundaries as a private-use
    character, tf_text.ngrams over characters, then the documented polynomial hash.
    """
    marker = "\ue000"
    normalised = tf_text.case_fold_utf8(tf_text.normalize_utf8([text], "NFKC"))
    words = tf_text.WhitespaceTokenizer().tokenize(normalised)[0]
    out = []
    for word in words.numpy():
        chars = tf.strings.unicode_split(marker + word.decode() + marker, "UTF-8")
        grams = tf_text.ngrams(chars, 3, reduction_type=tf_text.Reduction.STRING_JOIN,
                               string_separator="")
        for gram in grams.numpy():
            cps = [BOUNDARY if c == marker else ord(c) for c in gram.decode()]
            out.append(hashing.trigram_hash_py(*cps, buckets))
    return out


MULTILINGUAL = [
    "лучшие рестораны в Москве", "北京烤鸭", "Crème Brûlée à la carte", "ΣΟΦΊΑ και Φως",
    "Straße nach München", "Ｔｏｋｙｏ ｔｏｗｅｒ", "🙂 emoji 🍕 pizza", "mixed Ελληνικά и русский",
    "good", "a b c", "", "   ", "Việt Nam", "naïve café", "東京 タワー",
]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_matches_tf_text_reference(text):
    assert in_graph_ids([text], max_length=128) == [tf_text_trigram_ids(text)]


def test_boundary_ranges_match_unicode():
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        char = chr(cp)
        expected = char.isspace() or unicodedata.category(char) == "Cc"
        in_ranges = any(lo <= cp <= hi for lo, hi in hashing.BOUNDARY_RANGES)
        assert in_ranges == expected, hex(cp)


def test_ids_in_range_for_any_buckets():
    rng = np.random.default_rng(0)
    points = rng.integers(0, 0x110000, size=[8, 64]).astype(np.int32)
    for buckets in (1, 7, 30000, 2**20):
        ids, valid = trigram_ids(tf.constant(points), buckets)
        ids = ids.numpy()[valid.numpy()]
        assert ids.min() >= 0 and ids.max() < buckets
        expected = [trigram_ids_py(row.tolist(), buckets) for row in points]
        all_ids, all_valid = trigram_ids(tf.constant(points), buckets)
        got = [r[m].tolist() for r, m in zip(all_ids.numpy(), all_valid.numpy())]
        assert got == expected


def test_invalid_code_points_are_boundaries():
    ids, valid = trigram_ids(tf.constant([[-5, 97, 0x110000, 98, 0x7FFFFFFF]]), 100)
    assert valid.numpy().tolist() == [[False, True, False, True, False]]


def test_integer_stage_converts_to_tflite_builtins_and_matches():
    from ai_edge_litert.interpreter import Interpreter

    length = 48

    @tf.function(input_signature=[tf.TensorSpec([1, length], tf.int32, name="cp")])
    def hashed(code_points):
        ids, valid = trigram_ids(code_points, BUCKETS)
        return {"ids": ids, "valid": tf.cast(valid, tf.int32)}

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [hashed.get_concrete_function()], hashed
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    model = converter.convert()
    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    (source,) = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    normalizer = TextNormalizer()
    for text in MULTILINGUAL + ["x" * 100]:
        points = normalizer(tf.constant([text]), length).numpy()
        interpreter.set_tensor(source["index"], points)
        interpreter.invoke()
        got = sorted((interpreter.get_tensor(o["index"]) for o in outputs),
                     key=lambda a: int(a.max()))  # valid (<= 1) before ids
        want = hashed(tf.constant(points))
        valid = want["valid"].numpy()
        np.testing.assert_array_equal(got[-1] * valid, want["ids"].numpy())
        np.testing.assert_array_equal(got[0], valid)


@pytest.mark.parametrize("dense", [False, True])
def test_word_ngrams_in_graph_match_reference(dense):
    texts = ["new york city", "a", "", "  лучшие рестораны  в Москве ", "北京烤鸭 做法",
             "x" * 70]
    points = TextNormalizer()(tf.constant(texts), 64)
    ids, valid = hashing.word_ngram_ids(points, BUCKETS, (1, 2), dense=dense)
    for row, got, mask in zip(points.numpy(), ids.numpy(), valid.numpy()):
        assert got[mask].tolist() == hashing.word_ngram_ids_py(row.tolist(), BUCKETS)


def test_word_ngram_golden_ids():
    points = normalize_code_points_py("New  York")
    unigrams = hashing.word_ngram_ids_py(points, BUCKETS, (1,))
    bigrams = hashing.word_ngram_ids_py(points, BUCKETS, (2,))
    assert unigrams == [10758, 5792]  # new, york (hashing version 1)
    assert bigrams == [2324]  # new york
    # A word's id does not depend on its neighbours; word order matters for bigrams.
    assert hashing.word_ngram_ids_py(normalize_code_points_py("york"), BUCKETS, (1,)) \
        == [5792]
    assert hashing.word_ngram_ids_py(normalize_code_points_py("york new"), BUCKETS,
                                     (2,)) != bigrams


ANY_TEXT = st.text(alphabet=st.characters(), max_size=60)  # includes Cs and Cc


@settings(max_examples=150, deadline=None)
@given(ANY_TEXT)
def test_any_unicode_hashes_deterministically_in_range(text):
    # Lone surrogates, controls, anything: no error, same ids twice, in range,
    # equal to the pure-Python reference.
    clean = to_valid_unicode(text)
    first = in_graph_ids([clean], max_length=64, buckets=1009)
    assert first == in_graph_ids([clean], max_length=64, buckets=1009)
    ids = first[0]
    assert all(0 <= i < 1009 for i in ids)
    assert ids == trigram_ids_py(normalize_code_points_py(text)[:64], 1009)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=40))
def test_any_bytes_hash_like_the_reference(raw):
    points = TextNormalizer()(tf.constant([raw]), 48)
    ids, valid = trigram_ids(points, 1009)
    got = ids.numpy()[0][valid.numpy()[0]].tolist()
    assert got == trigram_ids_py(normalize_code_points_py(raw)[:48], 1009)
