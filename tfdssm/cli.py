"""The ``tfdssm`` command line: parses arguments and calls the library.

Arguments and input files (exists, readable, delimiter, header columns) are
checked before TensorFlow is imported (:func:`check_args`), so a mistake fails
in a fraction of a second. Every option's help shows its default (per pipeline
where the recipes differ: :mod:`tfdssm.recipes.defaults`).

Exit codes: 0 success, 2 a user error (message on stderr, no traceback), 1 an
unexpected failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tfdssm.export import QUANTIZATIONS
from tfdssm.recipes import PIPELINES
from tfdssm.recipes.defaults import DEFAULTS, HARD_NEGATIVES, LOSSES, STRATEGIES

# Per-pipeline defaults live in the library: tfdssm.recipes.defaults.


def _per_pipeline(option: str) -> str:
    """Help text naming an option's default for each pipeline."""
    shown = []
    for name, values in DEFAULTS.items():
        value = values[option]
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "on" if value else "off"
        elif value is None:
            value = "none"
        shown.append((name, value))
    if len({v for _, v in shown}) == 1:
        return f"default {shown[0][1]}"
    return "default " + "; ".join(f"{n}: {v}" for n, v in shown)


def _shown(value: Any) -> str:
    """A default as ``--help`` shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return "none" if value is None else str(value)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not already
    name its default (flags show ``off``; list options ``none``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or action.default is None
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {_shown(action.default)})".lstrip()


def _version() -> str:
    """The installed distribution's version, else ``tfdssm.__version__``."""
    try:
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        return version("tfdssm")
    except (ImportError, PackageNotFoundError):
        from tfdssm import __version__  # noqa: PLC0415 - no TensorFlow

        return __version__


class _VersionAction(argparse.Action):
    """``--version``: looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print tfdssm's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any,
                 **kwargs: Any) -> None:
        print(f"tfdssm {_version()}")
        parser.exit()


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 300,300, received {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, received {text!r}")
    return sizes


def _number(convert: type, kind: str, ok: Callable[[Any], bool], rule: str):
    """An argparse type: ``convert(text)``, then ``ok(value)``, else ``rule``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind}, received {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, received {value}")
        return value

    return parse


_positive = _number(int, "an integer", lambda v: v >= 1, ">= 1")
_non_negative = _number(int, "an integer", lambda v: v >= 0, ">= 0")
_positive_float = _number(float, "a number", lambda v: v > 0, "> 0")
_fraction = _number(float, "a number", lambda v: 0 < v < 1, "between 0 and 1")
_MAX_LENGTH_LIMIT = 1_000_000  # tfdssm.features.basic.MAX_LENGTH_LIMIT (no TF here)
_max_length = _number(int, "an integer", lambda v: 1 <= v <= _MAX_LENGTH_LIMIT,
                      f"between 1 and {_MAX_LENGTH_LIMIT:,} code points")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a port number, received {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"ports are 0-65535, received {value}")
    return value


def _host_port(text: str) -> str:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT like localhost:8500, received {text!r}")
    return text


def _separator(text: str) -> str:
    from tfdssm.data.tables import parse_separator  # noqa: PLC0415 - no TensorFlow
    from tfdssm.errors import DataError  # noqa: PLC0415

    try:
        return parse_separator(text)
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_SEP_HELP = ("CSV/TSV delimiter: ',', tab (or '\\t'), ';' or '|' (default: "
             "detected from the file's first lines)")


def build_parser() -> argparse.ArgumentParser:
    """The ``tfdssm`` argument parser (no TensorFlow)."""
    parser = argparse.ArgumentParser(
        prog="tfdssm", description="Train, evaluate and query DSSM two-tower models.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--verbose", "-v", action="store_true", default=False,
                        help="also show TensorFlow's logs and tfdssm's debug messages")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", "-v", action="store_true",
                         default=argparse.SUPPRESS, help="also show TensorFlow's "
                         "logs and tfdssm's debug messages (default: off)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbose], help=text, description=text,
                              formatter_class=_HelpFormatter)

    train = command("train", "train a pipeline and export it")
    _add_train(train)
    _add_evaluate(command("evaluate", "Recall/NDCG/MRR@K of an export on a table"))
    _add_tflite(command("tflite", "(re)build query_tower.tflite, print size and "
                        "parity with the SavedModel"))
    query = command("query", "top-k candidates for a query")
    _add_query(query)
    _add_filter_options(train, query)
    _add_serve(command("serve", "serve an export over TF Serving's gRPC and REST "
                       "APIs (newest versions, reloaded live)"))
    _add_index(sub.add_parser(
        "index", parents=[verbose], formatter_class=_HelpFormatter,
        help="embed a corpus with an export's candidate tower (Apache Beam) and "
        "write new retrieval versions, no retraining; other options go to Beam",
        epilog="Options not listed here are Apache Beam pipeline options, e.g. "
        "--runner DataflowRunner --project P --region R --temp_location gs://B/tmp. "
        "Default: local, --runner DirectRunner --direct_running_mode "
        "multi_processing --direct_num_workers 2 (no download). See docs/scaling.md."))
    return parser


