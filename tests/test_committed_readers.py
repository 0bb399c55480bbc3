"""Readers of an export (LocalRetriever, evaluation) read the committed export.

An export killed before its commit (``models.config``, written last) leaves
orphan versions, or, killed late, a newer ``export.json`` beside the export the
servers still serve; readers use the committed versions or say the export is
torn, never the newest directory on disk.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tfdssm.errors import ExportError
from tfdssm.export import layout, serving_config
from tfdssm.retrieve import LocalRetriever
from tfdssm.training.evaluation import evaluate_export


@pytest.fixture()
def export_with_orphan(pairs_export, tmp_path):
    """A copy of the pairs export plus ``towers/2``, an orphan of a killed
    export: not committed, and not even loadable."""
    export_dir = tmp_path / "export"
    shutil.copytree(pairs_export[0], export_dir)
    orphan = export_dir / "towers" / "2"
    orphan.mkdir()
    (orphan / "saved_model.pb").write_bytes(b"killed mid-write")
    assert layout.versions(export_dir / "towers") == [1, 2]
    assert serving_config.pinned_versions(export_dir)["towers"] == 1
    return export_dir


def test_readers_use_the_committed_version_not_the_newest(export_with_orphan,
                                                          pairs_export, pairs_frame):
    clean = LocalRetriever(pairs_export[0])
    retriever = LocalRetriever(export_with_orphan)
    ids, scores = retriever.top_k({"query": ["kiwi recipe", "figs"]}, k=3)
    want_ids, want_scores = clean.top_k({"query": ["kiwi recipe", "figs"]}, k=3)
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    metrics, pool = evaluate_export(export_with_orphan, pairs_frame(20))
    want, want_pool = evaluate_export(pairs_export[0], pairs_frame(20))
    assert pool == want_pool and metrics == pytest.approx(want)


def test_a_torn_export_is_refused_by_its_readers(export_with_orphan, pairs_frame):
    # Killed between export.json (naming version 2) and models.config (still 1).
    path = export_with_orphan / layout.EXPORT_JSON
    info = json.loads(path.read_text())
    info["towers"]["version"] = 2
    info.setdefault("commit", {}).setdefault("versions", {})["towers"] = 2
    path.write_text(json.dumps(info))
    for read in (lambda: LocalRetriever(export_with_orphan),
                 lambda: evaluate_export(export_with_orphan, pairs_frame(20))):
        with pytest.raises(ExportError, match="stopped before its commit"):
            read()


def test_tflite_parity_is_checked_against_the_committed_towers(export_with_orphan):
    from tfdssm.export import tflite  # noqa: PLC0415

    check = tflite.parity(export_with_orphan, [{"query": "kiwi recipe"}])
    assert check["queries"] == 1 and check["max_abs_diff"] < 1e-4, check
