"""Tests for tfdssm.data.files: training rows streamed from many files, each
worker reading only its own (FILE), or every n-th row (DATA)."""

from __future__ import annotations

import tfdssm  # noqa: F401  - selects Keras 2; must precede tensorflow

# isort: split
import collections
import logging

import numpy as np
import pandas as pd
import pytest

from tfdssm.data import files
from tfdssm.errors import DataError
from tfdssm.features import TextFeature

FEATURES = [TextFeature("query"), TextFeature("doc")]


def _write(tmp_path, sizes, suffix=".csv"):
    """Files part-<i> with unique queries "q<file>-<row>" (commas, quotes and
    unicode included, as pandas writes them)."""
    paths = []
    for i, size in enumerate(sizes):
        frame = pd.DataFrame({
            "doc_id": [f"D{r % 5}" for r in range(size)],
            "query": [f'q{i}-{r}, "quoted" é' for r in range(size)],
            "doc": [f"doc {r % 5}" for r in range(size)]})
        path = tmp_path / f"part-{i}{suffix}"
        if suffix == ".parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
        paths.append(str(path))
    return paths


def _read_all(dataset):
    return [q.decode() for batch in dataset for q in batch["query"].numpy()]


def test_scan_holds_out_hashed_rows_and_counts_the_rest(tmp_path):
    paths = _write(tmp_path, [40, 30, 30])
    source, test, every = files.scan(files.expand(str(tmp_path / "part-*.csv")),
                                     ["query", "doc", "doc_id"], 0.2, seed=3)
    assert source.files == paths and source.columns == ["doc_id", "query", "doc"]
    assert source.num_rows + len(test) == 100
    assert 5 <= len(test) <= 40  # about 20 %
    assert len(every) == 100  # every query is distinct
    # The split is the tf.data filter's: same rows on every worker and in the pass.
    masks = [files.held_out(f"part-{i}.csv", n, 0.2, 3)
             for i, n in enumerate([40, 30, 30])]
    assert source.rows == [int((~m).sum()) for m in masks]
    expected = {f'q{i}-{r}, "quoted" é' for i, m in enumerate(masks)
                for r in np.flatnonzero(m)}
    assert set(test["query"]) == expected


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_one_reader_reads_every_training_row_once(tmp_path, suffix):
    _write(tmp_path, [17, 9, 25], suffix)
    source, test, _ = files.scan(files.expand(str(tmp_path / f"part-*{suffix}")),
                                 ["query", "doc"], 0.1)
    got = _read_all(files.train_dataset(source, FEATURES, batch_size=8, seed=1))
    assert len(got) == source.num_rows == 51 - len(test)
    every = {f'q{i}-{r}, "quoted" é' for i, n in enumerate([17, 9, 25])
             for r in range(n)}
    assert sorted(got) == sorted(every - set(test["query"]))


@pytest.mark.parametrize("sizes, policy", [([12, 12, 12, 12, 12], "FILE"),
                                           ([30], "DATA")])
def test_workers_split_the_rows_exactly(tmp_path, sizes, policy, caplog):
    """FILE: worker i reads files i, i+n, ...; DATA (fewer files than workers):
    every worker reads all files and keeps every n-th row. Either way each
    training row is read once per epoch across the workers."""
    _write(tmp_path, sizes)
    source, _, _ = files.scan(files.expand(str(tmp_path / "part-*.csv")),
                              ["query", "doc"], 0.1)
    reads = []
    with caplog.at_level(logging.INFO, logger="tfdssm"):
        for index in range(2):
            assert source.shard(2, index)[1] == policy
            got = _read_all(files.train_dataset(source, FEATURES, 4, seed=index,
                                                num_shards=2, index=index))
            assert len(got) == source.shard_rows(2, index)
            reads.append(got)
    counts = collections.Counter(reads[0] + reads[1])
    assert sum(counts.values()) == source.num_rows and set(counts.values()) == {1}
    if policy == "FILE":  # worker 0: files 0, 2, 4; worker 1: files 1, 3
        assert {q.split("-")[0] for q in reads[0]} == {"q0", "q2", "q4"}
        assert {q.split("-")[0] for q in reads[1]} == {"q1", "q3"}
    else:
        assert "sharding by DATA" in caplog.text


def test_repeat_gives_full_batches_forever(tmp_path):
    _write(tmp_path, [10])
    source, _, _ = files.scan([str(tmp_path / "part-0.csv")], ["query", "doc"], 0.0)
    batches = list(files.train_dataset(source, FEATURES, 4, repeat=True).take(7))
    assert [len(b["query"]) for b in batches] == [4] * 7