def _add_train(train: argparse.ArgumentParser) -> None:
    train.add_argument("--pipeline", choices=PIPELINES, required=True,
                       help="pairs: (query, clicked document) rows of a table; "
                       "movielens: MovieLens-100k users and movies")
    train.add_argument("--data", help="pairs: CSV/TSV/Parquet file (required), or "
                       "a quoted glob of them ('dir/part-*.csv': streamed, each "
                       "worker of a multi-worker run reads its own files); "
                       "movielens: an extracted ml-100k directory (default: "
                       "fetched and cached)")
    train.add_argument("--sep", type=_separator, help=_SEP_HELP)
    train.add_argument("--export-dir", required=True, help="where the export goes "
                       "(a new version is added if it exists)")
    train.add_argument("--query-column", default="query",
                       help="pairs: the query text column")
    train.add_argument("--candidate-column", default="doc",
                       help="pairs: the document text column")
    train.add_argument("--candidate-id-column", help="pairs: a column identifying "
                       "each document (default: the document text is its id)")
    train.add_argument("--epochs", type=_positive, help="passes over the training "
                       "rows; with early stopping, the most (" +
                       _per_pipeline("epochs") + ")")
    train.add_argument("--batch-size", type=_positive, help="rows per step, also "
                       "the in-batch negatives (" + _per_pipeline("batch_size") + ")")
    train.add_argument("--learning-rate", type=_positive_float,
                       help="Adam's learning rate (" +
                       _per_pipeline("learning_rate") + ")")
    train.add_argument("--hidden", type=_sizes, help="hidden layer sizes, e.g. "
                       "300,300 (" + _per_pipeline("hidden") + ")")
    train.add_argument("--dim", type=_positive, help="embedding size (" +
                       _per_pipeline("dim") + ")")
    train.add_argument("--buckets", type=_positive, help="trigram hash buckets (" +
                       _per_pipeline("buckets") + ")")
    train.add_argument("--activation", choices=["tanh", "relu", "gelu", "swish"],
                       help="hidden layers' activation (" +
                       _per_pipeline("activation") + ")")
    train.add_argument("--max-length", type=_max_length, help="code points kept per "
                       "text, pairs (" + _per_pipeline("max_length") + ")")
    train.add_argument("--word-ngrams", type=_sizes, default=[],
                       help="also hash word unigrams/bigrams, e.g. 1,2 (pairs)")
    train.add_argument("--loss", default="in_batch", choices=LOSSES,
                       help="see tfdssm.model.losses for when to use which")
    train.add_argument("--temperature", type=_positive_float,
                       help="softmax temperature (" + _per_pipeline("temperature")
                       + ")")
    train.add_argument("--shared-towers", action=argparse.BooleanOptionalAction,
                       help="pairs: one tower (same weights) for queries and "
                       "documents (" + _per_pipeline("shared_towers") + ")")
    train.add_argument("--patience", type=_non_negative, help="early stopping: "
                       "hold out 5 %% of the training rows, score them after every "
                       "epoch (Recall@10, MRR@10), stop after N epochs without "
                       "improvement and keep the best epoch; 0 = train all epochs (" +
                       _per_pipeline("patience") + ")")
    train.add_argument("--hybrid", action=argparse.BooleanOptionalAction,
                       help="retrieval models fuse the towers' score with BM25 over "
                       "the candidates' text, weight chosen on the validation rows "
                       "(" + _per_pipeline("hybrid") + ")")
    train.add_argument("--hard-negatives", choices=(*HARD_NEGATIVES, "none"),
                       help="extra negatives per training row: bm25 (mined once "
                       "by BM25 over the training documents), self (the towers' "
                       "own top documents, re-mined every --hard-negatives-every "
                       "epochs) or none (" + _per_pipeline("hard_negatives") + ")")
    train.add_argument("--hard-negatives-every", type=_positive, default=1,
                       help="with --hard-negatives self: re-mine every N epochs")
    train.add_argument("--senet", action="store_true", help="movielens: SENet block")
    train.add_argument("--user-tower", choices=["features", "history", "youtube"],
                       default="features", help="movielens: user id + demographics, "
                       "plus the rating history (time-decay pooled), or YoutubeDNN")
    train.add_argument("--num-heads", type=_positive, default=1,
                       help="movielens: query vectors per user (multi-interest)")
    train.add_argument("--test-fraction", type=_fraction, help="rows held out for "
                       "the final evaluation (" + _per_pipeline("test_fraction") + ")")
    train.add_argument("--tensorboard-dir", help="write TensorBoard logs here "
                       "(default: none)")
    train.add_argument("--seed", type=int, default=0, help="shuffling and "
                       "initialisation seed")
    train.add_argument("--quiet", action="store_true",
                       help="print warnings only, no progress")
    train.add_argument("--max-k", type=_positive, default=100,
                       help="largest k the retrieval models accept per request")
    train.add_argument("--resume", action="store_true",
                       help="continue a killed run from its last epoch checkpoint "
                       "(same arguments)")
    train.add_argument("--checkpoint-dir", help="where training backs up model and "
                       "optimizer every epoch (default EXPORT_DIR/.checkpoints; "
                       "removed when training finishes)")
    train.add_argument("--strategy", choices=STRATEGIES,
                       default="default", help="tf.distribute strategy: mirrored "
                       "(local GPUs), multi_worker (the cluster in TF_CONFIG; "
                       "every worker runs this command, the chief exports) or "
                       "parameter_server (chief, worker and ps tasks in TF_CONFIG; "
                       "embedding tables sharded across the ps tasks; every task "
                       "runs this command, workers and ps serve the chief)")
    _add_hash_cache_option(train)


