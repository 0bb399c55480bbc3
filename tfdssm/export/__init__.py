"""The export directory (see DESIGN.md, "Export contract").

Modules: :mod:`.layout` (names, versions, ``export.json``; no TensorFlow),
:mod:`.serving_config` (``models.config``), :mod:`.warmup`,
:mod:`.savedmodel` (``export_model``: towers, retrieval models, ``export.json``),
:mod:`.index` (retrieval SavedModels), :mod:`.tokens` and :mod:`.restricts`
(filtered retrieval: restrict tokens, ``top_k_filter``), :mod:`.sharding`,
:mod:`.candidates`, :mod:`.tflite` and :mod:`.loading` (reading an export
back). A model server
needs only ``layout``, ``serving_config`` and ``warmup``; importing this
package imports none of the others. Names of the former ``tfdssm.export``
module resolve here.
"""

from tfdssm._lazy import lazy_attributes

_EXPORTS = {
    "EXPORT_JSON": "tfdssm.export.layout",
    "CORPUS_FILE": "tfdssm.export.layout",
    "FORMAT_VERSION": "tfdssm.export.layout",
    "versions": "tfdssm.export.layout",
    "next_version": "tfdssm.export.layout",
    "read_export": "tfdssm.export.layout",
    "write_json_atomic": "tfdssm.export.layout",
    "export_model": "tfdssm.export.savedmodel",
    "load_towers": "tfdssm.export.loading",
    "tower_features": "tfdssm.export.loading",
}
# TFLite quantisation modes (no TensorFlow needed to read them).
QUANTIZATIONS = ("none", "dynamic", "float16")

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, ["tfdssm.export.savedmodel"])
__all__ = list(_EXPORTS)
