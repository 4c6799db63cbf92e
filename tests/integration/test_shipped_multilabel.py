"""The shipped bundles (binary + NIH multi-label, real weights) through run-folder on a real chest radiograph:
all 15 NIH targets are predicted, stored and written into the SR; the SC names the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from tests.integration.test_pipeline import _rows
from xraybatch.models.findings import NIH_TARGETS
from xraybatch.models.registry import SHIPPED_BUNDLES, find_bundles
from xraybatch.pipeline import run_folder
from xraybatch.settings import load_settings


def _groups(ds: Dataset) -> list[Dataset]:
    """Every TID 1501 "Measurement Group" container of an SR, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        names = item.get("ConceptNameCodeSequence", [])
        if names and names[0].CodeMeaning == "Measurement Group":
            found.append(item)
        found += _groups(item)
    return found


def test_shipped_bundles_predict_all_nih_targets_on_a_real_radiograph(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    source = get_testdata_file("RG1_UNCI.dcm")  # a CR chest PA from pydicom-data (WG04)
    if source is None:
        pytest.skip("pydicom-data is not installed: RG1_UNCI.dcm is unavailable")
    if not (SHIPPED_BUNDLES / "nih-multilabel" / "model.json").is_file():
        pytest.skip("the nih-multilabel bundle is not in this checkout")
    names = {s.name: s for s in find_bundles()}
    assert names["xraybatch-nih14"].targets == NIH_TARGETS and names["xraybatch-nih14"].task == "multilabel"
    assert len(names) == 2  # the binary bundle is still run beside it

    inbox = tmp_path / "in"
    inbox.mkdir()
    shutil.copy(source, inbox / "chest.dcm")
    settings = load_settings(None, {"workdir": tmp_path / "work", "model": {"threads": 2}}, environ={})
    summary = run_folder(inbox, settings)
    assert summary.files == 1
    (row,) = _rows(settings)
    assert row["state"] == "done", row

    preds = _rows(settings, "predictions")
    nih = [p for p in preds if p["model"] == "xraybatch-nih14"]
    assert [p["target"] for p in nih] == list(NIH_TARGETS) or sorted(p["target"] for p in nih) == sorted(NIH_TARGETS)
    assert len(preds) == 16 and all(0.0 <= float(p["probability"]) <= 1.0 for p in preds)

    outputs = [dcmread(p) for p in sorted(settings.outbox.rglob("*.dcm"))]
    (sr,) = [d for d in outputs if d.Modality == "SR"]
    groups = _groups(sr)
    assert len(groups) == 16  # 1 binary + 15 NIH targets, present or absent
    (sc,) = [d for d in outputs if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]  # maps are the other objects
    assert "AI" in str(sc.SeriesDescription)
