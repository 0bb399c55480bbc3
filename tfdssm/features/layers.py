"""Keras layers that turn one raw feature column into a dense vector.

Every layer takes a batch-major ``[batch]`` tensor straight from ``tf.data`` or a
serving request and returns float32 ``[batch, output_dim]``. All are
Keras-serialisable (``get_config``/``from_config``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from tfdssm.errors import ConfigError
from tfdssm.text.hashing import hashing_info, trigram_ids, word_ngram_ids
from tfdssm.text.normalize import TextNormalizer

COMBINERS = ("sum", "mean", "sqrtn")


def _check_combiner(combiner: str) -> None:
    if combiner not in COMBINERS:
        raise ConfigError(
            f"combiner must be one of {COMBINERS}, received {combiner!r}."
        )


def _check_vocabulary(vocabulary: Sequence[str], output_dim: int) -> list[str]:
    values = [str(v) for v in vocabulary]
    if not values:
        raise ConfigError("vocabulary is empty; pass at least one value.")
    if len(set(values)) != len(values):
        raise ConfigError("vocabulary has duplicate values; pass unique values.")
    if int(output_dim) < 1:
        raise ConfigError(f"output_dim must be positive, received {output_dim}.")
    return values


def combine(total: tf.Tensor, count: tf.Tensor, combiner: str) -> tf.Tensor:
    """Scales a bag sum ``[batch, dim]`` by ``count`` ``[batch, 1]``."""
    if combiner == "sum":
        return total
    count = tf.maximum(count, 1.0)
    return total / (count if combiner == "mean" else tf.sqrt(count))


def _bag_sum(table: tf.Variable, ids: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Sums the rows of ``table`` named by the valid ``ids`` of each example.

    Args:
        table: float ``[num_buckets, dim]``.
        ids: int ``[batch, length]``.
        valid: bool ``[batch, length]``; ``False`` positions are skipped.

    Returns:
        float ``[batch, dim]``; rows with no valid id are zero.
    """
    positions = tf.where(valid)
    return bag_sum_flat(table, tf.gather_nd(ids, positions),
                        tf.cast(positions[:, 0], tf.int32), tf.shape(ids)[0])


