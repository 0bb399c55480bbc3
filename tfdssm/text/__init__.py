"""Text: normalisation (string stage) and letter-trigram hashing (integer stage).

Modules: :mod:`.normalize` (UTF-8 -> NFKC + casefold code points, in the graph
and in Python), :mod:`.hashing` (code points -> trigram / word n-gram ids, the
part TFLite runs) and :mod:`.unicode_table` (the frozen Unicode 14 table, with
its JSON beside it). Names of the former ``tfdssm.text`` module resolve here.
"""

from tfdssm._lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, {}, ["tfdssm.text.normalize"])
