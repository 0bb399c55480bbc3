"""Pipelines: turn a data source into a :class:`tfdssm.train.Prepared` run.

``movielens`` trains a user/movie recommender on MovieLens-100k; ``pairs`` trains a
text-to-text DSSM on any table of (query, clicked document) pairs.
"""

PIPELINES = ("movielens", "pairs")
