"""Filtered retrieval (``top_k_filter``): restrict tokens, both retrieval models
against an exact numpy reference (allow, deny, several namespaces, nothing
passes, exclusions, multi-head, hybrid), errors, and the filter end to end
through the client over gRPC, REST, ``LocalRetriever`` and the CLI."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import io
import json
import pathlib
import re
import urllib.request

import numpy as np
import pandas as pd
import pytest
import scann  # noqa: F401 - registers ScaNN's ops for loading `retrieval`
import tensorflow as tf
from serving_helpers import running_server, trained_export, user_features

from tfdssm.errors import DataError, ExportError, ServingError
from tfdssm.export import hybrid as hybrid_lib
from tfdssm.export import index, lexical, restricts, tokens

GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]
LANGUAGES = ["en", "fr", "de"]
NAMESPACES = ("genres", "language")


# --------------------------------------------------------------------------- #
# Tokens (no TensorFlow)
# --------------------------------------------------------------------------- #


def test_tokens_from_lists_separated_strings_and_missing_values():
    frame = pd.DataFrame({"genres": ["Action|Comedy", "", None, "Drama| Drama "],
                          "language": [["en", "fr"], np.array(["de"]), "en", 7]})
    rows = tokens.candidate_tokens(frame, NAMESPACES)
    assert rows == [{"genres": ["Action", "Comedy"], "language": ["en", "fr"]},
                    {"genres": [], "language": ["de"]},
                    {"genres": [], "language": ["en"]},
                    {"genres": ["Drama"], "language": ["7"]}]
    with pytest.raises(ExportError, match=r"\['lang'\] are not in the corpus"):
        tokens.candidate_tokens(frame, ["lang"])
    with pytest.raises(ExportError, match="without '='"):
        tokens.check_columns(["a=b"], ["a=b"])
    with pytest.raises(DataError, match="NAMESPACE=TOKEN"):
        tokens.parse_token("Comedy")
    with pytest.raises(DataError, match="unknown filter namespace 'genre'"):
        tokens.passes(rows, allow=["genre=Comedy"], namespaces=NAMESPACES)


# --------------------------------------------------------------------------- #
# The retrieval modules against an exact reference
# --------------------------------------------------------------------------- #


def _corpus(n: int = 1500, dim: int = 8, seed: int = 0):
    """Random unit vectors; 1-2 genres ('|'-joined), one language; 'Sci-Fi'
    only on 3 candidates (a selective filter)."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=[n, dim]).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    genres = ["|".join(rng.choice(GENRES[:4], rng.integers(1, 3), replace=False))
              for _ in range(n)]
    for row in (5, 600, 1400):
        genres[row] += "|Sci-Fi"
    frame = pd.DataFrame({"genres": genres,
                          "language": rng.choice(LANGUAGES, n, p=[0.6, 0.3, 0.1])})
    return embeddings, [f"m{i}" for i in range(n)], tokens.candidate_tokens(
        frame, NAMESPACES)


def _encoder(dim: int, heads: int = 1):
    spec = {f"x{i}": tf.TensorSpec([None], tf.float32, name=f"x{i}")
            for i in range(dim * heads)}

    def encode(features):
        flat = tf.stack([features[f"x{i}"] for i in range(dim * heads)], axis=1)
        return flat if heads == 1 else tf.reshape(flat, [-1, heads, dim])

    return encode, spec


def _feed(queries: np.ndarray) -> dict[str, tf.Tensor]:
    flat = queries.reshape(len(queries), -1)
    return {f"x{i}": tf.constant(flat[:, i]) for i in range(flat.shape[1])}


