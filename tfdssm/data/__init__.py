"""Data: tables in, ``tf.data`` out; MovieLens-100k; history columns.

Modules: :mod:`.readers` (CSV/TSV/Parquet/pandas/TFRecord -> ``tf.data``),
:mod:`.movielens` (finding, fetching and parsing MovieLens-100k) and
:mod:`.history` (history columns without leakage). Names of the former
``tfdssm.data`` module resolve here.
"""

from tfdssm._lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, {}, ["tfdssm.data.readers"])
