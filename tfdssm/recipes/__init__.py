"""Recipes: turn a data source into a :class:`tfdssm.training.run.Prepared` run.

``movielens`` trains a user/movie recommender on MovieLens-100k; ``pairs`` trains a
text-to-text DSSM on any table of (query, clicked document) pairs.
"""

PIPELINES = ("movielens", "pairs")