def _add_evaluate(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--export-dir", required=True, help="an export of `tfdssm train`")
    ev.add_argument("--data", required=True, help="CSV/TSV/Parquet with the query "
                    "columns and the candidate id column")
    ev.add_argument("--sep", type=_separator, help=_SEP_HELP)
    ev.add_argument("--k", type=_sizes, default=[10, 50, 100],
                    help="cut-offs of Recall/NDCG/MRR@K")
    ev.add_argument("--add-eval-docs", action="store_true", help="also rank the "
                    "evaluation file's own documents (rows whose document the "
                    "export does not serve can then be scored; the figures are "
                    "then not the served model's); by default the pool is the "
                    "exported corpus, what the served model ranks (default: off)")
    ev.add_argument("--json", action="store_true", help="print JSON")


def _add_tflite(lite: argparse.ArgumentParser) -> None:
    lite.add_argument("--export-dir", required=True, help="an export of `tfdssm train`")
    lite.add_argument("--quantize", choices=QUANTIZATIONS,
                      default="none", help="none writes query_tower.tflite; the "
                      "others write query_tower.<mode>.tflite beside it")


def _add_query(query: argparse.ArgumentParser) -> None:
    where = query.add_mutually_exclusive_group(required=True)
    where.add_argument("--export-dir", help="retrieve in process from an export "
                       "(this or --server is required)")
    where.add_argument("--server", metavar="HOST:PORT", type=_host_port,
                       help="ask a running model server (tfdssm serve / TF "
                       "Serving) over gRPC, e.g. localhost:8500 (this or "
                       "--export-dir is required)")
    query.add_argument("--model", choices=["retrieval", "retrieval_brute_force"],
                       default="retrieval", help="with --server: the retrieval model")
    query.add_argument("--k", type=_positive, default=10, help="results per query")
    query.add_argument("--exclude", action="append", default=[], metavar="ID",
                       help="a candidate id to leave out (repeat for several)")
    query.add_argument("--timeout", type=_positive_float, default=10.0,
                       help="with --server: seconds per request")
    query.add_argument("--feature", action="append", default=[], metavar="NAME=VALUE",
                       help="a query feature (repeat for several)")
    query.add_argument("text", nargs="*", help="query texts (single text feature; "
                       "default: none, the features come from --feature)")


def _add_serve(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--export-dir", help="an export of `tfdssm train` (its "
                       "models.config names what is served); required unless "
                       "--shards (default: none)")
    serve.add_argument("--grpc-port", type=_port, default=8500,
                       help="TF Serving gRPC port; 0: any free port")
    serve.add_argument("--rest-port", type=_port, default=8501,
                       help="TF Serving REST port; 0: any free port")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (loopback only by default)")
    serve.add_argument("--poll-seconds", type=_positive_float, default=1.0,
                       help="how often to look for new versions")
    serve.add_argument("--max-request-bytes", type=_positive, default=64 * 1024 * 1024,
                       help="largest gRPC message / REST body accepted")
    serve.add_argument("--max-batch-size", type=_positive, default=4096,
                       help="most rows (queries or candidates) per request")
    serve.add_argument("--model-config-file", help="TF Serving model config "
                       "(default EXPORT_DIR/models.config)")
    _add_batching_options(serve)
    _add_shard_front_options(serve)


def _add_hash_cache_option(train: argparse.ArgumentParser) -> None:
    train.add_argument("--no-hash-cache", dest="hash_cache", action="store_false",
                       help="hash the text in every training step instead of once "
                       "per run (same weights; docs/training_speed.md; default: "
                       "hashed once)")


def _add_index(index: argparse.ArgumentParser) -> None:
    """``tfdssm index``: re-index an export over a corpus with Apache Beam."""
    index.add_argument("--export-dir", required=True, help="a `tfdssm train` export")
    index.add_argument("--corpus", required=True, nargs="+", metavar="FILES",
                       help="corpus files or globs: CSV/TSV, Parquet or TFRecord "
                       "with the candidate tower's columns and the id column")
    index.add_argument("--id-column", help="column naming each candidate (default: "
                       "the export's candidate id column)")
    index.add_argument("--num-shards", type=_positive, default=1,
                       help="N > 1: N retrieval models in EXPORT_DIR/shards/<i>, "
                       "each served by its own `tfdssm serve` behind "
                       "`tfdssm serve --shards`")
    index.add_argument("--max-k", type=_positive,
                       help="largest k per request (default: the export's)")
    index.add_argument("--batch-size", type=_positive, default=512,
                       help="rows per candidate-tower call")
    index.add_argument("--work-dir", help="where the embedding records go (e.g. "
                       "gs://BUCKET/tmp on Dataflow; default: a hidden directory in "
                       "the export, removed afterwards)")


def _add_shard_front_options(serve: argparse.ArgumentParser) -> None:
    """``tfdssm serve --shards``: a front merging retrieval shards."""
    serve.add_argument("--shards", help="HOST:PORT,HOST:PORT,...: serve a front that "
                       "sends each request to these shard servers (gRPC) and merges "
                       "their top-k, instead of an export (default: none)")
    serve.add_argument("--shard-timeout", type=_positive_float, default=5.0,
                       help="seconds a shard may take per request (default 5)")
    serve.add_argument("--allow-partial", action="store_true",
                       help="answer with the shards that answered (output "
                       "`shards_answered` says which) instead of failing the request")


def _names(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated column names like genres,language, "
            f"received {text!r}")
    return names


def _token(text: str) -> str:
    namespace, sep, token = text.partition("=")
    if not (namespace and sep and token):
        raise argparse.ArgumentTypeError(
            f"expected NAMESPACE=TOKEN like genres=Comedy, received {text!r}")
    return text


def _add_filter_options(train: argparse.ArgumentParser,
                        query: argparse.ArgumentParser) -> None:
    """Filtered retrieval (docs/filters.md): restrict columns at export, allow /
    deny tokens per query."""
    train.add_argument("--restrict-columns", type=_names, default=[],
                       metavar="COL[,COL]", help="corpus columns whose values the "
                       "candidates carry as filter tokens (lists and '|'-separated "
                       "strings give several), for top_k_filter / query --allow")
    query.add_argument("--allow", action="append", default=[],
                       metavar="NAMESPACE=TOKEN", type=_token,
                       help="only candidates with this token, e.g. genres=Comedy "
                       "(repeat: OR within a namespace, AND across namespaces)")
    query.add_argument("--deny", action="append", default=[],
                       metavar="NAMESPACE=TOKEN", type=_token,
                       help="leave out candidates with this token (repeatable)")


def _add_batching_options(serve: argparse.ArgumentParser) -> None:
    """``tfdssm serve``'s TF Serving batching and monitoring flags."""
    serve.add_argument("--enable-batching", action="store_true",
                       help="merge concurrent requests to the same model, version "
                       "and signature into one SavedModel call")
    serve.add_argument("--batching-parameters-file", metavar="FILE",
                       help="TF Serving BatchingParameters text proto (implies "
                       "--enable-batching; default: TF Serving's defaults)")
    serve.add_argument("--monitoring-config-file", metavar="FILE",
                       help="TF Serving MonitoringConfig text proto; "
                       "prometheus_config { enable: true } serves Prometheus "
                       "metrics on the REST port (default: none, no metrics)")


# --------------------------------------------------------------------------- #
# Checks before TensorFlow loads
# --------------------------------------------------------------------------- #


def check_args(args: argparse.Namespace) -> None:
    """Checks a command's arguments and input files without TensorFlow; fills
    in what it found (the delimiter of ``--data``).

    Raises:
        TfdssmError: the first problem, said in one line.
    """
    check = {"train": _check_train, "evaluate": _check_evaluate,
             "query": _check_query, "tflite": _check_export_dir,
             "serve": _check_serve, "index": _check_index}.get(args.command)
    if check is not None:
        check(args)


def _check_train(args: argparse.Namespace) -> None:
    from tfdssm.data.tables import check_table, is_glob  # noqa: PLC0415 - no TF
    from tfdssm.errors import ConfigError, DataError  # noqa: PLC0415

    if pathlib.Path(args.export_dir).is_file():
        raise ConfigError(f"--export-dir {args.export_dir!r} is a file, not a "
                          "directory; pass a new directory or an earlier export.")
    if args.pipeline == "movielens":
        if args.data and not pathlib.Path(args.data).is_dir():
            raise DataError(f"--data {args.data!r} is not a directory; --pipeline "
                            "movielens reads an extracted ml-100k directory (or "
                            "leave --data out to fetch it).")
        return
    if not args.data:
        raise ConfigError("--pipeline pairs needs --data FILE.csv.")
    if args.query_column == args.candidate_column:
        raise ConfigError(
            f"--query-column and --candidate-column are both {args.query_column!r}; "
            "they must name two different columns.")
    needed = [args.query_column, args.candidate_column]
    if args.candidate_id_column:
        needed.append(args.candidate_id_column)
    needed += getattr(args, "restrict_columns", [])
    if is_glob(args.data):  # streamed with the files' suffix's delimiter
        _check_glob(args.data, needed, args.sep)
        args.sep = None
        return
    args.sep = check_table(args.data, needed, args.sep,
                           what=f"the pairs data {str(args.data)!r}")


def _check_glob(pattern: str, needed: list[str], sep: str | None) -> None:
    """Checks the first file a ``--data`` glob matches (streamed files are read
    with their suffix's delimiter: ``.csv`` comma, ``.tsv`` tab)."""
    from tfdssm.data.tables import check_table, expand  # noqa: PLC0415 - no TF
    from tfdssm.errors import DataError  # noqa: PLC0415

    paths = expand(pattern)
    found = check_table(paths[0], needed, sep, what=f"the pairs data {paths[0]!r}")
    expected = {".csv": ",", ".tsv": "\t"}.get(pathlib.Path(paths[0]).suffix.lower())
    if found is not None and expected is not None and found != expected:
        raise DataError(
            f"{paths[0]!r} is delimited by {found!r}, but files matched by a glob "
            f"are streamed with their suffix's delimiter ({expected!r} for "
            f"{pathlib.Path(paths[0]).suffix}); rename the files (.tsv for tabs) "
            "or convert them.")


def _check_export_dir(args: argparse.Namespace) -> dict[str, Any]:
    from tfdssm.export.layout import read_export  # noqa: PLC0415 - no TensorFlow

    return read_export(args.export_dir)


def _check_evaluate(args: argparse.Namespace) -> None:
    from tfdssm.data.tables import check_table  # noqa: PLC0415 - no TensorFlow

    info = _check_export_dir(args)
    # Text query features and the candidate id: enough to catch a wrong file;
    # the library checks every column once the data is read.
    needed = [f["name"] for f in info.get("query", {}).get("features", [])
              if f.get("kind") == "text"]
    if info.get("candidate_id"):
        needed.append(info["candidate_id"])
    args.sep = check_table(args.data, needed, args.sep,
                           what=f"the evaluation data {args.data!r}")


def _check_query(args: argparse.Namespace) -> None:
    from tfdssm.errors import DataError  # noqa: PLC0415 - no TensorFlow

    for item in args.feature:
        name, equals, _ = item.partition("=")
        if not equals or not name:
            raise DataError(f"--feature expects NAME=VALUE, received {item!r}.")
    if args.export_dir is not None:
        _check_export_dir(args)


def _check_index(args: argparse.Namespace) -> None:
    import glob  # noqa: PLC0415

    from tfdssm.errors import DataError  # noqa: PLC0415 - no TensorFlow

    _check_export_dir(args)
    for pattern in args.corpus:
        if "://" not in pattern and not glob.glob(pattern):
            raise DataError(f"--corpus {pattern!r} matches no file; check the path "
                            "(quote globs so that the shell does not expand them).")


def _check_serve(args: argparse.Namespace) -> None:
    from tfdssm.errors import ConfigError  # noqa: PLC0415 - no TensorFlow

    if args.shards and args.export_dir:
        raise ConfigError("pass --export-dir (serve an export) or --shards (a front "
                          "over shard servers), not both.")
    if args.shards:
        return
    if not args.export_dir:
        raise ConfigError("tfdssm serve needs --export-dir DIR (or --shards "
                          "HOST:PORT,... for a front over shard servers).")
    if not pathlib.Path(args.export_dir).is_dir():
        raise ConfigError(f"--export-dir {args.export_dir!r} is not a directory; "
                          "pass the --export-dir of `tfdssm train`.")
    if args.model_config_file and not pathlib.Path(args.model_config_file).is_file():
        raise ConfigError(f"--model-config-file {args.model_config_file!r} does "
                          "not exist.")
    for option in ("batching_parameters_file", "monitoring_config_file"):
        path = getattr(args, option, None)
        if path and not pathlib.Path(path).is_file():
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag} {path!r} does not exist; pass a TF Serving "
                              "text-proto file (see docs/serving.md).")


