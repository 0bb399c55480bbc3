"""Models: towers, :class:`~tfdssm.model.dssm.DSSM`, losses, sampling, presets.

Modules: :mod:`.towers` (:class:`Tower`, :class:`SharedTower`,
:func:`paper_tower`), :mod:`.item_tower`, :mod:`.multihead`, :mod:`.shared`
(history embeddings shared across towers), :mod:`.runner` (a tower over
columns), :mod:`.dssm`, :mod:`.losses`, :mod:`.sampling`, :mod:`.optimizers`
and :mod:`.youtube` (the YoutubeDNN builder).
"""

from tfdssm._lazy import lazy_attributes

_EXPORTS = {
    "DSSM": "tfdssm.model.dssm",
    "LOSSES": "tfdssm.model.dssm",
    "Tower": "tfdssm.model.towers",
    "SharedTower": "tfdssm.model.towers",
    "SENet": "tfdssm.model.towers",
    "paper_tower": "tfdssm.model.towers",
    "ItemEmbeddingTower": "tfdssm.model.item_tower",
    "MultiHeadTower": "tfdssm.model.multihead",
    "NegativeSampler": "tfdssm.model.sampling",
    "link_shared_embeddings": "tfdssm.model.shared",
    "embed": "tfdssm.model.runner",
    "youtube_dnn": "tfdssm.model.youtube",
}
# Option lists (no TensorFlow needed to read them: the CLI builds its help).
LOSSES = ("in_batch", "paper", "pair_ce", "triplet", "sigmoid")
SCORE_LOSSES = ("pair_ce", "triplet", "sigmoid")

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, ["tfdssm.model.dssm"])
__all__ = list(_EXPORTS)
