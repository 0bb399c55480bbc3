"""Training: fit, evaluate and export a prepared run; checkpoints; tf.distribute.

Modules: :mod:`.run` (:class:`~tfdssm.training.run.Prepared`, ``run``),
:mod:`.evaluation` (rank metrics of towers over a corpus, and of an export
over a table), :mod:`.metrics` (Recall/NDCG/MRR@K, AUC),
:mod:`.checkpoints`, :mod:`.distribute` and :mod:`.parameter_server`.
"""

# Option lists (no TensorFlow needed to read them: the CLI builds its help).
STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server")
HARD_NEGATIVES = ("bm25", "self")