# --------------------------------------------------------------------------- #
# Commands
# --------------------------------------------------------------------------- #


def _train(args: argparse.Namespace) -> int:
    from tfdssm.training import checkpoints, distribute  # noqa: PLC0415 - imports TF
    from tfdssm.training import run as training  # noqa: PLC0415

    defaults = DEFAULTS[args.pipeline]
    if args.strategy == "parameter_server":
        _serve_if_parameter_server_task()
    # First, before TensorFlow runs any op (MultiWorkerMirroredStrategy needs
    # that); the model is built in its scope so that its variables are mirrored.
    strategy = distribute.make_strategy(args.strategy)
    with strategy.scope():
        prepared = _prepare(args, defaults)
    patience = defaults["patience"] if args.patience is None else args.patience
    hard_negatives = (defaults["hard_negatives"] if args.hard_negatives is None
                      else None if args.hard_negatives == "none"
                      else args.hard_negatives)
    if (args.hard_negatives is None and hard_negatives
            and strategy.num_replicas_in_sync > 1):
        logging.getLogger("tfdssm").info(
            "hard negatives are off: they need a single replica (this run has %d); "
            "--hard-negatives none says so explicitly",
            strategy.num_replicas_in_sync)
        hard_negatives = None
    if (args.hard_negatives is None and hard_negatives
            and distribute.is_parameter_server(strategy)):
        logging.getLogger("tfdssm").info(
            "hard negatives are off: parameter-server training does not support "
            "them; --hard-negatives none says so explicitly")
        hard_negatives = None
    hybrid = defaults["hybrid"] if args.hybrid is None else args.hybrid
    if getattr(prepared, "train_files", None) is not None:
        patience, hybrid, hard_negatives = _streamed_defaults(
            args, patience, hybrid, hard_negatives)
    result = training.run(
        prepared, args.export_dir, epochs=args.epochs or defaults["epochs"],
        batch_size=args.batch_size or defaults["batch_size"],
        learning_rate=(defaults["learning_rate"] if args.learning_rate is None
                       else args.learning_rate),
        tensorboard_dir=args.tensorboard_dir, verbose=0 if args.quiet else 2,
        seed=args.seed, strategy=strategy, max_k=args.max_k,
        checkpoint_dir=args.checkpoint_dir or checkpoints.default_dir(args.export_dir),
        resume=args.resume, patience=patience or None,
        hybrid=hybrid, hard_negatives=hard_negatives,
        hard_negatives_every=args.hard_negatives_every,
        hash_cache=args.hash_cache,
        restrict_columns=args.restrict_columns,
    )
    from tfdssm.training.metrics import format_metrics  # noqa: PLC0415

    print(f"evaluation on {len(prepared.test)} held-out rows, "
          f"{len(prepared.corpus)} candidates:")
    print(format_metrics(result["metrics"]))
    if result["export"] is None:
        print("not the chief worker: the chief writes the export")
    else:
        print(f"exported to {args.export_dir} (towers version "
              f"{result['export']['towers']['version']})")
    return 0