def _reference(scores, labels, ids, k, allow, deny, exclude):
    """Exact filtered top-k, written out plainly: ``(ids, scores)`` per row,
    padded with "" / -inf."""
    out_ids, out_scores = [], []
    for row in range(len(scores)):
        wanted: dict[str, set] = {}
        for item in allow[row]:
            if item:
                namespace, token = item.split("=", 1)
                wanted.setdefault(namespace, set()).add(token)
        unwanted = {tuple(item.split("=", 1)) for item in deny[row] if item}
        passing = [c for c in range(len(ids))
                   if all(set(labels[c][n]) & wanted[n] for n in wanted)
                   and not any(t in labels[c][n] for n, t in unwanted)
                   and ids[c] not in exclude[row]]
        best = sorted(passing, key=lambda c: -scores[row, c])[:k[row]]
        width = max(k)
        out_ids.append([ids[c] for c in best] + [""] * (width - len(best)))
        out_scores.append([scores[row, c] for c in best]
                          + [-np.inf] * (width - len(best)))
    return out_ids, np.array(out_scores, np.float32)


# One batch: per-row k, exclusions and filters.
ALLOW = [["genres=Comedy", ""],                      # one token
         ["genres=Comedy", "genres=Horror"],         # OR within a namespace
         ["genres=Drama", "language=fr"],            # AND across namespaces
         ["", ""],                                   # deny only
         ["language=de", "language=fr"],
         ["", ""],                                   # no filter at all
         ["genres=Western", ""],                     # a token nobody has
         ["genres=Sci-Fi", ""]]                      # 3 candidates pass
DENY = [[""], [""], [""], ["genres=Drama"], ["genres=Action"], [""], [""],
        ["language=xx"]]
K = [10, 5, 10, 10, 7, 10, 10, 10]


_SIGNATURES: dict[int, tuple] = {}


def _signatures(module) -> dict:
    """A module's signatures, traced once (kept with the module)."""
    if id(module) not in _SIGNATURES:
        _SIGNATURES[id(module)] = (module, module.signatures())
    return _SIGNATURES[id(module)][1]


def _call(module, queries, k, exclude, allow, deny):
    width = max(1, max(len(e) for e in exclude))
    out = _signatures(module)["top_k_filter"](
        _feed(queries), tf.constant(k, tf.int32),
        tf.constant([e + [""] * (width - len(e)) for e in exclude]),
        tf.constant(allow), tf.constant(deny))
    return ([[b.decode() for b in row] for row in out["ids"].numpy()],
            out["scores"].numpy())


@pytest.fixture(scope="module")
def corpus():
    embeddings, ids, labels = _corpus()
    return embeddings, ids, labels, restricts.Restricts.from_tokens(labels,
                                                                    NAMESPACES)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("cls", [index.BruteForceRetrieval, index.ScannRetrieval])
def test_top_k_filter_equals_the_exact_reference(corpus, cls, heads):
    embeddings, ids, labels, restrict = corpus
    encode, spec = _encoder(8, heads)
    module = cls(encode, spec, embeddings, ids, max_k=20, restricts=restrict)
    rng = np.random.default_rng(heads)
    queries = rng.normal(size=[len(ALLOW), heads, 8]).astype(np.float32)
    scores = np.max(np.einsum("bhd,nd->bhn", queries, embeddings), axis=1)
    first = [ids[c] for c in np.argsort(-scores[0])[:2]]
    exclude = [first, [], [], [], ["m1", "m2"], [], [], [ids[5]]]
    want_ids, want_scores = _reference(scores, labels, ids, K, ALLOW, DENY, exclude)
    assert sum(i != "" for i in want_ids[7]) == 2  # Sci-Fi: 3 pass, 1 excluded
    assert want_ids[6] == [""] * 10
    got_ids, got_scores = _call(module, queries, K, exclude, ALLOW, DENY)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert np.all(np.isneginf(got_scores[6]))
    # Broad filters alone: the ScaNN model oversamples instead of falling back.
    broad = [0, 1, 3, 5]
    if cls is index.ScannRetrieval:
        counts = restrict.passing(tf.constant([ALLOW[r] for r in broad]),
                                  tf.constant([DENY[r] for r in broad]))
        fewest = int(tf.reduce_min(tf.reduce_sum(tf.cast(counts, tf.int32), 1)))
        assert fewest > module.exact_below
        assert index.OVERSAMPLE * 10 * 1500 / fewest + 10 <= module.max_oversample
    got_ids, _ = _call(module, queries[broad], [K[r] for r in broad],
                       [exclude[r] for r in broad], [ALLOW[r] for r in broad],
                       [DENY[r] for r in broad])
    assert got_ids == [want_ids[r] for r in broad]
    # An empty filter is top_k_exclude.
    plain = _signatures(module)["top_k_exclude"](
        _feed(queries[:2]), tf.constant([10, 10]), tf.constant([[""], [""]]))
    got_ids, _ = _call(module, queries[:2], [10, 10], [[], []], [[""], [""]],
                       [[""], [""]])
    assert got_ids == [[b.decode() for b in r] for r in plain["ids"].numpy()]


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_passing_from_dense_vectors_equals_posting_lists(corpus, share):
    """Broad tokens read from dense vectors, rare ones from postings, or a
    mix (the default): the same mask, the numpy rule's."""
    _, _, labels, default = corpus
    other = restricts.Restricts(NAMESPACES, tokens.postings(labels, NAMESPACES),
                                len(labels), dense_share=share)
    assert other.num_dense == (0 if share == 1.0 else other.num_tokens)
    assert 0 < default.num_dense < default.num_tokens  # Sci-Fi (3) is rare
    allow = [*ALLOW, ["genres=Sci-Fi", "genres=Comedy"],  # rare + broad
             ["language=fr", "genres=Sci-Fi"]]
    deny = [*DENY, ["genres=Horror"], ["genres=Sci-Fi"]]
    want = np.array([tokens.passes(labels, a, d, NAMESPACES)
                     for a, d in zip(allow, deny, strict=True)])
    for module in (default, other):
        got = module.passing(tf.constant(allow), tf.constant(deny))
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(  # 1500 is not a multiple of 8: padded
            restricts.count_passing(got).numpy(), want.sum(axis=1))
        one = module.passing(tf.constant(allow[2:3]), tf.constant(deny[2:3]))
        np.testing.assert_array_equal(one.numpy(), want[2:3])


