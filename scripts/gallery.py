"""Remake docs/gallery/: the Secondary Capture of real radiographs as PNG, 900 pixels wide, with the shipped bundles.

    .venv/bin/python scripts/gallery.py                 # writes docs/gallery/*.png; needs ../shared/data

The radiographs go through ``run-folder`` exactly as a user's would (the input gate included); each SC is read
back from the outbox with pydicom, as a viewer would, and scaled to 900 pixels wide:

- ``sc-rg1-cr-pa.png``: pydicom-data's RG1 (CR chest PA, 1955x1841, JPEG 2000 lossless);
- ``sc-xrv-cr-pa.png``: torchxrayvision's test chest CR (1024x1024 JPEG baseline, with wires and clips; stored as
  Secondary Capture, so the copy gets the CR SOP class the input rules ask for);
- ``sc-nih-cr-ap-monochrome1.png``: NIH ChestX-ray14 image 00000404_000 (a validation image of the shipped
  multi-label model, never trained on; a portable AP), written as a 12-bit MONOCHROME1 CR, as many CR readers
  send.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ComputedRadiographyImageStorage

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GALLERY = ROOT / "docs" / "gallery"
WIDTH = 900


def sources(folder: Path) -> dict[str, Path]:
    """Write the three radiographs into ``folder``; returns PNG name -> DICOM path."""
    sys.path.insert(0, str(ROOT))
    from tests.synth import write_dicom

    folder.mkdir(parents=True)
    out = {"sc-rg1-cr-pa.png": folder / "rg1.dcm"}
    shutil.copy(get_testdata_file("RG1_J2KR.dcm"), out["sc-rg1-cr-pa.png"])  # type: ignore[arg-type]
    xrv = dcmread(SHARED / "dicom" / "torchxrayvision_tests" /
                  "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    xrv.SOPClassUID = xrv.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    out["sc-xrv-cr-pa.png"] = folder / "xrv.dcm"
    xrv.save_as(out["sc-xrv-cr-pa.png"], enforce_file_format=True)
    png = cv2.imread(str(SHARED / "nih_cxr14" / "images" / "00000404_000.png"), cv2.IMREAD_GRAYSCALE)
    stored = 4095 - np.round(png.astype(np.float64) * 4095 / 255).astype(np.uint16)  # MONOCHROME1: bone dark
    out["sc-nih-cr-ap-monochrome1.png"] = write_dicom(
        folder / "nih.dcm", pixels=stored, photometric="MONOCHROME1", bits_stored=12, view="AP",
        PatientName="Gallery^NIH", PatientID="NIH-00000404",
    )
    return out


def main() -> None:
    from sqlalchemy import create_engine, text

    from xraybatch.pipeline import run_folder
    from xraybatch.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        inbox, work = Path(tmp) / "in", Path(tmp) / "work"
        named = sources(inbox)
        settings = load_settings(None, {"workdir": work}, environ={})
        summary = run_folder(inbox, settings, workers=1)
        print(f"run-folder: {summary.counts}")
        engine = create_engine(settings.db_url)
        with engine.connect() as c:
            rows = c.execute(text(
                "SELECT i.path, o.path FROM outputs o JOIN instances i ON i.id = o.instance_id WHERE o.kind = 'sc'"
            )).all()
        engine.dispose()
        sc_of = {Path(src).name: Path(sc) for src, sc in rows}
        GALLERY.mkdir(parents=True, exist_ok=True)
        for name, source in named.items():
            if source.name not in sc_of:
                raise SystemExit(f"{source.name}: no Secondary Capture (see the run's states above)")
            sc = sc_of[source.name]
            rgb = dcmread(sc if sc.is_absolute() else work / sc).pixel_array  # YBR converted to RGB by pydicom
            height = round(rgb.shape[0] * WIDTH / rgb.shape[1])
            small = cv2.resize(rgb, (WIDTH, height), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(GALLERY / name), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
            print(f"wrote {GALLERY / name} ({WIDTH}x{height})")


if __name__ == "__main__":
    main()
