"""The ``tfdssm`` command line: parses arguments and calls the library.

Exit codes: 0 success, 2 a user error (message on stderr, no traceback), 1 an
unexpected failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
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
        shown.append(f"{name}: {value}")
    return "default " + "; ".join(shown)


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


def _number(convert: type, kind: str, ok, rule: str):
    """An argparse type: ``convert(text)``, then ``ok(value)`` or ``rule`` in the error."""

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
_MAX_LENGTH_LIMIT = 1_000_000  # tfdssm.features.basic.MAX_LENGTH_LIMIT (no TF here)
_max_length = _number(int, "an integer", lambda v: 1 <= v <= _MAX_LENGTH_LIMIT,
                      f"between 1 and {_MAX_LENGTH_LIMIT:,} code points")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfdssm", description="Train, evaluate and query DSSM two-tower models."
    )
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", "-v", action="store_true",
                         default=argparse.SUPPRESS, help="also show TensorFlow's "
                         "logs and tfdssm's debug messages")
    parser.add_argument("--verbose", "-v", action="store_true", default=False,
                        help="also show TensorFlow's logs and tfdssm's debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", parents=[verbose],
                           help="train a pipeline and export it")
    train.add_argument("--pipeline", choices=PIPELINES, required=True)
    train.add_argument("--data", help="pairs: CSV/TSV/Parquet file; movielens: an "
                       "extracted ml-100k directory (default: fetched and cached)")
    train.add_argument("--export-dir", required=True)
    train.add_argument("--query-column", default="query")
    train.add_argument("--candidate-column", default="doc")
    train.add_argument("--candidate-id-column")
    train.add_argument("--epochs", type=_positive, help="passes over the training "
                       "rows; with early stopping, the most (" +
                       _per_pipeline("epochs") + ")")
    train.add_argument("--batch-size", type=_positive, help="rows per step, also "
                       "the in-batch negatives (" + _per_pipeline("batch_size") + ")")
    train.add_argument("--learning-rate", type=_positive_float,
                       help=_per_pipeline("learning_rate"))
    train.add_argument("--hidden", type=_sizes, help="hidden layer sizes, e.g. "
                       "300,300 (" + _per_pipeline("hidden") + ")")
    train.add_argument("--dim", type=_positive, help="embedding size (" +
                       _per_pipeline("dim") + ")")
    train.add_argument("--buckets", type=_positive, help="trigram hash buckets (" +
                       _per_pipeline("buckets") + ")")
    train.add_argument("--activation", choices=["tanh", "relu", "gelu", "swish"],
                       help=_per_pipeline("activation"))
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
    train.add_argument("--test-fraction", type=float)
    train.add_argument("--tensorboard-dir")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true")
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
                       "(local GPUs) or multi_worker (the cluster in TF_CONFIG; "
                       "every worker runs this command, the chief exports)")

    ev = sub.add_parser("evaluate", parents=[verbose],
                        help="Recall/NDCG/MRR@K of an export on a table")
    ev.add_argument("--export-dir", required=True)
    ev.add_argument("--data", required=True, help="CSV/TSV/Parquet with the query "
                    "columns and the candidate id column")
    ev.add_argument("--k", type=_sizes, default=[10, 50, 100])
    ev.add_argument("--json", action="store_true", help="print JSON")

    lite = sub.add_parser("tflite", parents=[verbose],
                          help="(re)build query_tower.tflite, print size "
                          "and parity with the SavedModel")
    lite.add_argument("--export-dir", required=True)
    lite.add_argument("--quantize", choices=QUANTIZATIONS,
                      default="none", help="none writes query_tower.tflite; the "
                      "others write query_tower.<mode>.tflite beside it")

    query = sub.add_parser("query", parents=[verbose],
                           help="top-k candidates for a query")
    where = query.add_mutually_exclusive_group(required=True)
    where.add_argument("--export-dir", help="retrieve in process from an export")
    where.add_argument("--server", metavar="HOST:PORT", help="ask a running model "
                       "server (tfdssm serve / TF Serving) over gRPC")
    query.add_argument("--model", choices=["retrieval", "retrieval_brute_force"],
                       default="retrieval", help="with --server: the retrieval model")
    query.add_argument("--k", type=_positive, default=10)
    query.add_argument("--exclude", action="append", default=[], metavar="ID",
                       help="a candidate id to leave out (repeat for several)")
    query.add_argument("--timeout", type=float, default=10.0,
                       help="with --server: seconds per request")
    query.add_argument("--feature", action="append", default=[], metavar="NAME=VALUE",
                       help="a query feature (repeat for several)")
    query.add_argument("text", nargs="*", help="query texts (single text feature)")

    _add_filter_options(train, query)

    serve = sub.add_parser("serve", parents=[verbose],
                           help="serve an export over TF Serving's gRPC "
                           "and REST APIs (newest versions, reloaded live)")
    serve.add_argument("--export-dir", required=True)
    serve.add_argument("--grpc-port", type=_port, default=8500, help="0: any free port")
    serve.add_argument("--rest-port", type=_port, default=8501, help="0: any free port")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: loopback only)")
    serve.add_argument("--poll-seconds", type=float, default=1.0,
                       help="how often to look for new versions")
    serve.add_argument("--max-request-bytes", type=_positive, default=64 * 1024 * 1024,
                       help="largest gRPC message / REST body accepted")
    serve.add_argument("--max-batch-size", type=_positive, default=4096,
                       help="most rows (queries or candidates) per request")
    serve.add_argument("--model-config-file", help="TF Serving model config "
                       "(default EXPORT_DIR/models.config)")
    return parser


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


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a port number, received {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"ports are 0-65535, received {value}")
    return value


def _train(args: argparse.Namespace) -> int:
    from tfdssm.training import checkpoints, distribute  # noqa: PLC0415 - imports TF
    from tfdssm.training import run as training  # noqa: PLC0415

    defaults = DEFAULTS[args.pipeline]
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
    result = training.run(
        prepared, args.export_dir, epochs=args.epochs or defaults["epochs"],
        batch_size=args.batch_size or defaults["batch_size"],
        learning_rate=(defaults["learning_rate"] if args.learning_rate is None
                       else args.learning_rate),
        tensorboard_dir=args.tensorboard_dir, verbose=0 if args.quiet else 2,
        seed=args.seed, strategy=strategy, max_k=args.max_k,
        checkpoint_dir=args.checkpoint_dir or checkpoints.default_dir(args.export_dir),
        resume=args.resume, patience=patience or None,
        hybrid=defaults["hybrid"] if args.hybrid is None else args.hybrid,
        hard_negatives=hard_negatives,
        hard_negatives_every=args.hard_negatives_every,
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

    read_export(args.export_dir)  # not an export: say so before reading the data
    frame = read_table(args.data)
    metrics, candidates = evaluate_export(
        args.export_dir, frame, ks=args.k, what=f"the evaluation data {args.data!r}")
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"evaluation on {len(frame)} rows, {candidates} candidates:")
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
        raise DataError(f"missing query feature(s) {missing}; pass --feature NAME=VALUE.")
    sizes = {len(v) for v in features.values()}
    if len(sizes) != 1:
        raise DataError("give every query feature the same number of values.")
    rows = len(next(iter(features.values())))
    exclude = [args.exclude] * rows if args.exclude else None
    ids, scores = retriever.top_k(features, k=args.k, exclude=exclude,
                                  allow=args.allow or None, deny=args.deny or None)
    for row in range(len(ids)):
        label = ", ".join(f"{n}={features[n][row]}" for n in retriever.query_names)
        print(f"# {label}")
        for rank, (cid, score, text) in enumerate(
            zip(ids[row], scores[row], retriever.describe(ids[row])), start=1
        ):
            if cid:
                print(f"{rank:>3}. {cid:<12} {score:8.4f}  {text}")
    return 0


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
        print("# " + ", ".join(f"{n}={v[row]}" for n, v in features.items()))
        ranked = zip(ids[row], scores[row], strict=True)
        for rank, (cid, score) in enumerate(ranked, start=1):
            if cid:
                print(f"{rank:>3}. {cid:<12} {score:8.4f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tfdssm.serving.server import serve  # noqa: PLC0415

    return serve(
        args.export_dir, grpc_port=args.grpc_port, rest_port=args.rest_port,
        host=args.host, poll_seconds=args.poll_seconds,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size, model_config_file=args.model_config_file,
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
    args = build_parser().parse_args(argv)
    with _output(args.verbose, getattr(args, "quiet", False)):
        import tfdssm  # noqa: PLC0415 - sets Keras 2 before TensorFlow loads
        from tfdssm.errors import TfdssmError  # noqa: PLC0415

        handlers = {"train": _train, "evaluate": _evaluate, "query": _query,
                    "tflite": _tflite, "serve": _serve}
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
