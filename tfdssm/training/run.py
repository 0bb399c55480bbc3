"""One training run: fit a prepared pipeline, evaluate it, export it.

Pipelines (:mod:`tfdssm.recipes`) turn a data source into a :class:`Prepared`
(model, feature columns, train/test split, candidate corpus); this module runs it
the same way for all of them, from the CLI or a notebook.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import logging
import os
import pathlib
import shutil
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfdssm.data import files
from tfdssm.data import hash_cache as hash_cache_lib
from tfdssm.data import readers as data
from tfdssm.errors import ConfigError, DataWarning, ExportError
from tfdssm.export import layout, tokens
from tfdssm.export import savedmodel as export
from tfdssm.features import Feature
from tfdssm.model import optimizers
from tfdssm.model.dssm import DSSM
from tfdssm.training import checkpoints, distribute, parameter_server
from tfdssm.training import metrics as metrics_lib
from tfdssm.training.early_stopping import RetrievalEarlyStopping
from tfdssm.training.evaluation import evaluate_frame, features_of
from tfdssm.training.negatives import ROW_INDEX, HardNegatives

logger = logging.getLogger("tfdssm")

HASH_CACHE_DIR = "hash_cache"  # under the checkpoint dir: ids for --resume
EARLY_STOPPING_DIR = "early_stopping"  # under the checkpoint dir: for --resume
VALIDATION_CANDIDATES = 50_000  # corpus sample for each epoch's validation


@dataclasses.dataclass
class Prepared:
    """Everything a training run needs, built by a pipeline.

    Attributes:
        model: The (untrained) model.
        features: Specs of every column the model reads.
        train: Training rows (one interaction each).
        test: Held-out rows for evaluation.
        corpus: One row per candidate (the candidate tower's columns + id).
        candidate_id: Column identifying a candidate in all three tables.
        query_key: Column grouping rows of the same query (e.g. ``user_id``) to
            exclude a query's training candidates at evaluation, or ``None``.
        info: Pipeline name and parameters, recorded in ``export.json``.
        train_files: The training rows as files streamed by ``tf.data``
            (:mod:`tfdssm.data.files`; ``train`` is then empty), or ``None``.
    """

    model: DSSM
    features: list[Feature]
    train: pd.DataFrame
    test: pd.DataFrame
    corpus: pd.DataFrame
    candidate_id: str
    query_key: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_files: files.TrainFiles | None = None


def split_frame(
    frame: pd.DataFrame, test_fraction: float, seed: int = 42
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random row split (TFRS protocol: shuffle with seed 42, then cut).

    Tiny tables (< 10 rows) are evaluated on their training rows, with a warning.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), received {test_fraction}.")
    order = np.random.default_rng(seed).permutation(len(frame))
    num_test = int(round(len(frame) * test_fraction))
    if len(frame) < 10 or num_test == 0:
        warnings.warn("too few rows to hold out a test split; evaluating on the "
                      "training rows.", DataWarning, stacklevel=2)
        return frame, frame
    test = frame.iloc[order[:num_test]].reset_index(drop=True)
    train = frame.iloc[order[num_test:]].reset_index(drop=True)
    return train, test


def _run(
    prepared: Prepared,
    export_dir: str | os.PathLike | None,
    epochs: int = 3,
    batch_size: int = 1024,
    learning_rate: float = 0.003,
    tensorboard_dir: str | None = None,
    callbacks: Sequence[tf.keras.callbacks.Callback] = (),
    verbose: int = 1,
    seed: int = 0,
    max_k: int = 100,
    strategy: tf.distribute.Strategy | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    patience: int | None = None,
    validation_fraction: float = 0.05,
    hybrid: bool = False,
    hard_negatives: str | None = None,
    hard_negatives_every: int = 1,
    hard_negatives_per_row: int = 1,
    hash_cache: bool = True,
    restrict_columns: Sequence[str] = (),
) -> dict[str, Any]:
    """Fits, evaluates and (optionally) exports a prepared pipeline.

    Args:
        prepared: Output of a pipeline's ``prepare``.
        export_dir: Where to export; ``None`` to skip the export.
        epochs: Passes over the training rows.
        batch_size: Rows per step (also the number of in-batch negatives).
        learning_rate: Adam learning rate.
        tensorboard_dir: Write TensorBoard logs there.
        callbacks: Extra Keras callbacks.
        verbose: Keras progress output (0 silent, 1 progress bar, 2 one line).
        seed: Seed for weights and shuffling.
        max_k: Largest ``k`` the exported retrieval models accept per request.
        strategy: A ``tf.distribute`` strategy (:mod:`tfdssm.training.distribute`); the
            model must have been built inside its ``scope()``. Default: the
            current one. With several replicas ``batch_size`` is the global
            batch (each replica's in-batch negatives are its share of it), the
            last partial batch is dropped and the input is sharded by data; only
            the chief exports. Under a parameter-server strategy
            (:mod:`tfdssm.training.parameter_server`) an epoch is
            ``len(train rows) // batch_size`` asynchronous steps, and an
            unsharded copy of the trained model is evaluated and exported.
        checkpoint_dir: Back up model and optimizer there after every epoch
            (:mod:`tfdssm.training.checkpoints`); removed when training finishes.
        resume: Continue a run that was killed from its backup in
            ``checkpoint_dir`` (the same parameters are required).
        patience: Early stopping: hold out ``validation_fraction`` of the
            training rows, score them after every epoch (Recall@10 and MRR@10
            over the corpus), stop after ``patience`` epochs without
            improvement and keep the best epoch's weights (``epochs`` is then
            the maximum; :mod:`tfdssm.training.early_stopping`). ``None``: train all
            ``epochs``.
        validation_fraction: Training rows held out for early stopping and for
            choosing the hybrid fusion weight (used when either is on).
        hybrid: Export retrieval models that fuse the dense score with BM25
            over the candidates' text (:mod:`tfdssm.export.hybrid`).
        hard_negatives: ``None``, ``"bm25"`` (BM25 of each training query's
            text against the training documents, mined once before training)
            or ``"self"`` (the towers' own top-scoring documents, re-mined
            every ``hard_negatives_every`` epochs; ANCE-style). Each training
            row's mined negatives join the batch's candidates; the positive
            and documents sharing its id are never mined
            (:mod:`tfdssm.training.negatives`). Not with ``candidate_probabilities``.
        hard_negatives_every: ``"self"``: re-mine after every N epochs.
        hard_negatives_per_row: Hard negatives added per training row.
        hash_cache: Hash each text column once and train on the ids
            (:mod:`tfdssm.data.hash_cache`; kept in ``checkpoint_dir`` too, so
            ``resume`` does not hash again); ``False`` hashes in every step.
            Either way the weights and the exported models are the same.
        restrict_columns: Corpus columns whose values the exported candidates
            carry as restrict tokens, for filtered retrieval (``top_k_filter``;
            :mod:`tfdssm.export.tokens`).

    Returns:
        ``{"metrics": ..., "history": ..., "export": export.json content or None}``
        (``export`` is ``None`` on non-chief workers).
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, received {epochs}.")
    tf.keras.utils.set_random_seed(seed)
    model = prepared.model
    strategy = strategy or tf.distribute.get_strategy()
    streamed = prepared.train_files
    num_train = len(prepared.train) if streamed is None else streamed.num_rows
    replicas = _check_strategy(model, strategy, batch_size, num_train)
    if streamed is not None:
        _check_streamed(patience, hybrid, hard_negatives)
    with strategy.scope():
        model.compile(optimizer=optimizers.Adam(learning_rate))
    train_rows, validation = prepared.train, None
    if patience is not None or hybrid:
        train_rows, validation = validation_split(prepared.train,
                                                  validation_fraction, seed)
    if streamed is None:
        num_train = len(train_rows)
    ps = distribute.is_parameter_server(strategy)
    if ps and hard_negatives is not None:
        raise ConfigError(
            "hard negatives are not supported with a parameter-server strategy "
            "(each worker would need the miner's tables); pass hard_negatives=None "
            "(--hard-negatives none).")
    miner = _hard_negatives(prepared, train_rows, hard_negatives, replicas,
                            hard_negatives_every, hard_negatives_per_row)
    row_index = None if miner is None else ROW_INDEX
    fit_args: dict[str, Any] = {}
    cached, cache = _hash_cache(prepared, train_rows,
                                hash_cache and streamed is None and not ps,
                                checkpoint_dir, verbose)
    if ps:  # every worker streams its own shuffled, repeated copy
        dataset, fit_args["steps_per_epoch"] = parameter_server_input(
            streamed if streamed is not None else train_rows, prepared.features,
            batch_size, seed)
    elif streamed is not None:  # each worker reads its own files
        dataset, steps = _streamed_input(streamed, prepared.features, batch_size,
                                         seed, strategy)
        if steps is not None:
            fit_args["steps_per_epoch"] = steps
    elif cached:
        dataset = hash_cache_lib.make_cached_dataset(
            train_rows, prepared.features, cached, cache, batch_size, seed=seed,
            drop_remainder=replicas > 1, row_index=row_index,
            candidate_id=model.candidate_id)
    else:
        dataset = data.make_dataset(
            train_rows, prepared.features, batch_size, seed=seed,
            drop_remainder=replicas > 1, row_index=row_index)
    if miner is not None:
        if cached:
            miner.columns = cache.columns(miner.columns, cached, model.candidate_id)
        dataset = miner.attach(dataset)
    if replicas > 1 and streamed is None:
        dataset = distribute.shard_by_data(dataset)
    all_callbacks = list(callbacks) + ([miner] if miner is not None else [])
    stopper = None
    if patience is not None:
        stopper = RetrievalEarlyStopping(
            _validation_scorer(prepared, validation, seed), patience=patience,
            state_dir=(None if checkpoint_dir is None
                       else pathlib.Path(checkpoint_dir) / EARLY_STOPPING_DIR),
            write_state=distribute.is_chief(strategy))
        all_callbacks.append(stopper)
    saver = None
    if checkpoint_dir is not None:
        run_params = {**prepared.info, "batch_size": batch_size, "seed": seed,
                      "learning_rate": learning_rate, "replicas": replicas,
                      "train_rows": num_train, "epochs": epochs,
                      "patience": patience}
        saver = checkpoints.backup(checkpoint_dir, run_params, resume,
                                   chief=distribute.is_chief(strategy))
        all_callbacks.append(saver)
    elif resume:
        raise ConfigError("resume=True needs the checkpoint_dir of the run to "
                          "continue.")
    if tensorboard_dir:
        all_callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=tensorboard_dir))
    start = time.perf_counter()
    history = model.fit(dataset, epochs=epochs, verbose=verbose,
                        callbacks=all_callbacks, **fit_args)
    seconds = time.perf_counter() - start
    if checkpoint_dir is not None:
        shutil.rmtree(pathlib.Path(checkpoint_dir) / HASH_CACHE_DIR, ignore_errors=True)
    sharded = []
    if ps:  # evaluate and export an unsharded copy, as after any other run
        sharded = parameter_server.sharded_variables(model)
        model = parameter_server.unsharded_copy(model, data.to_feature_arrays(
            (prepared.test if streamed is not None else train_rows).head(2),
            prepared.features))
    if saver is not None:
        checkpoints.finish(checkpoint_dir, chief=distribute.is_chief(strategy))
    if verbose:
        ran = len(history.history.get("loss", [])) or epochs
        rate = num_train * ran / max(seconds, 1e-9)
        logger.info("trained %d epoch(s) on %d rows in %.1fs (%s rows/s)", ran,
                    num_train, seconds, f"{rate:,.0f}")
        if stopper is not None and stopper.best_epoch is not None:
            logger.info("kept epoch %d of %d (best validation Recall@10 + MRR@10 "
                        "on %d rows)", stopper.best_epoch + 1, ran, len(validation))
    metrics = evaluate_frame(
        model.query_tower, model.candidate_tower, prepared.test, prepared.corpus,
        prepared.candidate_id, features_of(model.query_tower, prepared.features),
        features_of(model.candidate_tower, prepared.features),
        train=prepared.train, query_key=prepared.query_key,
    )
    info = None
    if export_dir is not None:
        training = {
            **prepared.info, "epochs": epochs, "batch_size": batch_size,
            "learning_rate": learning_rate, "train_rows": num_train,
            **({"train_files": len(streamed.files)} if streamed is not None else {}),
            "validation_rows": 0 if validation is None else len(validation),
            "test_rows": len(prepared.test), "train_seconds": round(seconds, 2),
            "strategy": type(strategy).__name__, "replicas": replicas,
            "workers": distribute.num_workers(strategy),
            "loss_history": [float(x) for x in history.history.get("loss", [])],
            **({"resumed_at_epoch": saver.first_epoch + 1}
               if saver is not None and saver.first_epoch else {}),
            **({"early_stopping": stopper.summary()} if stopper is not None else {}),
            **({"hard_negatives": miner.describe()} if miner is not None else {}),
            **({"parameter_servers": {
                "steps_per_epoch": fit_args["steps_per_epoch"],
                "sharded_variables": sharded}} if ps else {}),
        }
        with distribute.write_dir(export_dir, strategy) as target:
            info = export.export_model(
                model, target, corpus=prepared.corpus, metrics=metrics,
                training=training, max_k=max_k, hybrid=hybrid, validation=validation,
                restrict_columns=restrict_columns,
            )
        if not distribute.is_chief(strategy):
            info = None
        elif hybrid and info.get("hybrid"):
            metrics["hybrid"] = served_metrics(export_dir, prepared)
            info = {**info, "metrics": metrics}
            export.write_json_atomic(os.path.join(export_dir, export.EXPORT_JSON), info)
    return {
        "metrics": metrics,
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
        "export": info,
    }