def test_errors_name_the_files(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        files.expand(str(tmp_path / "part-*.csv"))
    paths = _write(tmp_path, [3, 3])
    other = pd.DataFrame({"q": ["a"], "doc": ["b"]})
    other.to_csv(tmp_path / "part-9.csv", index=False)
    with pytest.raises(DataError, match="needs the same header"):
        files.scan(files.expand(str(tmp_path / "part-*.csv")), ["query"], 0.1)
    with pytest.raises(DataError, match=r"no column\(s\) \['nope'\]"):
        files.scan(paths, ["nope"], 0.1)
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "part-8.parquet")
    with pytest.raises(DataError, match="formats"):
        files.expand(str(tmp_path / "part-*"))


def test_equal_steps_split_a_pass_into_exact_batches(tmp_path):
    """Multi-worker: every worker takes the largest worker's number of steps,
    each pass split into batches that differ by at most one row."""
    _write(tmp_path, [30, 11])
    source, _, _ = files.scan(files.expand(str(tmp_path / "part-*.csv")),
                              ["query", "doc"], 0.0)
    steps = files.equal_steps(source, 2, 8)
    assert steps == 4  # ceil(30 / 8)
    for index, count in ((0, 30), (1, 11)):
        dataset = files.train_dataset(source, FEATURES, 8, seed=2, num_shards=2,
                                      index=index, num_batches=steps)
        batches = [len(b["query"]) for b in dataset.take(2 * steps)]
        assert sum(batches[:steps]) == count and max(batches) - min(batches) <= 1
        first = _read_all(dataset.take(steps))
        assert len(set(first)) == count  # one pass: each row once
    with pytest.raises(DataError, match="files of similar size"):
        files.train_dataset(source, FEATURES, 8, num_shards=2, index=1,
                            num_batches=12)


def test_cli_streams_a_glob_of_files(tmp_path, monkeypatch):
    """`tfdssm train --data 'dir/part-*.csv'`: the pipeline streams the rows,
    what needs them in memory is off by default (said in the log), and asking
    for it is refused with the fix. (Training on a glob end to end: the
    multi-worker test in test_distribute.py and the bench cluster test.)"""
    import contextlib
    import io

    from tfdssm import cli
    from tfdssm.training import run as training

    _write(tmp_path, [40, 30, 30])
    base = ["train", "--pipeline", "pairs", "--data", str(tmp_path / "part-*.csv"),
            "--candidate-id-column", "doc_id", "--hidden", "8", "--dim", "8",
            "--buckets", "500", "--epochs", "1", "--batch-size", "16",
            "--export-dir", str(tmp_path / "export")]
    calls = []

    def fake_run(prepared, export_dir, **kwargs):
        calls.append((prepared, kwargs))
        raise SystemExit(0)  # stop after the arguments were checked

    monkeypatch.setattr(training, "run", fake_run)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        with pytest.raises(SystemExit):
            cli.main(base)
    (prepared, kwargs), = calls
    assert prepared.train_files.files == sorted(
        str(p) for p in tmp_path.glob("part-*.csv"))
    assert len(prepared.train) == 0 and len(prepared.test) > 0
    assert prepared.train_files.num_rows + len(prepared.test) == 100
    assert (kwargs["patience"], kwargs["hybrid"], kwargs["hard_negatives"]) == (
        None, False, None)
    assert ("early stopping, the hybrid export, hard negatives: off, the training "
            "rows are streamed") in err.getvalue()
    monkeypatch.undo()
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main([*base, "--patience", "2"])
    assert code == 2 and "--patience 0 --no-hybrid" in err.getvalue()


def test_restrict_columns_are_refused_with_a_glob(tmp_path):
    """The streamed scan keeps only the text columns, so corpus columns for
    filter tokens would be lost: the recipe says so instead."""
    from tfdssm.errors import ConfigError
    from tfdssm.recipes import pairs

    pd.DataFrame({"query": ["a b", "c d"], "doc": ["x", "y"], "genre": ["g", "h"]}
                 ).to_csv(tmp_path / "part-0.csv", index=False)
    with pytest.raises(ConfigError, match=r"\['genre'\].*not supported with a glob"):
        pairs.prepare(str(tmp_path / "part-*.csv"), corpus_columns=["genre"])
