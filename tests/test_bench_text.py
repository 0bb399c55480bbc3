"""The text-retrieval benchmark's corpora, split and metrics (no bm25s needed)."""

import numpy as np
import pandas as pd
import pytest

from benchmarks import roff, text, text_corpora


@pytest.fixture(scope="module")
def stdlib_corpus():
    return text_corpora.build_stdlib(["json", "textwrap", "string"])


def test_stdlib_corpus_pairs_module_qualname_and_docstring(stdlib_corpus):
    frame = stdlib_corpus
    assert len(frame) >= 10
    assert frame["doc_id"].is_unique and frame["doc"].is_unique
    assert frame["query"].is_unique
    row = frame.set_index("doc_id").loc["textwrap.dedent"]
    assert row["query"].startswith("textwrap.dedent: Remove any common leading")
    assert "whitespace" in row["doc"] and "Remove any common" not in row["doc"]
    assert (frame["doc"].str.len() >= text_corpora.MIN_DOC_CHARS).all()
    assert all(q.split(":")[0] == i
               for q, i in zip(frame["query"], frame["doc_id"], strict=True))
    # Deterministic: the same modules give the same table.
    again = text_corpora.build_stdlib(["json", "textwrap", "string"])
    pd.testing.assert_frame_equal(frame, again)


def test_split_is_disjoint_and_keeps_every_document(stdlib_corpus):
    splits = text_corpora.split(stdlib_corpus, seed=0, validation=0.2, test=0.2)
    ids = {p: set(splits[p]["doc_id"]) for p in ("train", "validation", "test")}
    assert not ids["train"] & ids["test"]
    assert not ids["train"] & ids["validation"]
    assert not ids["validation"] & ids["test"]
    everything = ids["train"] | ids["validation"] | ids["test"]
    assert everything == set(stdlib_corpus["doc_id"])
    assert len(splits["corpus"]) == len(stdlib_corpus)
    assert len(splits["test"]) == round(0.2 * len(stdlib_corpus))
    same = text_corpora.split(stdlib_corpus, seed=0, validation=0.2, test=0.2)
    pd.testing.assert_frame_equal(splits["test"], same["test"])
    small = text_corpora.split(stdlib_corpus, seed=0, max_pairs=10, test=0.2)
    assert len(small["train"]) + len(small["validation"]) + len(small["test"]) == 10
    assert len(small["corpus"]) == len(stdlib_corpus)


def test_metrics_on_a_hand_worked_example():
    # 4 queries, top-3 lists. Positives at rank 0, 2, absent, 1.
    topk = np.array([[7, 1, 2], [4, 5, 9], [0, 1, 2], [3, 8, 6]])
    positives = np.array([7, 9, 5, 8])
    ranks = text.ranks_from_topk(topk, positives)
    assert ranks.tolist() == [0, 2, 3, 1]
    m = text.retrieval_metrics(ranks, ks=(1, 2, 3), mrr_k=2)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@2"] == pytest.approx(2 / 4)
    assert m["recall@3"] == pytest.approx(3 / 4)
    # MRR@2: 1/1 + 0 (rank 3 > 2) + 0 + 1/2, over 4 queries.
    assert m["mrr@2"] == pytest.approx((1 + 0.5) / 4)


def test_dense_topk_is_exact_and_breaks_ties_by_index():
    docs = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [1.0, 0.0]], np.float32)
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    top = text.dense_topk(queries, docs, k=3, chunk=1)
    assert top.tolist() == [[0, 3, 2], [1, 2, 0]]
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(5, 8)), rng.normal(size=(50, 8))
    np.testing.assert_array_equal(text.dense_topk(q, d, k=50),
                                  np.argsort(-(q @ d.T), axis=1, kind="stable"))


def test_positives_index_the_full_corpus(stdlib_corpus):
    splits = text_corpora.split(stdlib_corpus, seed=0, test=0.3)
    pos = text.positives_of(splits["test"], splits["corpus"])
    assert (splits["corpus"]["doc_id"].to_numpy()[pos]
            == splits["test"]["doc_id"].to_numpy()).all()


def test_roff_name_and_description_of_a_man_page():
    page = "\n".join([
        '.\\" comment', ".TH OPEN 2 2023-03-30", ".SH NAME",
        "open, creat \\- open and possibly create a file", ".SH SYNOPSIS",
        ".B #include <fcntl.h>", ".SH DESCRIPTION", "The", ".BR open ()",
        "system call opens the file specified by", ".IR pathname .", ".PP",
        "If \\fBO_CREAT\\fP is set, \\(lqcreate\\(rq it.", ".TP", ".B O_RDONLY",
        "Read only.", ".SH SEE ALSO", ".BR close (2)"])
    record = text_corpora.manpage_record(
        text_corpora.pathlib.Path("/usr/share/man/man2/open.2.gz"), page)
    assert record == (
        "man2/open.2", "open, creat - open and possibly create a file",
        "The open() system call opens the file specified by pathname.\n\n"
        'If O_CREAT is set, "create" it.\n\nO_RDONLY Read only.')
    alias = text_corpora.manpage_record(
        text_corpora.pathlib.Path("/usr/share/man/man2/creat.2.gz"),
        ".so man2/open.2\n")
    assert alias is None
    assert roff.unescape("a\\-b\\e\\&c") == "a-b\\c"


def test_debian_translations_parse_short_and_long_descriptions():
    text_ = ("Package: frob\nDescription-md5: 0\nDescription-en: frobnicates files\n"
             " Frob frobnicates files in place.\n .\n It is fast.\n\n"
             "Package: frob-doc\nDescription-md5: 1\nDescription-en: docs\n")
    rows = list(text_corpora.parse_translations(text_))
    assert rows[0] == ("frob", "frob: frobnicates files",
                       "Frob frobnicates files in place.\n\nIt is fast.")
    frame = text_corpora.to_frame(rows)  # frob-doc: no long description, dropped
    assert frame["doc_id"].tolist() == ["frob"]


def test_defaults_table_shows_bm25_towers_and_served_rows():
    from benchmarks import text_defaults

    metrics = {"recall@1": 0.25, "recall@10": 0.5, "recall@100": 0.75, "mrr@10": 0.375}
    served = {**metrics, "recall@10": 0.625}
    results = {"stdlib": {
        "corpus": {"documents": 1234, "test_pairs": 56},
        "bm25": {**metrics, "seconds": 1.5},
        "variants": {
            "defaults": {"towers": metrics, "served": served, "hybrid_weight": 0.3,
                         "epochs_run": 6, "epoch_kept": 4, "seconds": 20.0},
            "previous": {"towers": metrics, "served": metrics, "hybrid_weight": None,
                         "epochs_run": 5, "epoch_kept": 5, "seconds": 9.0}}}}
    text = text_defaults.markdown(results)
    assert "**stdlib** (1,234 documents, 56 held-out queries)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["BM25 (bm25s, stemmed)", "defaults: towers",
                     "defaults: served (hybrid)", "previous: towers"]
    assert "| 0.625 |" in rows[2] and "| 4 of 6 |" in rows[2] and "| 0.3 |" in rows[2]
