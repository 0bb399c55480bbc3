"""The Beam pipeline of ``tfdssm index``: corpus files -> embedding records.

::

    files --Reshuffle--> read chunks of rows --Reshuffle--> RunInference(candidate
          tower, one chunk per call) --> tf.train.Example records, one per chunk
          and shard --> [Partition by id into N shards]
          --> WriteToTFRecord  (WORK/shard-0000i-of-0000N/embeddings-*.tfrecord)

Both reshuffles spread the work over the workers: the first the files, the
second the chunks (a corpus of one big file is still embedded by every worker).
Rows travel in chunks (``--batch-size`` rows), so no per-row Python work is
done between reading and writing.

Runners: any Beam runner, through its standard options
(``--runner DataflowRunner --project ... --region ... --temp_location gs://...``,
``--runner FlinkRunner --flink_master host:8081``, ``--runner SparkRunner
--spark_master_url spark://host:7077``). Without ``--runner`` the pipeline runs
locally with :data:`LOCAL_DEFAULTS` (Beam's DirectRunner engine, two worker
processes). Since Beam 2.68 the DirectRunner first tries the Prism runner,
which downloads a Go binary on first use; ``tfdssm index`` runs the
DirectRunner's own engine (``FnApiRunner``) directly instead, so a local run
never downloads anything (pass ``--runner PrismRunner`` to use Prism).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from tfdssm.errors import ConfigError
from tfdssm.indexing import corpus
from tfdssm.indexing.handler import CandidateTowerHandler

LOG = logging.getLogger("tfdssm.indexing")
LOCAL_DEFAULTS = ("--runner", "DirectRunner", "--direct_running_mode",
                  "multi_processing", "--direct_num_workers", "2")
_LOCAL_RUNNERS = ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


def pipeline_options(beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Beam options from command-line style arguments, local defaults filled in.

    Without ``--runner``, :data:`LOCAL_DEFAULTS` apply (the other options given
    are kept). Options Beam does not know are logged and ignored by Beam.

    >>> options = pipeline_options([])
    >>> options.view_as(DirectOptions).direct_num_workers
    2
    >>> pipeline_options(["--runner", "DataflowRunner"]).view_as(
    ...     StandardOptions).runner
    'DataflowRunner'
    """
    args = list(beam_args)
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    if "--runner" not in given:
        defaults = list(LOCAL_DEFAULTS)
        for flag in ("--direct_running_mode", "--direct_num_workers"):
            if flag in given:
                at = defaults.index(flag)
                del defaults[at:at + 2]
        args = defaults + args
    return PipelineOptions(args)


def _runner(options: PipelineOptions) -> Any:
    """The runner object: the DirectRunner's FnApiRunner engine for local runs
    (no Prism download), else the named runner."""
    name = options.view_as(StandardOptions).runner or "DirectRunner"
    if name in _LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import (  # noqa: PLC0415
            fn_runner,
        )

        mode = options.view_as(DirectOptions).direct_running_mode
        workers = options.view_as(DirectOptions).direct_num_workers
        LOG.info("running locally on Beam's FnApiRunner (%s, %s "
                 "worker(s))", mode, workers)
        return fn_runner.FnApiRunner()
    return name


def _read(path: str, columns: Mapping[str, str], id_column: str, chunk_rows: int):
    start, rows = time.perf_counter(), 0
    for chunk in corpus.read_chunks(path, columns, id_column, chunk_rows):
        rows += len(chunk[id_column])
        yield chunk
    LOG.info("read %d rows from %s in %.1f s", rows, path, time.perf_counter() - start)
    beam.metrics.Metrics.counter("tfdssm_index", "rows_read").inc(rows)


def _encode(result: PredictionResult, id_column: str, num_shards: int,
            keep: Sequence[str]):
    """``(shard, record)`` per shard the chunk's rows go to."""
    chunk = result.example
    kept = {n: chunk[n] for n in (id_column, *keep) if n in chunk}
    ids = chunk[id_column]
    beam.metrics.Metrics.counter("tfdssm_index", "rows_embedded").inc(len(ids))
    if num_shards == 1:
        yield 0, corpus.encode_chunk(kept, id_column, result.inference)
        return
    parts: dict[int, list[int]] = {}
    for i, cid in enumerate(ids):
        parts.setdefault(corpus.shard_of(str(cid), num_shards), []).append(i)
    for shard, rows in sorted(parts.items()):
        yield shard, corpus.encode_chunk(kept, id_column, result.inference, rows)


