"""Writes tfdssm/text/<TABLE_FILE> from this Python's unicodedata.

Hash ids depend on this table: never overwrite a released table file; a new Unicode
version gets a new file name and a new hashing version.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tfdssm.text.unicode_table import TABLE_FILE, build_table_dict  # noqa: E402

if __name__ == "__main__":
    table = build_table_dict()
    out = pathlib.Path(__file__).resolve().parents[1] / "tfdssm" / "text" / TABLE_FILE
    out.write_text(json.dumps(table, separators=(",", ":")), encoding="utf-8")
    print(f"wrote {out}: {len(table['compose'])} pairs, {len(table['expand'])} "
          f"expansions (Unicode {table['unicode_version']})")
