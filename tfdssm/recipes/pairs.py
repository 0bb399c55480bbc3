"""The ``pairs`` pipeline: a DSSM on any table of (query, clicked document) rows.

Both towers are the DSSM paper's letter-trigram towers (buckets -> hidden ->
dim), shared by default (one set of weights for queries and documents: the
text benchmark's largest gain, :mod:`tfdssm.recipes.defaults`); separate with
``shared_towers=False`` when queries and documents are different kinds of text.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import pandas as pd

from tfdssm.data import files
from tfdssm.data import readers as data
from tfdssm.data.readers import corpus_of
from tfdssm.errors import ConfigError, DataError, DataWarning
from tfdssm.features import TextFeature
from tfdssm.model.dssm import DSSM
from tfdssm.model.towers import SharedTower, paper_tower
from tfdssm.recipes.defaults import DEFAULTS
from tfdssm.training.run import Prepared, split_frame


def prepare(
    source: str | os.PathLike | pd.DataFrame,
    query_column: str = "query",
    candidate_column: str = "doc",
    candidate_id_column: str | None = None,
    num_buckets: int = 30000,
    hidden: Sequence[int] = (300, 300),
    dim: int = 128,
    activation: str = "tanh",
    max_length: int = DEFAULTS["pairs"]["max_length"],
    word_ngrams: Sequence[int] = (),
    shared_towers: bool = DEFAULTS["pairs"]["shared_towers"],
    loss: str = "in_batch",
    temperature: float | None = None,
    test_fraction: float = 0.1,
    seed: int = 42,
    sep: str | None = None,
    corpus_columns: Sequence[str] = (),
) -> Prepared:
    """Reads the pairs and builds the paper-style model.

    Args:
        source: CSV/TSV/Parquet path or DataFrame with one clicked pair per row,
            or a glob of such files (``"dir/part-*.csv"``): then the training
            rows are streamed from the files, each worker of a multi-worker
            run reading only its own (:mod:`tfdssm.data.files`); the test rows
            are a hashed ``test_fraction`` of each file's rows.
        query_column: Column with the query text.
        candidate_column: Column with the document text.
        candidate_id_column: Column identifying a document (default: its text).
        num_buckets: Trigram hash buckets (paper: 30,000).
        hidden: Hidden sizes (paper: 300, 300).
        dim: Output embedding size (paper: 128).
        activation: Activation of every layer (paper: tanh).
        max_length: Code points kept per text (default 1,024: the benchmark's
            best single change after shared towers).
        word_ngrams: Also hash word unigrams/bigrams, e.g. ``(1, 2)``.
        shared_towers: One tower (same weights) for queries and documents
            (default); ``False`` for two towers.
        loss: ``in_batch`` or ``paper``.
        temperature: Softmax temperature (default: 0.05, cosine towers).
        test_fraction: Rows held out for evaluation.
        seed: Split seed.
        sep: CSV/TSV delimiter (``None``: sniffed from the file's first lines
            among ``,`` tab ``;`` ``|``).
        corpus_columns: More columns the candidate corpus keeps (e.g. the
            restrict columns of a filtered-retrieval export: ``language``);
            like the text, a document must have one value of each.

    Returns:
        A :class:`tfdssm.training.run.Prepared` to pass to
        :func:`tfdssm.training.run.run`.
    """
    if query_column == candidate_column:
        raise ConfigError(
            f"--query-column and --candidate-column are both {query_column!r}; "
            "they must name two different columns."
        )
    what = ("the pairs data" if isinstance(source, pd.DataFrame)
            else f"the pairs data {str(source)!r}")
    needed = list(dict.fromkeys([query_column, candidate_column] + (
        [candidate_id_column] if candidate_id_column else []
    )))
    extra = [c for c in dict.fromkeys(corpus_columns) if c not in needed]
    train_files = None
    if files.is_glob(source):
        if extra:
            raise ConfigError(
                f"corpus columns {extra} (--restrict-columns) are not supported "
                f"with a glob of files ({str(source)!r}); pass one file, or "
                "leave them out.")  # streamed; one pass for the test rows and corpus
        train_files, test, frame = files.scan(
            files.expand(source), needed, test_fraction, seed, what)
        if not train_files.num_rows:
            raise DataError(f"{what} has no training rows (all {len(test)} rows "
                            "were held out); add rows or lower --test-fraction.")
    else:
        frame = data.read_table(source, sep)
    data.check_columns(frame, needed + extra, what)
    data.check_text_columns(frame, needed, what)
    if len(frame) == 0:
        raise DataError(f"{what} has a header but no rows.")
    frame = frame[needed + extra].copy()
    for column in needed:
        frame[column] = frame[column].astype(object).fillna("").astype(str)
    candidate_id = candidate_id_column or candidate_column
    query_feature = TextFeature(query_column)  # names and dtypes for tf.data
    doc_feature = TextFeature(candidate_column)
    kwargs = dict(num_buckets=num_buckets, hidden=hidden, output_dim=dim,
                  activation=activation, max_length=max_length,
                  word_ngrams=tuple(word_ngrams))
    query_tower = paper_tower(query_column, name="query_tower", **kwargs)
    if shared_towers:
        candidate_tower = SharedTower(
            query_tower, {query_column: candidate_column}, name="candidate_tower"
        )
    else:
        candidate_tower = paper_tower(
            candidate_column, name="candidate_tower", **kwargs
        )
    features = [query_feature, doc_feature]
    if candidate_id_column not in (None, query_column, candidate_column):
        features.append(TextFeature(candidate_id_column))  # fed as a raw string
    model = DSSM(
        query_tower, candidate_tower, candidate_id=candidate_id, loss=loss,
        temperature=temperature, remove_accidental_hits=loss == "in_batch",
    )
    if train_files is None:
        train, test = split_frame(frame, test_fraction, seed)
    else:  # the training rows stay in the files
        train = frame.iloc[:0]
        if not len(test):
            warnings.warn("no row was held out for evaluation (too few rows); "
                          "evaluating on the first file's rows.", DataWarning,
                          stacklevel=2)
            test = frame.head(1000)
    corpus = corpus_of(frame, candidate_id, [candidate_column, *extra], what)
    return Prepared(
        model=model, features=features, train=train, test=test, corpus=corpus,
        candidate_id=candidate_id, query_key=None, train_files=train_files,
        info={"pipeline": "pairs", "query_column": query_column,
              "candidate_column": candidate_column,
              "candidate_id_column": candidate_id_column,
              "num_buckets": num_buckets, "hidden": list(hidden), "dim": dim,
              "activation": activation, "shared_towers": shared_towers,
              "word_ngrams": list(word_ngrams), "max_length": max_length},
    )