def shard_prefix(work_dir: str, index: int, num_shards: int) -> str:
    """Output prefix of shard ``index``: ``WORK/shard-0000i-of-0000N/embeddings``."""
    return f"{work_dir.rstrip('/')}/shard-{index:05d}-of-{num_shards:05d}/embeddings"


def build_pipeline(
    pipeline: beam.Pipeline,
    files: Sequence[str],
    handler: CandidateTowerHandler,
    id_column: str,
    work_dir: str,
    num_shards: int = 1,
    keep_columns: Sequence[str] = (),
    chunk_rows: int = 512,
) -> None:
    """Adds the read -> embed -> write transforms to ``pipeline``.

    Args:
        pipeline: An open ``beam.Pipeline``.
        files: Corpus files (:func:`tfdssm.indexing.corpus.expand`).
        handler: The candidate tower's model handler.
        id_column: Column naming each candidate.
        work_dir: Where the embedding records go (local or e.g. ``gs://``).
        num_shards: Retrieval shards; candidate ``c`` goes to shard
            :func:`tfdssm.indexing.corpus.shard_of` (``c``, ``num_shards``).
        keep_columns: Candidate columns stored with each embedding (the corpus
            table and a hybrid model's BM25 index are rebuilt from them).
        chunk_rows: Rows per chunk: the unit of work, and of a tower call.
    """
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1, received {num_shards}.")
    columns = dict(handler.columns)
    records = (
        pipeline
        | "CorpusFiles" >> beam.Create(list(files))
        | "SpreadFiles" >> beam.Reshuffle()
        | "ReadChunks" >> beam.FlatMap(_read, columns, id_column, chunk_rows)
        | "SpreadChunks" >> beam.Reshuffle()
        | "Embed" >> RunInference(handler)
        | "Encode" >> beam.FlatMap(_encode, id_column, num_shards, list(keep_columns))
    )
    parts = records | "ByShard" >> beam.Partition(lambda kv, n: kv[0], num_shards)
    for i, part in enumerate(parts):
        (part
         | f"Records{i}" >> beam.Values()
         | f"Write{i}" >> beam.io.WriteToTFRecord(
             shard_prefix(work_dir, i, num_shards), file_name_suffix=".tfrecord"))


def run(
    files: Sequence[str],
    handler: CandidateTowerHandler,
    id_column: str,
    work_dir: str,
    num_shards: int = 1,
    keep_columns: Sequence[str] = (),
    beam_args: Sequence[str] = (),
    chunk_rows: int = 512,
) -> dict[str, Any]:
    """Runs the pipeline to completion.

    Returns:
        ``{"runner": name, "seconds": s, "rows": embedded rows (when the runner
        reports metrics)}``.
    """
    options = pipeline_options(beam_args)
    runner = _runner(options)
    name = options.view_as(StandardOptions).runner or "DirectRunner"
    start = time.perf_counter()
    LOG.info("embedding %d corpus file(s) with %s into %s",
             len(files), name, work_dir)
    with beam.Pipeline(runner=runner, options=options) as pipeline:
        build_pipeline(pipeline, files, handler, id_column, work_dir, num_shards,
                       keep_columns, chunk_rows)
    result = pipeline.result if hasattr(pipeline, "result") else None
    rows = None
    if result is not None:
        try:
            counters = result.metrics().query(beam.metrics.MetricsFilter().with_name(
                "rows_embedded"))["counters"]
            rows = sum(c.committed or c.attempted or 0 for c in counters) or None
        except Exception:  # noqa: BLE001 - metrics are optional per runner
            rows = None
    seconds = time.perf_counter() - start
    LOG.info("pipeline finished in %.1f s%s", seconds,
             f" ({rows} rows embedded)" if rows else "")
    return {"runner": name, "seconds": round(seconds, 2), "rows": rows}


__all__ = ["LOCAL_DEFAULTS", "build_pipeline", "pipeline_options", "run",
           "shard_prefix"]
