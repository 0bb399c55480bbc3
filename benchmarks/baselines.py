"""Baselines run in the same benchmark: the TFRS tutorial model, most-popular."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs


class TfrsTutorial(tfrs.Model):
    """The TFRS basic-retrieval tutorial model: user-id and title embeddings.

    Embedding size 32, a plain ``tfrs.tasks.Retrieval`` (in-batch softmax, no
    temperature), trained with Adagrad 0.1 on batches of 8192 for 3 epochs.
    """

    def __init__(self, user_ids: Sequence[str], titles: Sequence[str], dim: int = 32):
        super().__init__()
        self.user_model = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=list(user_ids), mask_token=None),
            tf.keras.layers.Embedding(len(user_ids) + 1, dim),
        ])
        self.movie_model = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=list(titles), mask_token=None),
            tf.keras.layers.Embedding(len(titles) + 1, dim),
        ])
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features, training=False):
        return self.task(self.user_model(features["user_id"]),
                         self.movie_model(features["title"]), compute_metrics=False)


def train_tfrs_tutorial(train: pd.DataFrame, epochs: int = 3, seed: int = 42
                        ) -> TfrsTutorial:
    """Trains the tutorial model exactly as the tutorial does (bar its metrics)."""
    tf.keras.utils.set_random_seed(seed)
    model = TfrsTutorial(sorted(train["user_id"].unique()),
                         sorted(train["title"].unique()))
    model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    data = tf.data.Dataset.from_tensor_slices(
        {"user_id": train["user_id"].to_numpy(), "title": train["title"].to_numpy()}
    ).shuffle(100_000, seed=seed).batch(8192).cache()
    model.fit(data, epochs=epochs, verbose=0)
    return model


def tfrs_embeddings(model: TfrsTutorial, queries: pd.DataFrame, corpus: pd.DataFrame
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Query (user) and candidate (movie, by title) embeddings."""
    users = model.user_model(tf.constant(queries["user_id"].to_numpy())).numpy()
    movies = model.movie_model(tf.constant(corpus["title"].to_numpy())).numpy()
    return users, movies


def popularity_embeddings(train: pd.DataFrame, queries: pd.DataFrame,
                          corpus: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Most-popular as 1-d embeddings: every query scores a movie by its count."""
    counts = train["movie_id"].value_counts()
    scores = corpus["movie_id"].map(counts).fillna(0).to_numpy(np.float32)
    return np.ones([len(queries), 1], np.float32), scores[:, None]