def _streamed_defaults(
    args: argparse.Namespace, patience: int, hybrid: bool, hard_negatives: Any
) -> tuple[int, bool, Any]:
    """With training rows streamed from files (a glob as --data), early
    stopping, the hybrid export and hard negatives are off unless asked for
    (then training refuses them with the reason)."""
    off = []
    if args.patience is None and patience:
        patience = 0
        off.append("early stopping")
    if args.hybrid is None and hybrid:
        hybrid = False
        off.append("the hybrid export")
    if args.hard_negatives is None and hard_negatives:
        hard_negatives = None
        off.append("hard negatives")
    if off:
        logging.getLogger("tfdssm").info(
            "%s: off, the training rows are streamed from the files of --data",
            ", ".join(off))
    return patience, hybrid, hard_negatives


def _serve_if_parameter_server_task() -> None:
    """On a ``worker`` or ``ps`` task of a parameter-server cluster, serves the
    chief until the job ends (never returns); on the chief, returns."""
    from tfdssm.training import parameter_server  # noqa: PLC0415 - imports TF

    if parameter_server.is_server_task():
        parameter_server.run_server()


def _prepare(args: argparse.Namespace, defaults: dict) -> Any:
    """The pipeline's model and data from the ``train`` arguments (a
    :class:`tfdssm.training.run.Prepared`); call it inside the strategy's scope."""
    hidden = args.hidden or list(defaults["hidden"])
    dim = args.dim or defaults["dim"]
    buckets = args.buckets or defaults["buckets"]
    if args.pipeline == "pairs":
        from tfdssm.errors import ConfigError  # noqa: PLC0415
        from tfdssm.recipes import pairs  # noqa: PLC0415

        if not args.data:
            raise ConfigError("--pipeline pairs needs --data FILE.csv.")
        prepared = pairs.prepare(
            args.data, args.query_column, args.candidate_column,
            args.candidate_id_column, num_buckets=buckets, hidden=hidden, dim=dim,
            activation=args.activation or defaults["activation"],
            max_length=args.max_length or defaults["max_length"],
            word_ngrams=args.word_ngrams,
            shared_towers=(defaults["shared_towers"] if args.shared_towers is None
                           else args.shared_towers),
            loss=args.loss,
            temperature=(defaults["temperature"] if args.temperature is None
                         else args.temperature),
            test_fraction=(defaults["test_fraction"] if args.test_fraction is None
                           else args.test_fraction),
            sep=getattr(args, "sep", None),
            corpus_columns=args.restrict_columns,
        )
    else:
        from tfdssm.recipes import movielens  # noqa: PLC0415

        prepared = movielens.prepare(
            args.data, hidden=hidden, dim=dim, num_buckets=buckets,
            temperature=(defaults["temperature"] if args.temperature is None
                         else args.temperature),
            senet=args.senet, user_tower=args.user_tower, num_heads=args.num_heads,
            loss=args.loss,
            test_fraction=(defaults["test_fraction"] if args.test_fraction is None
                           else args.test_fraction),
        )
    return prepared


