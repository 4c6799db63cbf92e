"""The input gate in the pipeline: images it refuses end not_applicable with the score and the threshold.

The first tests use a tiny bundle whose gate is built from its own features (no shared data). The others run
the real multi-label bundle with its fitted gate on real non-chest radiographs, chest images turned or upside
down, noise and a gradient (all refused), and real chest radiographs (all processed). They read the gate of
the shipped ``xraybatch/bundles/nih-multilabel``, or of the bundle named by ``XRAYBATCH_TEST_GATED_BUNDLE``
(a copy fitted with ``xraybatch train gate``), and skip when that bundle has no gate.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import SHARED_DATA, make_tiny_bundle, shared_file
from tests.integration.test_pipeline import _rows
from tests.synth import CR_IMAGE_STORAGE, chest_pixels, make_dataset, write_dicom
from tests.unit.test_gate import write_gate_block
from xraybatch.gate import REASON
from xraybatch.models.registry import SHIPPED_BUNDLES, read_bundle
from xraybatch.pipeline import run_folder
from xraybatch.settings import Settings, load_settings


def _settings(tmp_path: Path, bundle: Path, **sections: dict[str, object]) -> Settings:
    return load_settings(None, {"workdir": tmp_path / "work", "model": {"bundles": [str(bundle)], "threads": 2},
                                **sections}, environ={})


def _notes(settings: Settings) -> dict[str, list[str]]:
    """The data-quality notes of every instance, by file name."""
    from sqlalchemy import select

    from xraybatch.db import session as db_session
    from xraybatch.db.tables import Instance

    with db_session.make_sessionmaker(db_session.make_engine(settings.db_url))() as s:
        return {Path(path).name: list(notes) for path, notes in s.execute(select(Instance.path, Instance.notes))}


def _features(bundle: Path, path: Path) -> np.ndarray:
    """The pooled backbone features the pipeline computes for a DICOM file."""
    from xraybatch import ingest, preprocess
    from xraybatch.gate import pool
    from xraybatch.infer import Predictor
    from xraybatch.settings import IngestConfig

    spec = read_bundle(bundle)
    header, _ = ingest.read_header(path, IngestConfig())
    model_input = preprocess.model_input(ingest.read(header), spec.preprocess, spec.input.size)
    return pool(Predictor(spec).forward([model_input]).activations)[0]


def test_the_gate_refuses_what_its_bundle_would_not_recognise(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "bundle")
    chest = write_dicom(tmp_path / "in" / "chest.dcm", pixels=chest_pixels(seed=1))
    noise = write_dicom(tmp_path / "in" / "noise.dcm", pixels=np.random.default_rng(0).integers(
        0, 4096, size=(256, 240)).astype(np.uint16))
    f_chest, f_noise = _features(bundle, chest), _features(bundle, noise)
    far = float(np.linalg.norm(f_noise - f_chest))
    assert far > 0
    channels = len(f_chest)
    write_gate_block(bundle, {  # the distance to the chest's own features, refused beyond half the noise's
        "center": f_chest, "scale": np.ones(channels), "components": np.eye(channels), "mean": np.zeros(channels),
        "precision": np.eye(channels),
    }, [{"name": "distance", "kind": "mahalanobis", "threshold": far / 2, "definition": "test"}])

    settings = _settings(tmp_path, bundle)
    assert run_folder(tmp_path / "in", settings).counts == {"done": 1, "not_applicable": 1}
    rows = {Path(str(r["path"])).name: r for r in _rows(settings)}
    assert rows["noise.dcm"]["state"] == "not_applicable"
    assert rows["noise.dcm"]["reason"] == (f"{REASON} (distance {far:.2f} > threshold {far / 2:.2f}; "
                                           "gate of tiny-binary@0.0.1-test)")
    assert rows["chest.dcm"]["state"] == "done"
    assert f"input gate of tiny-binary@0.0.1-test: distance 0.00 <= {far / 2:.2f}" in _notes(settings)["chest.dcm"]
    # No findings and no outputs for the refused image: predictions and outputs are the chest's only.
    chest_uid = rows["chest.dcm"]["sop_instance_uid"]
    assert {p["sop_instance_uid"] for p in _rows(settings, "predictions")} == {chest_uid}
    sources = {dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in settings.outbox.rglob("*.dcm")}
    assert sources == {dcmread(chest, stop_before_pixels=True).StudyInstanceUID}

    # [gate] enabled = false: the same files, both processed.
    off = _settings(tmp_path / "off", bundle, gate={"enabled": False})
    assert run_folder(tmp_path / "in", off).counts == {"done": 2}


# -- the real gated bundle --------------------------------------------------------------------------------


def _gated_bundle() -> Path:
    path = Path(os.environ.get("XRAYBATCH_TEST_GATED_BUNDLE") or SHIPPED_BUNDLES / "nih-multilabel")
    if not (path / "model.json").is_file():
        pytest.skip(f"{path} is not a model bundle")
    if "gate" not in json.loads((path / "model.json").read_text()):
        pytest.skip(f"{path} has no input gate yet: fit it with `xraybatch train gate` (docs/training.md), or set "
                    "XRAYBATCH_TEST_GATED_BUNDLE to a bundle that has one")
    return path


def _without_tags(source: Path, out: Path) -> Path:
    """``source`` with Body Part Examined and View Position removed (the header then says nothing against it)."""
    ds = dcmread(source)
    for keyword in ("BodyPartExamined", "ViewPosition"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(out, enforce_file_format=True)
    return out


def _turned(source: Path, out: Path, how: str) -> Path:
    """``source`` (uncompressed) with its pixels turned 90 degrees or flipped upside down, as a new instance."""
    ds = dcmread(source)
    pixels = np.rot90(ds.pixel_array) if how == "rot90" else ds.pixel_array[::-1]
    pixels = np.ascontiguousarray(pixels)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def _as_cr(source: Path, out: Path) -> Path:
    """A chest stored as Secondary Capture, relabelled CR Image Storage so that the header rules take it."""
    ds = dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.save_as(out, enforce_file_format=True)
    return out


def _wrapped(picture: Path, out: Path, **kwargs: object) -> Path:
    """A JPEG/PNG chest radiograph as an 8-bit MONOCHROME2 CR chest PA file."""
    from PIL import Image

    with Image.open(picture) as img:
        pixels = np.asarray(img.convert("L"))
    return write_dicom(out, ds=make_dataset(pixels, bits_stored=8, **kwargs))  # type: ignore[arg-type]


def _val_pictures(bundle: str, root: str, n: int) -> list[Path]:
    """``n`` validation images, evenly spread, of a shipped bundle's split manifest, under ../shared/data/ROOT
    (not the 64 px NIH copies: the header rules reject images under 128 pixels before the gate)."""
    manifest = SHIPPED_BUNDLES / bundle / "split_manifest.csv"
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = [r["file"] for r in csv.DictReader(fh) if r["split"] == "val" and not r["file"].startswith("images_64/")]
    step = max(1, len(rows) // n)
    return [shared_file(f"{root}/{f}") for f in rows[::step][:n]]


def _states(tmp_path: Path, inbox: Path) -> tuple[dict[str, dict[str, object]], dict[str, list[str]]]:
    settings = _settings(tmp_path, _gated_bundle())
    run_folder(inbox, settings)
    return {Path(str(r["path"])).name: r for r in _rows(settings)}, _notes(settings)


@pytest.mark.shared_data
@pytest.mark.slow
def test_the_gate_refuses_non_chests_turned_chests_noise_and_gradients(tmp_path: Path) -> None:
    _gated_bundle()
    inbox = tmp_path / "in"
    inbox.mkdir()
    _without_tags(shared_file("dicom/highdicom_test_files/dx_image.dcm"), inbox / "dog-lateral.dcm")
    _without_tags(shared_file("dicom/pydicom_data_wg04/RG3_UNCR.dcm"), inbox / "extremity.dcm")
    rg1 = shared_file("dicom/pydicom_data_wg04/RG1_UNCR.dcm")
    _turned(rg1, inbox / "chest-rot90.dcm", "rot90")
    _turned(rg1, inbox / "chest-upside-down.dcm", "flipud")
    rng = np.random.default_rng(7)
    write_dicom(inbox / "noise.dcm", pixels=rng.integers(0, 4096, size=(1024, 1024)).astype(np.uint16))
    y, x = np.mgrid[0:1024, 0:1024]
    write_dicom(inbox / "gradient.dcm", pixels=np.round((x + y) / 2046 * 4095).astype(np.uint16))
    assert {dcmread(p, stop_before_pixels=True).get("BodyPartExamined") for p in inbox.iterdir()} >= {None, "CHEST"}

    rows, _ = _states(tmp_path, inbox)
    assert {name: r["state"] for name, r in rows.items()} == dict.fromkeys(
        ["dog-lateral.dcm", "extremity.dcm", "chest-rot90.dcm", "chest-upside-down.dcm", "noise.dcm",
         "gradient.dcm"], "not_applicable")
    for name, row in rows.items():
        assert str(row["reason"]).startswith(REASON + " ("), (name, row["reason"])
        assert "> threshold" in str(row["reason"])


@pytest.mark.shared_data
@pytest.mark.slow
def test_the_gate_keeps_real_chest_radiographs(tmp_path: Path) -> None:
    _gated_bundle()
    inbox = tmp_path / "in"
    inbox.mkdir()
    shutil.copy(shared_file("dicom/pydicom_data_wg04/RG1_UNCI.dcm"), inbox / "rg1.dcm")
    _as_cr(shared_file("dicom/torchxrayvision_tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"),
           inbox / "txrv.dcm")
    pictures = _val_pictures("pneumonia-binary", "kermany", 6) + _val_pictures("nih-multilabel", "nih_cxr14", 6)
    pictures += sorted((SHARED_DATA / "kermany" / "val" / "NORMAL").glob("*.jpeg"))[:2]
    for i, picture in enumerate(pictures):
        _wrapped(picture, inbox / f"val-{i:02d}.dcm", view="AP" if "kermany" in str(picture) else "PA")
    for i, picture in enumerate(pictures[5:7]):  # another encoding: 12-bit MONOCHROME1 with a full-range window
        from PIL import Image

        with Image.open(picture) as img:
            stored = (255 - np.asarray(img.convert("L")).astype(np.uint16)) * 16
        write_dicom(inbox / f"mono1-{i}.dcm", ds=make_dataset(stored, photometric="MONOCHROME1", bits_stored=12,
                                                               WindowCenter=2048, WindowWidth=4096))

    rows, notes = _states(tmp_path, inbox)
    assert len(rows) == 4 + len(pictures)
    assert {name: r["state"] for name, r in rows.items()} == dict.fromkeys(rows, "done"), {
        name: r["reason"] for name, r in rows.items() if r["state"] != "done"}
    assert all(any(n.startswith("input gate of ") for n in notes[name]) for name in rows)