def test_scann_filtered_recall_holds_where_the_index_searches_a_quarter():
    """20,000 random vectors (the index searches 36 of 141 leaves: recall@10
    ~0.89 unfiltered): a 50 % filter still finds >= 0.95 of the exact filtered
    top 10 on the oversample path; selective rows of the same batch take the
    exact path (equal to the reference); nothing passing gives "" / -inf."""
    n, dim = 20_000, 32
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=[n, dim]).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    half = np.flatnonzero(rng.random(n) < 0.5)
    few = rng.choice(n, 40, replace=False)
    postings = {"h=in": half, "f=in": few, "f=out": np.setdiff1d(np.arange(n), few)}
    restrict = restricts.Restricts(["h", "f"], postings, n)
    encode, spec = _encoder(dim)
    ids = [str(i) for i in range(n)]
    module = index.ScannRetrieval(encode, spec, embeddings, ids, max_k=10,
                                  restricts=restrict)
    assert module.filter_leaves == 3 * module.options["num_leaves_to_search"] < 141
    queries = rng.normal(size=[40, dim]).astype(np.float32)
    scores = queries @ embeddings.T
    ok_half = np.zeros(n, bool)
    ok_half[half] = True
    truth = np.argsort(-np.where(ok_half, scores, -np.inf), axis=1)[:, :10]
    got, _ = _call(module, queries, [10] * 40, [[]] * 40, [["h=in"]] * 40,
                   [[""]] * 40)
    assert all(ok_half[int(i)] for row in got for i in row)
    recall = np.mean([len({int(i) for i in g} & set(t.tolist())) / 10
                      for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.95, recall
    # One batch: broad, selective (allow; deny all but 40), two namespaces,
    # nothing passes.
    allow = [["h=in", ""], ["f=in", ""], ["", ""], ["h=in", "f=in"],
             ["h=in", "f=nope"]]
    deny = [[""], [""], ["f=out"], [""], [""]]
    labels = [{"h": ["in"] if ok_half[c] else [], "f": []} for c in range(n)]
    for c in few:
        labels[c]["f"] = ["in"]
    for c in np.setdiff1d(np.arange(n), few):
        labels[c]["f"] = ["out"]
    want_ids, want_scores = _reference(scores[:5], labels, ids, [10] * 5, allow,
                                       deny, [[]] * 5)
    got_ids, got_scores = _call(module, queries[:5], [10] * 5, [[]] * 5, allow,
                                deny)
    assert got_ids[1:] == want_ids[1:]  # exact path rows
    np.testing.assert_allclose(got_scores[1:4], want_scores[1:4], atol=1e-5)
    assert got_ids[4] == [""] * 10 and np.all(np.isneginf(got_scores[4]))
    assert len(set(got_ids[0]) & set(want_ids[0])) >= 8  # oversampled row
    # An empty filter is top_k_exclude, to the id.
    plain = _signatures(module)["top_k_exclude"](
        _feed(queries[:3]), tf.constant([10] * 3), tf.constant([[""]] * 3))
    got_ids, _ = _call(module, queries[:3], [10] * 3, [[]] * 3, [[""]] * 3,
                       [[""]] * 3)
    assert got_ids == [[b.decode() for b in r] for r in plain["ids"].numpy()]


def test_scann_falls_back_when_oversampling_finds_too_few(corpus):
    embeddings, ids, labels, restrict = corpus
    encode, spec = _encoder(8)
    poor = {"mode": "tree_ah", "num_leaves": 15, "num_leaves_to_search": 1,
            "training_sample_size": 1500, "dimensions_per_block": 2,
            "anisotropic_quantization_threshold": 0.2, "reorder": 20}
    module = index.ScannRetrieval(encode, spec, embeddings, ids, max_k=20,
                                  options=poor, restricts=restrict)
    queries = np.random.default_rng(3).normal(size=[4, 8]).astype(np.float32)
    allow = [["language=de"]] * 4  # ~10 %: one leaf of 15 holds ~10 of them
    deny = [["genres=Action"]] * 4
    want_ids, want_scores = _reference(queries @ embeddings.T, labels, ids,
                                       [20] * 4, allow, deny, [[]] * 4)
    got_ids, got_scores = _call(module, queries, [20] * 4, [[]] * 4, allow, deny)
    assert got_ids == want_ids  # exact: the fallback scored the passing ones
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


def test_filter_errors_are_invalid_argument(corpus):
    embeddings, ids, _, restrict = corpus
    encode, spec = _encoder(8)
    queries = np.ones([2, 8], np.float32)
    # Shared code (Restricts.passing); the ScaNN model's answer over gRPC is
    # checked in test_client_filters_over_grpc_match_the_exact_answer.
    for cls in (index.BruteForceRetrieval,):
        module = cls(encode, spec, embeddings, ids, max_k=20, restricts=restrict)
        for allow, deny, message in [
            ([["Comedy"], [""]], [[""], [""]], r"NAMESPACE=TOKEN.*Comedy"),
            ([[""], ["genre=Comedy"]], [[""], [""]],
             r"unknown allow namespace.*are: genres, language \(.*genre=Comedy"),
            ([[""], [""]], [["=x"], [""]], r"deny tokens must be NAMESPACE=TOKEN"),
            ([[""]], [[""], [""]], r"allow needs one row per query row"),
        ]:
            with pytest.raises(tf.errors.InvalidArgumentError, match=message):
                _call(module, queries, [3, 3], [[], []], allow, deny)
    plain = index.BruteForceRetrieval(encode, spec, embeddings, ids, max_k=20)
    got, _ = _call(plain, queries, [3, 3], [[], []], [[""], [""]], [[""], [""]])
    assert got[0][0] != ""  # no restrict columns: the empty filter still works
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"are: \(none\)"):
        _call(plain, queries, [3, 3], [[], []], [["genres=Comedy"], [""]],
              [[""], [""]])
    with pytest.raises(ExportError, match="cover 3 candidates"):
        index.BruteForceRetrieval(encode, spec, embeddings, ids,
                                  restricts=restricts.Restricts(NAMESPACES, {}, 3))


def test_filtered_hybrid_equals_the_fused_reference():
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rng = np.random.default_rng(0)
    n = 40
    texts = [" ".join(rng.choice(words, 3)) for _ in range(n)]
    embeddings = rng.normal(size=[n, 6]).astype(np.float32)
    labels = [{"genres": [GENRES[i % 3]], "language": [LANGUAGES[i % 2]]}
              for i in range(n)]
    ids = [f"d{i}" for i in range(n)]
    table = rng.normal(size=[97, 6]).astype(np.float32)

    def encode(features):
        return tf.gather(table, tf.strings.to_hash_bucket_fast(features["q"], 97))

    spec = {"q": tf.TensorSpec([None], tf.string, name="q")}
    weight = 0.8
    index_ = lexical.LexicalIndex.from_texts(texts)
    restrict = restricts.Restricts.from_tokens(labels, NAMESPACES)
    queries = ["alpha beta", "omega", "zzz"]
    dense = encode({"q": tf.constant(queries)}).numpy() @ embeddings.T
    bm25 = index_(tf.constant(queries)).numpy()
    top = bm25.max(axis=1, keepdims=True)
    fused = dense + weight * np.where(top > 0, bm25 / np.maximum(top, 1e-12), 0)
    allow = [["genres=Action", "genres=Drama"], ["language=fr", ""], ["", ""]]
    deny = [["language=fr"], [""], ["genres=Comedy"]]
    want_ids, want_scores = _reference(fused, labels, ids, [5, 5, 5], allow, deny,
                                       [[]] * 3)
    for cls in (index.BruteForceRetrieval, index.ScannRetrieval):
        fusion = hybrid_lib.Hybrid(index_, "q", weight)
        module = cls(encode, spec, embeddings, ids, 10, hybrid=fusion,
                     restricts=restrict)
        out = module.signatures()["top_k_filter"](
            {"q": tf.constant(queries)}, tf.constant([5, 5, 5]),
            tf.constant([[""]] * 3), tf.constant(allow), tf.constant(deny))
        assert [[b.decode() for b in r] for r in out["ids"].numpy()] == want_ids
        np.testing.assert_allclose(out["scores"].numpy(), want_scores, rtol=1e-5)


# --------------------------------------------------------------------------- #
# The export, served: client over gRPC and REST, LocalRetriever, CLI
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def exported():
    export_dir, prepared, result = trained_export()
    return pathlib.Path(export_dir), prepared, result


@pytest.fixture(scope="module")
def server(exported):
    with running_server(exported[0]) as running:
        yield running


def _check_passing(ids, allow, deny, labels):
    """Every returned id passes the filter (per the exported token file)."""
    ok = dict(zip(labels[0], tokens.passes(labels[1], allow, deny), strict=True))
    assert all(ok[i] for row in ids for i in row if i)


def test_export_writes_tokens_and_records_them(exported):
    export_dir, prepared, result = exported
    info = json.loads((export_dir / "export.json").read_text())
    assert info["format_version"] == 2
    assert info["restricts"]["namespaces"] == ["genres", "year"]
    assert info["restricts"]["distinct_tokens"]["genres"] == 18
    assert info["retrieval"]["restricts"]["namespaces"] == ["genres", "year"]
    assert "top_k_filter" in info["retrieval_brute_force"]["signatures"]
    assert "candidate_tokens.jsonl" in info["commit"]["sha256"]
    labels = tokens.read_tokens(export_dir)
    corpus = prepared.corpus
    assert len(labels) == len(corpus)
    assert labels[0]["genres"] == corpus["genres"].iloc[0].split("|")
    assert labels[0]["year"] == [str(corpus["year"].iloc[0])]


def test_client_filters_over_grpc_match_the_exact_answer(server, exported):
    from tfdssm.client import Client
    from tfdssm.retrieve import LocalRetriever

    export_dir, prepared, _ = exported
    users = user_features(prepared, 4)
    retriever = LocalRetriever(export_dir)
    labels = (retriever.ids.tolist(), tokens.read_tokens(export_dir))
    allow, deny = ["genres=Comedy", "genres=Drama"], ["genres=Horror"]
    want_ids, want_scores = retriever.top_k(users, k=10, allow=[allow] * 4,
                                            deny=[deny] * 4)
    _check_passing(want_ids, allow, deny, labels)
    with Client(f"127.0.0.1:{server.grpc_port}", timeout=30) as client:
        ids, scores = client.top_k(users, k=10, model="retrieval_brute_force",
                                   allow=allow, deny=deny)
        assert ids.tolist() == want_ids.tolist()
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        approx, _ = client.top_k(users, k=10, allow=allow, deny=deny)
        recall = np.mean([len(set(a) & set(w)) / 10
                          for a, w in zip(approx, want_ids, strict=True)])
        assert recall >= 0.95, recall
        _check_passing(approx, allow, deny, labels)
        # Per-row filters, two namespaces, one row nothing passes.
        per_row = [["genres=Drama", "year=1995"], ["genres=Nope"], [], ["year=1996"]]
        got, got_scores = client.top_k(users, k=5, allow=per_row,
                                       exclude=[[], [], [want_ids[2][0]], []])
        local, _ = retriever.top_k(users, k=5, allow=per_row,
                                   exclude=[[], [], [want_ids[2][0]], []])
        assert got.tolist() == local.tolist()
        assert got[1].tolist() == [""] * 5 and np.all(np.isneginf(got_scores[1]))
        with pytest.raises(ServingError, match="INVALID_ARGUMENT.*unknown allow "
                           r"namespace.*are: genres, year \("):
            client.top_k(users, k=3, allow=["genre=Comedy"])


def test_rest_filters_in_both_formats(server, exported):
    export_dir, prepared, _ = exported
    users = user_features(prepared, 2)
    loaded = tf.saved_model.load(str(export_dir / "retrieval_brute_force" / "1"))
    want = loaded.signatures["top_k_filter"](
        **{k: tf.constant(v, tf.float32 if k == "age" else tf.string)
           for k, v in users.items()}, k=tf.constant([5, 5]),
        exclude=tf.constant([[""], [""]]),
        allow=tf.constant([["genres=Comedy"], ["genres=Comedy"]]),
        deny=tf.constant([["genres=Horror"], ["genres=Horror"]]))
    want_ids = [[b.decode() for b in r] for r in want["ids"].numpy()]
    url = (f"http://127.0.0.1:{server.rest_port}/v1/models/"
           "retrieval_brute_force:predict")
    columns = {"signature_name": "top_k_filter", "inputs": {
        **users, "k": [5, 5], "exclude": [[""], [""]],
        "allow": [["genres=Comedy"]] * 2, "deny": [["genres=Horror"]] * 2}}
    rows = {"signature_name": "top_k_filter", "instances": [
        {**{k: v[i] for k, v in users.items()}, "k": 5, "exclude": [""],
         "allow": ["genres=Comedy"], "deny": ["genres=Horror"]} for i in range(2)]}
    for body, key in ((columns, "outputs"), (rows, "predictions")):
        request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())[key]
        got = answer["ids"] if key == "outputs" else [r["ids"] for r in answer]
        assert got == want_ids