def _evaluate(args: argparse.Namespace) -> int:
    from tfdssm.data.readers import read_table  # noqa: PLC0415
    from tfdssm.export.layout import read_export  # noqa: PLC0415
    from tfdssm.training.evaluation import evaluate_export  # noqa: PLC0415
    from tfdssm.training.metrics import format_metrics  # noqa: PLC0415

    info = read_export(args.export_dir)  # not an export: say so before the data
    frame = read_table(args.data, sep=args.sep)
    metrics, candidates = evaluate_export(
        args.export_dir, frame, ks=args.k, what=f"the evaluation data {args.data!r}",
        add_eval_docs=args.add_eval_docs)
    served = info.get("num_candidates")
    if args.add_eval_docs:
        pool = (f"the exported corpus + the evaluation file's documents "
                f"({candidates} candidates"
                + (f", {candidates - served} added)" if served is not None else ")"))
    else:
        pool = f"the exported corpus, as served ({candidates} candidates)"
    if args.json:
        print(json.dumps({**metrics, "pool": "exported+eval" if args.add_eval_docs
                          else "exported"}, indent=2))
    else:
        print(f"evaluation on {len(frame)} rows; candidate pool: {pool}:")
        print(format_metrics(metrics))
    return 0


def _query(args: argparse.Namespace) -> int:
    if args.server:
        return _query_server(args)
    from tfdssm.errors import DataError  # noqa: PLC0415
    from tfdssm.retrieve import LocalRetriever, parse_feature_args  # noqa: PLC0415

    retriever = LocalRetriever(args.export_dir)
    features = parse_feature_args(args.feature)
    if args.text:
        text = [f.name for f in retriever.query_features if f.kind == "text"]
        if len(text) != 1:
            raise DataError(
                "positional query text needs a query tower with exactly one text "
                f"feature; this one reads {retriever.query_names}. Use --feature."
            )
        features[text[0]] = list(args.text)
    missing = [n for n in retriever.query_names if n not in features]
    if missing:
        raise DataError(
            f"missing query feature(s) {missing}; pass --feature NAME=VALUE.")
    sizes = {len(v) for v in features.values()}
    if len(sizes) != 1:
        raise DataError("give every query feature the same number of values.")
    rows = len(next(iter(features.values())))
    exclude = [args.exclude] * rows if args.exclude else None
    ids, scores = retriever.top_k(features, k=args.k, exclude=exclude,
                                  allow=args.allow or None, deny=args.deny or None)
    for row in range(len(ids)):
        label = ", ".join(f"{n}={features[n][row]}" for n in retriever.query_names)
        texts = retriever.describe(ids[row])
        _print_ranked(label, ids[row], scores[row],
                      [None if t == c else t for c, t in zip(ids[row], texts,
                                                             strict=True)])
    return 0


