"""``tfdssm index``: embedding and (re-)indexing a corpus with Apache Beam.

Modules: :mod:`.corpus` (corpus files, embedding records; no Beam),
:mod:`.handler` (the ``RunInference`` model handler over the towers
SavedModel), :mod:`.pipeline` (the Beam pipeline and its options),
:mod:`.build` (new retrieval versions from embeddings, committed as an export
does) and :mod:`.reindex` (``index_corpus``, ``embed_corpus``). Needs the
``beam`` extra (``pip install 'tfdssm[beam]'``).
"""

from tfdssm._lazy import lazy_attributes

_EXPORTS = {
    "index_corpus": "tfdssm.indexing.reindex",
    "embed_corpus": "tfdssm.indexing.reindex",
    "shard_dir": "tfdssm.indexing.reindex",
}

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, [])
__all__ = list(_EXPORTS)