def bag_sum_flat(table: tf.Variable, ids: tf.Tensor, examples: tf.Tensor,
                 batch: tf.Tensor) -> tf.Tensor:
    """Sums the rows of ``table`` named by ``ids`` into their examples' bags.

    Gathers each distinct id once and sums with one fused sparse segment sum,
    so the gradient is an ``IndexedSlices`` with one row per distinct id in the
    batch, not one per trigram occurrence (a batch of 1,024 docstrings: 157k
    occurrences, 5.5k distinct ids). The backward pass is the same fused sum
    over the transposed mapping (TF's own gradient of the segment sum is a
    slower single-threaded scatter): 2x faster on 2 cores.

    Args:
        table: float ``[num_buckets, dim]``.
        ids: int ``[n]`` bucket ids of every bag, bag after bag.
        examples: int32 ``[n]`` the bag (row) of each id, sorted ascending.
        batch: int32 scalar, the number of bags.

    Returns:
        float ``[batch, dim]``; bags with no id are zero.
    """
    distinct, index = tf.unique(ids, out_idx=tf.int32)

    @tf.custom_gradient
    def segment_sum(rows: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        def grad(upstream: tf.Tensor) -> tf.Tensor:
            order = tf.argsort(index, stable=True)
            return tf.sparse.segment_sum(
                upstream, tf.gather(examples, order), tf.gather(index, order),
                num_segments=tf.shape(rows)[0])

        return tf.sparse.segment_sum(rows, index, examples, num_segments=batch), grad

    return segment_sum(_rows(table, distinct))


def _rows(table: tf.Variable, ids: tf.Tensor) -> tf.Tensor:
    """``tf.gather(table, ids)``; a table split across parameter servers
    (``ShardedVariable``) gathers on each shard, never joining the table.

    Elsewhere gathers from the table's value (a read that shares its
    buffer), not from the variable itself: a gather on a resource variable
    (``ResourceGather``) switches it to copy-on-read for good, after which
    every dense update (the fused Adam kernel) first copies the whole table
    (30k x 300: +23 ms CPU a step, measured). Under a parameter server
    strategy an unsharded table still gathers on its server (rows, not the
    table, cross the network).
    """
    if isinstance(table, tf.__internal__.distribute.ShardedVariable):
        return tf.nn.embedding_lookup(table, ids)
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        return tf.gather(table, ids)
    return tf.gather(tf.convert_to_tensor(table), ids)


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class TextEmbedding(tf.keras.layers.Layer):
    """Raw strings -> letter-trigram bag of embeddings (the DSSM word hashing).

    Equivalent to a sparse count vector of trigram buckets times a
    ``[num_buckets, output_dim]`` matrix, as in the paper's first layer.

    Args:
        num_buckets: Hash buckets (paper: 30,000).
        output_dim: Embedding size.
        max_length: Code points kept per text (longer text is truncated).
        combiner: ``sum`` (paper: raw counts), ``mean`` or ``sqrtn``.
        word_ngrams: Also hash word unigrams (1) and/or bigrams (2) into the
            same buckets, e.g. ``(1, 2)``.

    Call args:
        inputs: string ``[batch]`` (raw text, hashed in-graph), or the ids
            :meth:`hash_ids` made of it: int32 ragged ``[batch, None]`` (a
            training pipeline's hash cache, :mod:`tfdssm.data.hash_cache`).
            Both give the same output.

    Returns:
        float32 ``[batch, output_dim]``; empty text gives zeros.

    >>> layer = TextEmbedding(num_buckets=1000, output_dim=4)
    >>> layer(tf.constant(["good", ""])).shape
    TensorShape([2, 4])
    >>> text = tf.constant(["good"])
    >>> bool(tf.reduce_all(layer(layer.hash_ids(text)) == layer(text)))
    True
    """

    def __init__(
        self,
        num_buckets: int = 30000,
        output_dim: int = 300,
        max_length: int = 256,
        combiner: str = "sum",
        word_ngrams: Sequence[int] = (),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        word_ngrams = tuple(sorted(set(int(n) for n in word_ngrams)))
        if not set(word_ngrams) <= {1, 2}:
            raise ConfigError(
                f"word_ngrams may contain 1 and 2 only, received {word_ngrams}."
            )
        self.word_ngrams = word_ngrams
        if num_buckets < 1 or output_dim < 1 or max_length < 1:
            raise ConfigError(
                "num_buckets, output_dim and max_length must be positive, received "
                f"{num_buckets}, {output_dim}, {max_length}."
            )
        _check_combiner(combiner)
        self.num_buckets = int(num_buckets)
        self.output_dim = int(output_dim)
        self.max_length = int(max_length)
        self.combiner = combiner
        self.normalizer = TextNormalizer()
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=[self.num_buckets, self.output_dim],
            initializer=tf.keras.initializers.RandomNormal(stddev=0.05),
        )

    def call(self, inputs: tf.Tensor | tf.RaggedTensor) -> tf.Tensor:
        if isinstance(inputs, tf.RaggedTensor):
            return self.embed_ids(inputs)
        inputs = tf.reshape(inputs, [-1])
        return self.embed_code_points(self.normalizer(inputs, self.max_length))

    def hashing_config(self) -> dict:
        """What :meth:`hash_ids` depends on (not the weights): equal configs
        give equal ids."""
        return {"num_buckets": self.num_buckets, "max_length": self.max_length,
                "word_ngrams": list(self.word_ngrams), **hashing_info()}

    def hash_ids(self, inputs: tf.Tensor) -> tf.RaggedTensor:
        """Raw text -> the bucket ids its bag sums (the string and integer
        stages of hashing, without the embedding).

        Args:
            inputs: string ``[batch]``.

        Returns:
            int32 ragged ``[batch, None]``: each text's trigram ids in text
            order, then its word n-gram ids; :meth:`call` on it equals
            :meth:`call` on ``inputs``.
        """
        code_points = self.normalizer(tf.reshape(inputs, [-1]), self.max_length)
        ids, valid = self._ids(code_points)
        return tf.ragged.boolean_mask(ids, valid)

    def embed_ids(self, ids: tf.RaggedTensor) -> tf.Tensor:
        """Embeds the ids :meth:`hash_ids` made.

        Args:
            ids: int32 ragged ``[batch, None]``.

        Returns:
            float32 ``[batch, output_dim]``.
        """
        count = tf.cast(ids.row_lengths(), tf.float32)[:, tf.newaxis]
        total = bag_sum_flat(self.embeddings, ids.flat_values,
                             tf.cast(ids.value_rowids(), tf.int32), ids.nrows(tf.int32))
        return combine(total, count, self.combiner)

    def _ids(self, code_points: tf.Tensor, dense: bool = False
             ) -> tuple[tf.Tensor, tf.Tensor]:
        """``(ids, valid)`` int32 and bool ``[batch, width]`` of code points."""
        ids, valid = trigram_ids(code_points, self.num_buckets)
        if self.word_ngrams:
            word_ids, word_valid = word_ngram_ids(
                code_points, self.num_buckets, self.word_ngrams, dense=dense
            )
            ids = tf.concat([ids, word_ids], axis=1)
            valid = tf.concat([valid, word_valid], axis=1)
        return ids, valid

    def embed_code_points(
        self, code_points: tf.Tensor, dense: bool = False
    ) -> tf.Tensor:
        """Embeds normalised code points (the part a TFLite model runs).

        Args:
            code_points: int32 ``[batch, max_length]``.
            dense: Gather every position and mask (static shapes, TFLite
                builtins) instead of gathering only valid trigrams (faster).

        Returns:
            float32 ``[batch, output_dim]``.
        """
        ids, valid = self._ids(code_points, dense)
        count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1, keepdims=True)
        if dense:
            vectors = tf.gather(self.embeddings, ids)
            weights = tf.cast(valid, vectors.dtype)[:, :, tf.newaxis]
            total = tf.reduce_sum(vectors * weights, axis=1)
        else:
            total = _bag_sum(self.embeddings, ids, valid)
        return combine(total, count, self.combiner)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_buckets=self.num_buckets,
            output_dim=self.output_dim,
            max_length=self.max_length,
            combiner=self.combiner,
            word_ngrams=list(self.word_ngrams),
        )
        return config


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class CategoricalEmbedding(tf.keras.layers.Layer):
    """String ids -> embeddings through a fixed vocabulary (one OOV row).

    Args:
        vocabulary: The known values; anything else maps to the OOV row.
        output_dim: Embedding size.

    Call args:
        inputs: string ``[batch]``.

    Returns:
        float32 ``[batch, output_dim]``.

    >>> CategoricalEmbedding(["a", "b"], 3)(tf.constant(["a", "zzz"])).shape
    TensorShape([2, 3])
    """

    def __init__(self, vocabulary: Sequence[str], output_dim: int = 32,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.vocabulary = _check_vocabulary(vocabulary, output_dim)
        self.output_dim = int(output_dim)
        self.lookup = tf.keras.layers.StringLookup(
            vocabulary=self.vocabulary, num_oov_indices=1
        )
        self.embedding = tf.keras.layers.Embedding(
            len(self.vocabulary) + 1, self.output_dim
        )

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return self.embedding(self.lookup(tf.reshape(inputs, [-1])))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(vocabulary=self.vocabulary, output_dim=self.output_dim)
        return config


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class MultiValuedEmbedding(tf.keras.layers.Layer):
    """Separator-joined tokens (``"Action|Comedy"``) -> pooled embeddings.

    Args:
        vocabulary: The known tokens.
        output_dim: Embedding size.
        separator: Token separator in the raw string.
        combiner: ``sum``, ``mean`` or ``sqrtn`` over the tokens.

    Call args:
        inputs: string ``[batch]``.

    Returns:
        float32 ``[batch, output_dim]``; an empty string gives zeros.
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        output_dim: int = 16,
        separator: str = "|",
        combiner: str = "mean",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_combiner(combiner)
        if not separator:
            raise ConfigError("separator must be a non-empty string.")
        self.vocabulary = _check_vocabulary(vocabulary, output_dim)
        self.output_dim = int(output_dim)
        self.separator = separator
        self.combiner = combiner
        self.lookup = tf.keras.layers.StringLookup(
            vocabulary=self.vocabulary, num_oov_indices=1
        )
        self.embedding = tf.keras.layers.Embedding(
            len(self.vocabulary) + 1, self.output_dim
        )

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        tokens = tf.strings.split(tf.reshape(inputs, [-1]), sep=self.separator)
        tokens = tf.ragged.boolean_mask(tokens, tf.strings.length(tokens) > 0)
        vectors = tf.ragged.map_flat_values(self.embedding, self.lookup(tokens))
        total = tf.reduce_sum(vectors, axis=1)
        count = tf.cast(tokens.row_lengths(), tf.float32)[:, tf.newaxis]
        return combine(total, count, self.combiner)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            vocabulary=self.vocabulary,
            output_dim=self.output_dim,
            separator=self.separator,
            combiner=self.combiner,
        )
        return config


@tf.keras.utils.register_keras_serializable(package="tfdssm")
class NumericInput(tf.keras.layers.Layer):
    """A number standardised with a fixed mean and standard deviation.

    Call args:
        inputs: numeric ``[batch]``.

    Returns:
        float32 ``[batch, 1]``.

    >>> NumericInput(mean=10.0, std=2.0)(tf.constant([12.0])).numpy().tolist()
    [[1.0]]
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not std > 0:
            raise ConfigError(f"std must be positive, received {std}.")
        self.mean = float(mean)
        self.std = float(std)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        values = tf.cast(tf.reshape(inputs, [-1, 1]), tf.float32)
        return (values - self.mean) / self.std

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(mean=self.mean, std=self.std)
        return config