def _clip(text: str, width: int) -> str:
    r"""One line of at most ``width`` characters (``…`` where it was cut).

    >>> _clip("a  long\ntext", 8), _clip("short", 8)
    ('a long …', 'short')
    """
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _print_ranked(label: str, ids: Sequence[str], scores: Sequence[float],
                  texts: Sequence[str | None] | None = None) -> None:
    """A query's results, one line each, fitted to the terminal (100 columns
    when output is not a terminal): ``rank. id score  text``; long ids and
    texts are cut with ``…``; a text that is its id is shown once."""
    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    print(_clip(f"# {label}", width))
    texts = texts or [None] * len(ids)
    # The id column: 2/5 of the line beside a text, else all but the score.
    limit = width * 2 // 5 if any(texts) else width - 16
    shown = [_clip(cid, limit if t else width - 16) for cid, t in
             zip(ids, texts, strict=True)]
    pad = min(max((len(c) for c in shown), default=0), limit)
    for rank, (cid, score, text) in enumerate(zip(shown, scores, texts, strict=True),
                                              start=1):
        if not cid:  # a multi-head export's padding
            continue
        line = f"{rank:>3}. {cid:<{pad}} {score:8.4f}"
        print(line + (f"  {_clip(text, width - len(line) - 2)}" if text else ""))


def _query_server(args: argparse.Namespace) -> int:
    from tfdssm.client import Client  # noqa: PLC0415
    from tfdssm.retrieve import parse_feature_args  # noqa: PLC0415

    with Client(args.server, timeout=args.timeout) as client:
        features = client.query_features(parse_feature_args(args.feature), args.text,
                                         args.model)
        ids, scores = client.top_k(features, k=args.k, exclude=args.exclude or None,
                                   model=args.model, allow=args.allow or None,
                                   deny=args.deny or None)
    for row in range(len(ids)):
        label = ", ".join(f"{n}={v[row]}" for n, v in features.items())
        _print_ranked(label, [str(c) for c in ids[row]], scores[row])
    return 0


def _index(args: argparse.Namespace) -> int:
    from tfdssm.indexing import reindex  # noqa: PLC0415 - imports TF and Beam

    result = reindex.index_corpus(
        args.export_dir, args.corpus, id_column=args.id_column,
        num_shards=args.num_shards, max_k=args.max_k, beam_args=args.beam_args,
        work_dir=args.work_dir, batch_size=args.batch_size)
    for info in result["export.json"]:
        where = (f"shard {info['shard']['index']}" if "shard" in info
                 else args.export_dir)
        print(f"{where}: {info['num_candidates']} candidates; retrieval version "
              f"{info['retrieval']['version']}, retrieval_brute_force version "
              f"{info['retrieval_brute_force']['version']} (committed)")
    return 0