def _run_cli(argv) -> tuple[int, str, str]:
    from tfdssm import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_query_allow_and_deny(server, exported):
    from tfdssm.client import Client

    export_dir, prepared, _ = exported
    users = user_features(prepared, 1)
    flags = [f"--feature={k}={v[0]}" for k, v in users.items()]
    filters = ["--allow", "genres=Comedy", "--allow", "genres=Drama",
               "--deny", "genres=Horror", "--k", "5"]
    target = f"127.0.0.1:{server.grpc_port}"
    with Client(target, timeout=30) as client:
        want, _ = client.top_k(users, k=5, model="retrieval_brute_force",
                               allow=["genres=Comedy", "genres=Drama"],
                               deny=["genres=Horror"])
    for where in (["--server", target, "--model", "retrieval_brute_force"],
                  ["--export-dir", export_dir]):
        code, out, err = _run_cli(["query", *where, *filters, *flags])
        assert code == 0, err
        ids = re.findall(r"^\s*\d+\. (\S+)\s", out, re.M)
        assert ids == want[0].tolist()
    code, _, err = _run_cli(["query", "--server", target, "--allow",
                             "genre=Comedy", *flags])
    assert code == 2 and "unknown allow namespace" in err, err
    with pytest.raises(SystemExit):
        _run_cli(["query", "--export-dir", export_dir, "--allow", "Comedy", *flags])