def _check_streamed(patience: int | None, hybrid: bool,
                    hard_negatives: str | None) -> None:
    """Refuses what needs the training rows in memory when they are streamed."""
    options = (("early stopping (patience)", patience is not None),
               ("the hybrid export", hybrid),
               ("hard negatives", hard_negatives is not None))
    asked = [name for name, on in options if on]
    if asked:
        raise ConfigError(
            f"{', '.join(asked)} need(s) the training rows in memory, but they are "
            "streamed from files (a glob as --data); pass --patience 0 --no-hybrid "
            "--hard-negatives none, or one file.")


def _streamed_input(
    source: files.TrainFiles, features: Sequence[Feature], batch_size: int,
    seed: int, strategy: tf.distribute.Strategy,
) -> Any:
    """Training input read from files, and the steps per epoch (``None``: a
    pass over the files).

    Each worker of a multi-worker strategy reads its own files and takes the
    same number of steps per epoch (that of the worker with the most rows at
    ``batch_size / replicas`` rows a replica; workers with fewer rows take
    smaller batches), so that every row is read once per epoch.
    """
    workers = distribute.num_workers(strategy)
    if workers <= 1:
        return files.train_dataset(source, features, batch_size, seed=seed), None
    replicas = int(strategy.num_replicas_in_sync)
    local = max(1, replicas // workers)
    steps = files.equal_steps(source, workers, max(1, batch_size // replicas) * local)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return files.train_dataset(
            source, features, batch_size, seed=seed,
            num_shards=context.num_input_pipelines, index=context.input_pipeline_id,
            num_batches=steps * local)

    return strategy.distribute_datasets_from_function(dataset_fn), steps


def parameter_server_input(
    rows: pd.DataFrame | files.TrainFiles, features: Sequence[Feature],
    batch_size: int, seed: int,
) -> tuple[Any, int]:
    """The input of a parameter-server run: a ``DatasetCreator`` (every worker
    builds a shuffled, repeated copy of ``rows``, in batches of
    ``batch_size``) and the steps of one epoch (training rows // ``batch_size``).

    Args:
        rows: The training rows, or the files holding them (CSV/TSV: workers
            read them with ``tf.data``'s CSV reader, so every worker must see
            the same paths).

    Raises:
        ConfigError: fewer rows than one batch, or Parquet files.
    """
    count = rows.num_rows if isinstance(rows, files.TrainFiles) else len(rows)
    steps = count // batch_size
    if steps < 1:
        raise ConfigError(
            f"a parameter-server epoch is training rows // batch_size steps; the "
            f"{count} training rows fill no batch of {batch_size}. Lower "
            "--batch-size.")
    if isinstance(rows, files.TrainFiles):
        if not rows.files[0].lower().endswith((".csv", ".tsv")):
            raise ConfigError(
                "parameter-server workers read training files with tf.data's CSV "
                f"reader; {rows.files[0]!r} is not CSV/TSV. Convert the files to "
                "CSV or pass one file.")

        def stream(context: tf.distribute.InputContext) -> tf.data.Dataset:
            return files.train_dataset(
                rows, features, context.get_per_replica_batch_size(batch_size),
                seed=seed, repeat=True)

        return tf.keras.utils.experimental.DatasetCreator(stream), steps
    arrays = data.to_feature_arrays(rows, features)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        dataset = tf.data.Dataset.from_tensor_slices(arrays)
        return (dataset.shuffle(min(len(rows), 100_000), seed=seed,
                                reshuffle_each_iteration=True)
                .repeat()
                .batch(context.get_per_replica_batch_size(batch_size),
                       drop_remainder=True)
                .prefetch(tf.data.AUTOTUNE))

    return tf.keras.utils.experimental.DatasetCreator(dataset_fn), steps


# Lower bound on the memory one text code point of one row costs in a training
# step (int32 code point + int64 trigram id + float32 weight and gradient).
_BYTES_PER_CODE_POINT = 24


@functools.wraps(_run)
def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
    # Checks the arguments and the export dir first; turns I/O failures (disk
    # full, read-only, permissions) into one ExportError, leaving nothing this
    # run created behind (export dir, EXPORT_DIR/.checkpoints).
    bound = inspect.signature(_run).bind(*args, **kwargs)
    bound.apply_defaults()
    params = bound.arguments
    export_dir, checkpoint_dir = params["export_dir"], params["checkpoint_dir"]
    _check_memory(params["prepared"], params["batch_size"])
    if params["restrict_columns"]:  # before training, not after
        corpus = getattr(params["prepared"], "corpus", None)
        tokens.check_columns(params["restrict_columns"],
                             [] if corpus is None else corpus.columns)
    if export_dir is not None:
        layout.check_export_dir(export_dir)
    created = [pathlib.Path(d) for d in (export_dir, checkpoint_dir)
               if d is not None and not os.path.exists(d)]
    try:
        return _run(*bound.args, **bound.kwargs)
    except (OSError, tf.errors.ResourceExhaustedError,
            tf.errors.PermissionDeniedError) as error:
        kept = _clean_up(created, checkpoint_dir)
        raise ExportError(_io_message(error, export_dir) + kept) from None
    except Exception:
        _clean_up(created, checkpoint_dir)
        raise


def _clean_up(created: list[pathlib.Path], checkpoint_dir: Any) -> str:
    """Removes the directories a failed run created, unless they hold the backup
    of a finished epoch (then says how to resume from it)."""
    if checkpoint_dir is not None and checkpoints.has_backup(checkpoint_dir):
        return (f" The backup of the last finished epoch is kept in "
                f"{str(checkpoint_dir)!r}: re-run with --resume to continue.")
    for path in created:
        shutil.rmtree(path, ignore_errors=True)
    return ""


def _io_message(error: BaseException, export_dir: Any) -> str:
    number = getattr(error, "errno", None)
    text = str(getattr(error, "message", "") or error).strip().splitlines()
    detail = (text[0] if text else type(error).__name__)[:200]
    where = f" (export dir {str(export_dir)!r})" if export_dir is not None else ""
    if number == errno.ENOSPC or "space left" in detail.lower():
        return (f"the disk filled up while training or exporting{where}: {detail}. "
                "Free space or pass an --export-dir on a larger disk; nothing was "
                "exported.")
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return (f"out of memory while training{where}: {detail}. Lower --batch-size "
                "or --max-length.")
    if number in (errno.EACCES, errno.EPERM, errno.EROFS) or isinstance(
            error, tf.errors.PermissionDeniedError):
        return (f"cannot write{where}: {detail}. Pass a writable --export-dir; "
                "nothing was exported.")
    return f"training or exporting failed{where}: {detail}; nothing was exported."


def _check_memory(prepared: Any, batch_size: int) -> None:
    """Refuses ``batch_size`` x ``max_length`` that cannot fit in this machine's
    available memory (texts are padded to ``max_length``)."""
    model = getattr(prepared, "model", None)
    towers = [getattr(model, side, None) for side in ("query_tower", "candidate_tower")]
    points = sum(int(getattr(f, "max_length", 0) or 0)
                 for tower in towers for f in getattr(tower, "features", ()) or ())
    need = points * int(batch_size) * _BYTES_PER_CODE_POINT
    have = _available_memory()
    if have and need > have:
        raise ConfigError(
            f"batch size {batch_size} x {points:,} code points per row (max_length of "
            f"the towers' text features) needs at least {need / 2**30:.1f} GiB per "
            f"training step; this machine has {have / 2**30:.1f} GiB available. Lower "
            "--max-length (e.g. 1024) or --batch-size.")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def served_metrics(
    export_dir: str | os.PathLike, prepared: Prepared,
    model: str = "retrieval_brute_force",
) -> dict[str, float]:
    """Recall@1/10/100 and MRR of an exported retrieval model on the test rows.

    What a client of the served model gets (for a hybrid export, the fused
    ranking), unlike the towers' metrics, which score by the dense embedding
    alone.
    """
    entry = layout.read_export(export_dir)[model]  # the version just exported
    loaded = tf.saved_model.load(os.path.join(export_dir, entry["path"]))
    names = list(loaded.signatures["top_k"].structured_input_signature[1])
    specs = [f for f in prepared.features if f.name in names and f.name != "k"]
    arrays = data.to_feature_arrays(prepared.test, specs, "the test rows")
    max_k = entry["max_k"]
    ks = [k for k in (1, 10, 100) if k <= max_k] or [max_k]
    return metrics_lib.retrieval_metrics(
        loaded.signatures["top_k"], arrays,
        prepared.test[prepared.candidate_id].astype(str).tolist(), ks=ks)


def _hard_negatives(
    prepared: Prepared, train_rows: pd.DataFrame, mode: str | None, replicas: int,
    every: int, per_row: int,
) -> HardNegatives | None:
    """The hard-negative miner of a run (``None`` without hard negatives)."""
    if mode is None:
        return None
    model = prepared.model
    if model.loss_name == "paper":
        raise ConfigError("loss='paper' draws its own random negatives; it cannot "
                          "take hard negatives.")
    if model._probabilities is not None:
        raise ConfigError(
            "hard negatives cannot be combined with candidate_probabilities (logQ "
            "correction): mined candidates have no sampling probability. Build "
            "the model without candidate_probabilities or pass hard_negatives=None.")
    if replicas > 1:
        raise ConfigError("hard negatives are not supported with several replicas "
                          "yet; train on one device or pass hard_negatives=None.")
    return HardNegatives(mode, model, train_rows, prepared.corpus,
                         prepared.features, prepared.candidate_id,
                         per_row=per_row, every=every)


def _hash_cache(
    prepared: Prepared, train_rows: pd.DataFrame, enabled: bool,
    checkpoint_dir: str | os.PathLike | None, verbose: int,
) -> tuple[dict[str, Any], hash_cache_lib.HashCache | None]:
    """The text columns a run feeds as cached ids, and their cache (``{}`` and
    ``None``: hash in-graph)."""
    if not enabled:
        return {}, None
    layers = hash_cache_lib.cacheable_columns(prepared.model)
    if not layers:
        return {}, None
    need = hash_cache_lib.estimated_bytes(
        layers, {n: train_rows[n].astype(str).to_numpy() for n in layers})
    have = _available_memory()
    if have and need > hash_cache_lib.MEMORY_FRACTION * have:
        logger.info("hashing in every step: the cached ids of %s would take %.1f "
                    "GiB of the %.1f GiB available", sorted(layers), need / 2**30,
                    have / 2**30)
        return {}, None
    directory = (None if checkpoint_dir is None
                 else pathlib.Path(checkpoint_dir) / HASH_CACHE_DIR)
    if verbose:
        logger.info("hashing %s once for all epochs (about %.1f MiB of ids)",
                    sorted(layers), need / 2**20)
    return layers, hash_cache_lib.HashCache(directory)


def validation_split(
    train: pd.DataFrame, fraction: float, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Holds out ``fraction`` of the training rows (at least 1, at most half).

    Raises:
        ConfigError: ``fraction`` outside ``(0, 0.5]``, or fewer than 2 rows.
    """
    if not 0.0 < fraction <= 0.5:
        raise ConfigError(
            f"validation_fraction must be in (0, 0.5], received {fraction}.")
    if len(train) < 2:
        raise ConfigError(
            f"early stopping and hybrid weight tuning hold out validation rows, "
            f"but there are only {len(train)} training row(s); add data or turn "
            "both off.")
    order = np.random.default_rng([seed, 7]).permutation(len(train))
    count = min(max(1, int(round(len(train) * fraction))), len(train) // 2)
    return (train.iloc[order[count:]].reset_index(drop=True),
            train.iloc[order[:count]].reset_index(drop=True))


def _validation_scorer(
    prepared: Prepared, validation: pd.DataFrame, seed: int,
    max_candidates: int = VALIDATION_CANDIDATES,
) -> Any:
    """``model -> metrics`` on the validation rows, over the corpus (or, for a
    corpus above ``max_candidates``, the validation positives plus a random
    sample of the rest, so that an epoch's check stays cheap)."""
    corpus = prepared.corpus
    if len(corpus) > max_candidates:
        ids = corpus[prepared.candidate_id].astype(str)
        needed = ids.isin(set(validation[prepared.candidate_id].astype(str)))
        rest = np.flatnonzero(~needed.to_numpy())
        keep = max(0, max_candidates - int(needed.sum()))
        rng = np.random.default_rng([seed, 11])
        chosen = np.sort(np.concatenate([np.flatnonzero(needed.to_numpy()),
                                         rng.choice(rest, min(keep, len(rest)),
                                                    replace=False)]))
        corpus = corpus.iloc[chosen].reset_index(drop=True)

    def score(model: DSSM) -> dict[str, float]:
        return evaluate_frame(
            model.query_tower, model.candidate_tower, validation, corpus,
            prepared.candidate_id,
            features_of(model.query_tower, prepared.features),
            features_of(model.candidate_tower, prepared.features),
            ks=(10,),
        )

    return score


def _check_strategy(
    model: DSSM, strategy: tf.distribute.Strategy, batch_size: int, rows: int
) -> int:
    """Checks the model belongs to ``strategy`` and the batches fill every
    replica; returns the number of replicas."""
    built_under = getattr(model, "_distribution_strategy", None)
    default = (not tf.distribute.has_strategy()
               and strategy is tf.distribute.get_strategy())
    if built_under is not strategy and not (built_under is None and default):
        where = type(built_under).__name__ if built_under else "no strategy"
        raise ConfigError(
            f"the model was built under {where} but is trained with "
            f"{type(strategy).__name__}. Build it inside the strategy's scope: "
            "`with strategy.scope(): prepared = pairs.prepare(...)`, then "
            "`train.run(prepared, ..., strategy=strategy)`."
        )
    replicas = int(strategy.num_replicas_in_sync)
    if replicas > 1 and not replicas <= batch_size <= rows:
        raise ConfigError(
            f"with {replicas} replicas the global batch size must be at least "
            f"{replicas} and at most the {rows} training rows (partial batches are "
            f"dropped so that every worker runs the same steps); received "
            f"batch_size={batch_size}. Pass a batch size in that range."
        )
    return replicas