def _serve_front(args: argparse.Namespace) -> int:
    from tfdssm.serving.front import serve_front  # noqa: PLC0415

    return serve_front(
        args.shards, grpc_port=args.grpc_port, rest_port=args.rest_port,
        host=args.host, timeout_seconds=args.shard_timeout,
        allow_partial=args.allow_partial, max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size)


def _serve(args: argparse.Namespace) -> int:
    if args.shards:
        return _serve_front(args)
    from tfdssm.serving import config_files  # noqa: PLC0415 - TensorFlow-free
    from tfdssm.serving.server import serve  # noqa: PLC0415

    batching = None
    if args.batching_parameters_file:
        batching = config_files.read_batching_parameters(args.batching_parameters_file)
    elif args.enable_batching:
        batching = config_files.BatchingParameters()
    monitoring = None
    if args.monitoring_config_file:
        monitoring = config_files.read_monitoring_config(args.monitoring_config_file)
    return serve(
        args.export_dir, grpc_port=args.grpc_port, rest_port=args.rest_port,
        host=args.host, poll_seconds=args.poll_seconds,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size, model_config_file=args.model_config_file,
        batching=batching, monitoring=monitoring,
    )


def _tflite(args: argparse.Namespace) -> int:
    from tfdssm.export import tflite  # noqa: PLC0415

    written = tflite.rebuild(args.export_dir, args.quantize)
    check = written["parity"]
    print(f"wrote {written['path']}: {written['bytes']:,} bytes, "
          f"{args.quantize} quantization")
    print(f"ops (TFLite builtins only): {', '.join(written['ops'])}")
    print(f"parity vs towers/ query signature over {check['queries']} queries: "
          f"max |diff| {check['max_abs_diff']:.2e}, min cosine "
          f"{check['min_cosine']:.6f}")
    return 0


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a message comes
    (so that redirecting it, as tests do, works)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Formatter(logging.Formatter):
    """``tfdssm: <message>``; ``tfdssm: warning: <message>`` from level warning
    on. The server's messages already start with ``tfdssm serve``."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.name.startswith("tfdssm.serving"):
            return message
        if record.levelno >= logging.WARNING:
            return f"tfdssm: {record.levelname.lower()}: {message}"
        return f"tfdssm: {message}"


# TensorFlow's C++ and Python-side logs, quiet unless --verbose.
_TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
_TF_LOGGERS = ("tensorflow", "absl", "h5py")


@contextlib.contextmanager
def _output(verbose: bool, quiet: bool = False) -> Iterator[None]:
    """Where messages go while a command runs: the ``tfdssm`` logger (and
    tfdssm's warnings) to stderr as ``tfdssm: ...`` lines; TensorFlow's C++ and
    Python logs hidden unless ``verbose``. Call it before TensorFlow is
    imported: ``TF_CPP_MIN_LOG_LEVEL`` is read once, at import."""
    saved_env = {name: os.environ.get(name) for name in _TF_ENV}
    # 3 also hides the `E ... cuInit ... CUDA error` line of CPU machines.
    os.environ.update(_TF_ENV if not verbose else {"TF_CPP_MIN_LOG_LEVEL": "0"})
    from tfdssm.errors import TfdssmWarning  # noqa: PLC0415 - no TensorFlow

    logger = logging.getLogger("tfdssm")
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    saved = (logger.level, logger.propagate,
             {name: logging.getLogger(name).level for name in _TF_LOGGERS})
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else
                    logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if not verbose:
        for name in _TF_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_warning(message: Warning | str, category: type[Warning],
                         *args: Any, **kwargs: Any) -> None:
            if issubclass(category, TfdssmWarning):
                logger.warning("%s", message)
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = show_warning
        warnings.simplefilter("always", TfdssmWarning)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
            for name, level in saved[2].items():
                logging.getLogger(name).setLevel(level)
            for name, value in saved_env.items():  # for in-process callers
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tfdssm`` console script."""
    from tfdssm.errors import TfdssmError  # noqa: PLC0415 - no TensorFlow

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "index":  # only `index` passes options on (Beam)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.beam_args = unknown
    try:
        check_args(args)  # before TensorFlow: a mistake fails fast
    except TfdssmError as error:
        print(f"tfdssm: error: {error}", file=sys.stderr)
        return 2
    with _output(args.verbose, getattr(args, "quiet", False)):
        import tfdssm  # noqa: PLC0415 - sets Keras 2 before TensorFlow loads

        if args.command == "serve":  # no pool: RSS would grow to its high-water mark
            from tfdssm._allocator import keep_default_allocator  # noqa: PLC0415

            keep_default_allocator()
        handlers = {"train": _train, "evaluate": _evaluate, "query": _query,
                    "tflite": _tflite, "serve": _serve, "index": _index}
        try:
            return handlers[args.command](args)
        except TfdssmError as error:
            print(f"tfdssm: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("tfdssm: interrupted", file=sys.stderr)
            return 130
        finally:
            del tfdssm


if __name__ == "__main__":
    sys.exit(main())
