"""Tests for the ``tfdssm`` command line (in process, plus the real console script)."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tfdssm import cli

TINY = ["--hidden", "16,16", "--dim", "8", "--buckets", "500", "--epochs", "1",
        "--batch-size", "16", "--quiet",
        # The pairs defaults' hybrid export and BM25 mining are tested in
        # test_hybrid.py / test_negatives.py; here they would only cost CI time.
        "--no-hybrid", "--hard-negatives", "none"]
CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "tfdssm"


def _run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _signature_inputs(version_dir: pathlib.Path) -> dict[str, list[str]]:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return {k: list(v.inputs) for k, v in proto.meta_graphs[0].signature_def.items()}


def _signature_outputs(version_dir: pathlib.Path) -> dict[str, list[str]]:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return {k: list(v.outputs) for k, v in proto.meta_graphs[0].signature_def.items()}


def _assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tfdssm: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory, pairs_frame):
    path = tmp_path_factory.mktemp("cli_data") / "tiny.csv"
    pairs_frame(60).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained(tiny_csv, tmp_path_factory):
    """``tfdssm train --pipeline pairs`` on tiny.csv with row 3's query cell
    emptied, not ``--quiet``: (export_dir, code, out, err). The export tests and
    the output tests (a DataWarning, progress lines) read this one run."""
    root = tmp_path_factory.mktemp("cli_export")
    header, *rows = tiny_csv.read_text().splitlines()
    rows[2] = "," + rows[2].split(",", 1)[1]
    holes = root / "holes.csv"
    holes.write_text("\n".join([header, *rows]) + "\n")
    export_dir = root / "D"
    code, out, err = _run_main(
        ["train", "--pipeline", "pairs", "--data", holes, "--query-column", "query",
         "--candidate-column", "doc", "--export-dir", export_dir,
         *[a for a in TINY if a != "--quiet"]])
    return export_dir, code, out, err


# --------------------------------------------------------------------------- #
# train
# --------------------------------------------------------------------------- #


def test_train_pairs_exports_towers_and_prints_metrics(trained):
    export_dir, code, out, err = trained
    assert code == 0, err
    assert "Traceback" not in err
    assert (export_dir / "towers" / "1" / "saved_model.pb").is_file()
    inputs = _signature_inputs(export_dir / "towers" / "1")
    assert inputs["query"] == ["query"] and inputs["candidate"] == ["doc"]
    assert inputs["serving_default"] == ["query"]
    outputs = _signature_outputs(export_dir / "towers" / "1")
    assert outputs["query"] == outputs["candidate"] == ["embedding"]
    assert outputs["serving_default"] == ["embedding"]
    info = json.loads((export_dir / "export.json").read_text())
    assert info["candidate_id"] == "doc"  # no --candidate-id-column: the text is the id
    assert info["training"]["epochs"] == 1
    assert "hard_negatives" not in info["training"]  # --hard-negatives none
    assert info["query"]["output_dim"] == 8
    assert info["query"]["features"][0]["num_buckets"] == 500
    assert info["query"]["hidden"] == [16]  # hidden[0] is the bag, the rest is the MLP
    assert re.search(r"recall@10\s+\d\.\d{4}", out)
    assert "mrr@10" in out and "ndcg@10" in out
    assert f"exported to {export_dir} (towers version 1)" in out
    assert [p.name for p in (export_dir / "towers").iterdir()] == ["1"]
    assert not [p for p in export_dir.rglob("*") if ".tmp" in p.name]
    # 60 rows, 10% held out; 10 distinct documents in the corpus.
    assert "evaluation on 6 held-out rows, 10 candidates" in out


def test_train_custom_columns_and_candidate_id_column(tmp_path, pairs_frame):
    frame = pairs_frame(40).rename(columns={"query": "q", "doc": "d", "doc_id": "id"})
    frame.loc[2, "q"] = ""  # a DataWarning, which --quiet still shows
    data = tmp_path / "qd.tsv"
    frame.to_csv(data, sep="\t", index=False)
    export_dir = tmp_path / "qd_export"
    code, out, err = _run_main(
        ["train", "--pipeline", "pairs", "--data", data, "--query-column", "q",
         "--candidate-column", "d", "--candidate-id-column", "id",
         "--export-dir", export_dir, "--shared-towers", *TINY])
    assert code == 0, err
    # --quiet (in TINY): warnings only, as one `tfdssm: warning:` line each.
    assert err.splitlines() == [
        "tfdssm: warning: data column 'q' has 1 missing or empty cell(s); they "
        "are used as empty text."]
    inputs = _signature_inputs(export_dir / "towers" / "1")
    assert inputs["query"] == ["q"] and inputs["candidate"] == ["d"]
    info = json.loads((export_dir / "export.json").read_text())
    assert info["candidate_id"] == "id"
    assert info["candidate"]["shared_with_query"] is True
    assert info["training"]["candidate_id_column"] == "id"
    assert [f["name"] for f in info["candidate"]["features"]] == ["d"]
    towers = tf.saved_model.load(str(export_dir / "towers" / "1"))
    texts = tf.constant(["same words", "Café 北京"])
    np.testing.assert_allclose(  # shared weights: same text, same vector on both sides
        towers.signatures["query"](q=texts)["embedding"],
        towers.signatures["candidate"](d=texts)["embedding"], atol=1e-6)
    code, out, err = _run_main(["query", "--export-dir", export_dir, "--k", "10",
                                "apple recipe"])
    assert code == 0, err
    ranked = re.findall(r"^\s*\d+\. (\S+)", out, flags=re.M)
    assert sorted(ranked) == [f"D{i}" for i in range(10)]  # ids, every document once


# --------------------------------------------------------------------------- #
# evaluate and query
# --------------------------------------------------------------------------- #


def test_evaluate_prints_recall(trained, tiny_csv):
    export_dir = trained[0]
    code, out, err = _run_main(["evaluate", "--export-dir", export_dir,
                                "--data", tiny_csv])
    assert code == 0, err
    assert ("evaluation on 60 rows; candidate pool: the exported corpus, as served "
            "(10 candidates)") in out
    assert re.search(r"recall@10\s+1\.0000", out)  # 10 candidates: always in the top 10


def test_evaluate_pool_is_the_served_corpus_unless_asked(trained, tiny_csv, tmp_path):
    """Documents only the evaluation file has are not ranked by default (the
    served model never returns them); --add-eval-docs adds them, and says so."""
    export_dir = trained[0]
    extra = tmp_path / "extra.csv"
    rows = tiny_csv.read_text().splitlines()
    extra.write_text("\n".join([*rows, "new query,all about nuts,D99",
                                "other query,all about plums,D98"]) + "\n")
    code, _, err = _run_main(["evaluate", "--export-dir", export_dir, "--data", extra])
    _assert_user_error(code, err, "2 of 62 row(s)", "does not serve",
                       "10 candidates", "--add-eval-docs")
    code, out, err = _run_main(["evaluate", "--export-dir", export_dir, "--data",
                                extra, "--add-eval-docs"])
    assert code == 0, err
    assert ("evaluation on 62 rows; candidate pool: the exported corpus + the "
            "evaluation file's documents (12 candidates, 2 added)") in out
    code, out, err = _run_main(["evaluate", "--export-dir", export_dir, "--data",
                                extra, "--add-eval-docs", "--json"])
    metrics = json.loads(out)
    assert metrics["num_candidates"] == 12 and metrics["pool"] == "exported+eval"


def test_evaluate_json(trained, tiny_csv):
    export_dir = trained[0]
    code, out, err = _run_main(["evaluate", "--export-dir", export_dir,
                                "--data", tiny_csv, "--k", "1,5", "--json"])
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) >= {"recall@1", "recall@5", "ndcg@5", "mrr@5", "auc"}
    assert "recall@10" not in metrics
    assert metrics["num_queries"] == 60 and metrics["num_candidates"] == 10
    assert metrics["pool"] == "exported"
    assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= 1.0


def test_query_prints_ranked_ids(trained):
    export_dir = trained[0]
    code, out, err = _run_main(["query", "--export-dir", export_dir, "--k", "4",
                                "apple recipe 1", "Café 北京"])
    assert code == 0, err
    blocks = out.split("# ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["query=apple recipe 1",
                                                  "query=Café 北京"]
    for block in blocks:
        rows = re.findall(r"^\s*(\d+)\. (.+?)\s+(-?\d+\.\d{4})$", block, flags=re.M)
        assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
        assert all(r[1].startswith("all about ") for r in rows)  # ids are the doc texts
        assert block.count("all about ") == 4  # the text is the id: shown once
        scores = [float(r[2]) for r in rows]
        assert scores == sorted(scores, reverse=True)
        # Cosine towers, plus up to the hybrid's BM25 weight (pairs default).
        weight = json.loads((export_dir / "export.json").read_text()).get("hybrid")
        upper = 1.0001 + (weight or {}).get("weight", 0.0)
        assert all(-1.0001 <= s <= upper for s in scores), (scores, weight)


@pytest.mark.parametrize("columns", [80, 140])
def test_query_output_fits_the_terminal(columns, monkeypatch, capsys):
    """Long ids and texts are cut to one line of the terminal's width, with `…`;
    a text that is its id is shown once."""
    monkeypatch.setenv("COLUMNS", str(columns))
    long = "lorem ipsum\ndolor " * 60
    cli._print_ranked("query=" + long, ["D1", "D22", long], [0.9, 0.5, -0.25],
                      [long, "short doc", None])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("# query=lorem ipsum dolor")
    assert all(len(line) <= columns for line in lines), lines
    assert re.match(r"^  1\. D1 \s*0\.9000  lorem ipsum dolor .*…$", lines[1])
    assert re.match(r"^  2\. D22\s+0\.5000  short doc$", lines[2])
    assert re.match(r"^  3\. lorem ipsum dolor .*…\s+-0\.2500$", lines[3])
    assert lines[3].count("lorem") < 30


NOISE = re.compile(r"cuInit|oneDNN|cpu_feature_guard|cudart_stub|^[IWE]0000 |"
                   r"absl::InitializeLog|^WARNING:|XNNPACK", re.M)


def test_console_script_query_matches_in_process_without_tensorflow_noise(
        trained, tmp_path):
    """The installed console script in a fresh process whose environment does
    not quiet TensorFlow: the same answer as in process, nothing on stderr."""
    export_dir = trained[0]
    assert CONSOLE_SCRIPT.is_file()
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS",
                        "GRPC_VERBOSITY")}
    argv = ["query", "--export-dir", str(export_dir), "--k", "2", "pasta"]
    proc = subprocess.run([str(CONSOLE_SCRIPT), *argv], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^  1\. ", proc.stdout, re.M), proc.stdout
    assert not NOISE.search(proc.stderr), proc.stderr
    assert proc.stderr == ""
    code, out, _ = _run_main(argv)
    assert code == 0
    assert proc.stdout == out


def test_console_script_user_error_exits_2_without_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "train", "--pipeline", "pairs", "--data",
         str(tmp_path / "missing.csv"), "--export-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    _assert_user_error(proc.returncode, proc.stderr, "missing.csv", "does not exist")
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- #
# User errors: exit 2, one line, no traceback
# --------------------------------------------------------------------------- #


def _train_argv(data, tmp_path, *extra):
    return ["train", "--pipeline", "pairs", "--data", data, "--export-dir",
            tmp_path / "out", *TINY, *extra]


def test_train_missing_file(tmp_path):
    code, _, err = _run_main(_train_argv(tmp_path / "nope.csv", tmp_path))
    _assert_user_error(code, err, "nope.csv", "does not exist")


def test_train_missing_column_names_it(tiny_csv, tmp_path):
    code, _, err = _run_main(_train_argv(tiny_csv, tmp_path, "--query-column", "qury"))
    _assert_user_error(code, err, "'qury'", "available columns", "'query'")
    assert not (tmp_path / "out").exists()


def test_train_missing_candidate_id_column(tiny_csv, tmp_path):
    code, _, err = _run_main(_train_argv(tiny_csv, tmp_path,
                                         "--candidate-id-column", "docid"))
    _assert_user_error(code, err, "'docid'", "'doc_id'")


def test_train_same_query_and_candidate_column(tiny_csv, tmp_path):
    code, _, err = _run_main(_train_argv(tiny_csv, tmp_path, "--query-column", "doc",
                                         "--candidate-column", "doc"))
    _assert_user_error(code, err, "--query-column and --candidate-column", "'doc'")


def test_train_non_utf8_file(tmp_path):
    data = tmp_path / "latin.csv"
    data.write_bytes("query,doc\ncaf\xe9,d\n".encode("latin-1"))
    code, _, err = _run_main(_train_argv(data, tmp_path))
    _assert_user_error(code, err, "latin.csv", "UTF-8")


def test_train_pairs_without_data(tmp_path):
    code, _, err = _run_main(["train", "--pipeline", "pairs", "--export-dir",
                              tmp_path / "out", *TINY])
    _assert_user_error(code, err, "--data")


@pytest.mark.parametrize("flag, value", [("--hidden", "abc"), ("--hidden", "16,-1"),
                                         ("--epochs", "0"), ("--dim", "x")])
def test_train_bad_numbers_are_argparse_errors(tiny_csv, tmp_path, capsys, flag, value):
    argv = ["train", "--pipeline", "pairs", "--data", str(tiny_csv), "--export-dir",
            str(tmp_path / "out"), flag, value]
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_evaluate_on_a_directory_that_is_not_an_export(tiny_csv, tmp_path):
    code, _, err = _run_main(["evaluate", "--export-dir", tmp_path, "--data", tiny_csv])
    _assert_user_error(code, err, "is not a tfdssm export")


def test_evaluate_data_missing_a_column(trained, tmp_path):
    data = tmp_path / "no_query.csv"
    data.write_text("question,doc\nx,all about kiwi\n")
    code, _, err = _run_main(["evaluate", "--export-dir", trained[0], "--data", data])
    _assert_user_error(code, err, "['query']", "available columns")


def test_query_without_text_for_a_text_tower(trained):
    code, out, err = _run_main(["query", "--export-dir", trained[0]])
    _assert_user_error(code, err, "missing query feature(s) ['query']", "--feature")
    assert out == ""


def test_query_k_larger_than_corpus(trained):
    code, _, err = _run_main(["query", "--export-dir", trained[0], "--k", "11", "kiwi"])
    _assert_user_error(code, err, "corpus size 10", "11")


def test_query_on_a_directory_that_is_not_an_export(tmp_path):
    code, _, err = _run_main(["query", "--export-dir", tmp_path, "kiwi"])
    _assert_user_error(code, err, "is not a tfdssm export")


def test_train_corrupt_parquet_is_a_user_error(tmp_path):
    data = tmp_path / "pairs.parquet"
    data.write_bytes(b"PAR1 but not really")
    code, _, err = _run_main(_train_argv(data, tmp_path))
    _assert_user_error(code, err, "pairs.parquet")


def test_evaluate_export_without_corpus_is_a_user_error(trained, tiny_csv, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy)
    (copy / "corpus.parquet").unlink()
    code, _, err = _run_main(["evaluate", "--export-dir", copy, "--data", tiny_csv])
    _assert_user_error(code, err, "corpus.parquet")


def test_learning_rate_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--pipeline", "pairs", "--data", "x.csv",
                  "--export-dir", "d", "--learning-rate", "0"])
    assert exit_info.value.code == 2
    assert "must be > 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Output: tfdssm's messages as `tfdssm: ...` lines, TensorFlow's noise hidden
# --------------------------------------------------------------------------- #


def test_warnings_and_progress_are_tfdssm_lines(trained):
    # `trained` has row 3's query cell empty: a DataWarning, shown as one
    # `tfdssm: warning:` line; progress as `tfdssm: ` lines too.
    _, code, _, err = trained
    assert code == 0, err
    assert ("tfdssm: warning: data column 'query' has 1 missing or empty cell(s); "
            "they are used as empty text.\n") in err
    assert re.search(r"^tfdssm: trained 1 epoch\(s\) on \d+ rows in ", err, re.M), err
    assert re.search(r"^tfdssm: wrote \S+query_tower\.tflite \(", err, re.M), err
    assert all(line.startswith("tfdssm: ") for line in err.splitlines()), err
    # --quiet (warnings only) is checked by the custom columns run above.


def test_verbose_is_a_global_and_a_subcommand_option():
    parser = cli.build_parser()
    assert parser.parse_args(["--verbose", "tflite", "--export-dir", "x"]).verbose
    assert parser.parse_args(["tflite", "--export-dir", "x", "-v"]).verbose
    assert not parser.parse_args(["tflite", "--export-dir", "x"]).verbose


def test_corpus_warnings_are_not_repeated_on_every_query(pairs_export, tmp_path):
    """An empty corpus cell is warned about at export; querying stays quiet."""
    import pandas as pd  # noqa: PLC0415

    copy = tmp_path / "copy"
    shutil.copytree(pairs_export[0], copy)
    corpus = pd.read_parquet(copy / "corpus.parquet")
    corpus.loc[3, "doc"] = ""
    corpus.to_parquet(copy / "corpus.parquet", index=False)
    # As if the export had written this corpus: its digest in the commit record
    # (readers refuse a corpus that is not the committed export's).
    info = json.loads((copy / "export.json").read_text())
    info["commit"]["sha256"]["corpus.parquet"] = hashlib.sha256(
        (copy / "corpus.parquet").read_bytes()).hexdigest()
    (copy / "export.json").write_text(json.dumps(info))
    code, out, err = _run_main(["query", "--export-dir", copy, "--k", "2", "kiwi"])
    assert code == 0, err
    assert err == "" and out.startswith("# query=kiwi")


def test_train_passes_the_pairs_defaults_and_flags_to_the_library(
        tiny_csv, tmp_path, monkeypatch):
    """The CLI's tiny runs above turn the hybrid export and BM25 mining off (CI
    time); this checks what a user's plain `tfdssm train --pipeline pairs` asks of
    the library, and that the flags override it."""
    from tfdssm.recipes.defaults import DEFAULTS
    from tfdssm.training import run as training

    calls = []

    def fake_run(prepared, export_dir, **kwargs):
        calls.append(kwargs)
        return {"metrics": {}, "history": {}, "export": {"towers": {"version": 1}}}

    monkeypatch.setattr(training, "run", fake_run)
    base = ["train", "--pipeline", "pairs", "--data", tiny_csv, "--export-dir",
            tmp_path / "E", "--hidden", "8", "--dim", "4", "--buckets", "100"]
    code, _, err = _run_main(base)
    assert code == 0, err
    want = DEFAULTS["pairs"]
    got = calls[-1]
    assert (got["hybrid"], got["hard_negatives"], got["patience"]) == (
        want["hybrid"], want["hard_negatives"], want["patience"])
    assert (got["epochs"], got["batch_size"], got["learning_rate"]) == (
        want["epochs"], want["batch_size"], want["learning_rate"])
    assert got["hybrid"] is True and got["hard_negatives"] == "bm25"
    code, _, err = _run_main([*base, "--no-hybrid", "--hard-negatives", "none",
                              "--patience", "0", "--epochs", "3"])
    assert code == 0, err
    got = calls[-1]
    assert (got["hybrid"], got["hard_negatives"], got["patience"], got["epochs"]) == (
        False, None, None, 3)
