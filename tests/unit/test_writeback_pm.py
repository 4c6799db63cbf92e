"""Parametric maps, codes, UIDs and identity of the outputs, read back with highdicom and pydicom."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGLSLossless

from tests import dciodvfy
from tests.synth import make_dataset
from xraybatch.domain import DisplayImage, Heatmap, OutputRecord, Prediction
from xraybatch.errors import InvalidInputError
from xraybatch.models.findings import (
    BINARY_TARGETS,
    NIH_TARGETS,
    NO_FINDING,
    PRIVATE_SCHEME,
    TARGET_CODES,
)
from xraybatch.settings import ConfigError, OutputConfig, load_settings
from xraybatch.writeback import build_pm, write_outputs
from xraybatch.writeback.common import derive_uid, device_uid, is_uid, output_path
from xraybatch.writeback.pm import STORED_MAX

PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"


@pytest.fixture
def source() -> pydicom.Dataset:
    ds = make_dataset()
    del ds.PixelData
    return ds


@pytest.fixture
def predictions() -> tuple[Prediction, ...]:
    probabilities = np.linspace(0.02, 0.98, len(NIH_TARGETS))
    nih = Prediction("nih-densenet", "1.2", NIH_TARGETS, tuple(map(float, probabilities)), (0.5,) * len(NIH_TARGETS))
    return nih, Prediction("pneumonia-resnet", "2.0", BINARY_TARGETS, (0.83,), (0.6,))


def _heat(rows: int, cols: int, cx: float, target: str, model: str) -> Heatmap:
    y, x = np.mgrid[0:rows, 0:cols]
    values = np.exp(-(((x / cols - cx) ** 2 + (y / rows - 0.5) ** 2) / 0.02)).astype(np.float32)
    return Heatmap(model, target, 0.83, values)


def _outputs(source: pydicom.Dataset, predictions: tuple[Prediction, ...], outbox: Path, **cfg: object):
    rows, cols = int(source.Rows), int(source.Columns)
    heatmaps = [
        _heat(rows, cols, 0.3, "Pneumonia", "pneumonia-resnet"),
        _heat(rows, cols, 0.7, "Hernia", "nih-densenet"),
    ]
    display = DisplayImage(np.full((rows, cols), 0.5, np.float32))
    return write_outputs(source, display, predictions, heatmaps, OutputConfig(**cfg), outbox), heatmaps  # type: ignore[arg-type]


# --- codes -------------------------------------------------------------------------------------------------------


# SNOMED CT's semantic tags are left out when names are compared: "Pleural thickening (finding)" matches
_SEMANTIC_TAG = re.compile(r"\s*\((finding|disorder|morphologic abnormality|qualifier value|body structure)\)$")
_STOP_WORDS = frozenset({"a", "and", "in", "of", "the", "with"})
CHEST_CIDS = range(6100, 6130)  # the chest CAD context groups: Chest Component Category ... Chest Site Involvement


def _name(text: str) -> str:
    return " ".join(re.findall(r"[a-z]+", _SEMANTIC_TAG.sub("", text.lower().replace("_", " "))))


def _stems(text: str) -> frozenset[str]:
    """The words of a name cut to five letters: "Pleural thickening" and "Thickening of pleura" match."""
    return frozenset(word[:5] for word in _name(text).split() if word not in _STOP_WORDS)


def _standard_concepts() -> dict[tuple[str, str], str]:
    """``(scheme, value) -> meaning`` of every concept in pydicom's dictionaries (every scheme, every CID)."""
    concepts = {}
    for scheme in codes.schemes():
        table = getattr(codes, scheme)
        for keyword in table.dir():
            code = getattr(table, keyword)
            concepts[(code.scheme_designator, code.value)] = code.meaning
    for cid in CHEST_CIDS:
        group = getattr(codes, f"cid{cid}")
        for keyword in group.dir():
            code = getattr(group, keyword)
            concepts[(code.scheme_designator, code.value)] = code.meaning
    return concepts


def test_no_private_code_where_a_standard_one_exists() -> None:
    """A private code is used only where no concept of pydicom's dictionaries (every scheme, which includes
    the chest CAD groups CID 6100-6129) has that name, exactly or with its words in another order or form;
    concepts pydicom holds are taken from pydicom, never retyped."""
    standard = _standard_concepts()
    assert len(standard) > 10_000, "pydicom's code dictionaries were not read"
    by_name = {_name(meaning): key for key, meaning in standard.items()}
    private = {t: c for t, c in TARGET_CODES.items() if c.scheme == PRIVATE_SCHEME}
    assert set(private) <= {"Pleural_Thickening"}, private
    for target, code in private.items():
        for name in (code.meaning, target):
            wanted = _stems(name)
            candidates = [(key, m) for key, m in standard.items() if wanted <= _stems(m)]
            assert candidates == [], f"{target}: standard concepts {candidates} may name it; use one, not {code}"
    for target, code in TARGET_CODES.items():
        if code.source.startswith("pydicom"):
            # the concepts DICOM lists are taken from pydicom by keyword, not retyped
            keyword = code.source.rsplit(".", 1)[1]
            assert getattr(getattr(codes, code.scheme), keyword).value == code.value, target
        elif code.scheme != PRIVATE_SCHEME:
            # a SNOMED CT concept given by id is one pydicom does not hold, under that id or that name
            assert (code.scheme, code.value) not in standard, f"{target}: pydicom holds {code}; take it from there"
            assert _name(code.meaning) not in by_name, f"{target}: pydicom holds {by_name[_name(code.meaning)]}"
    assert TARGET_CODES["Infiltration"].value == codes.cid6104.Infiltrate.value


def test_no_finding_is_a_statement_not_a_finding(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path
) -> None:
    records, _ = _outputs(source, predictions, tmp_path)
    (sr_record,) = [r for r in records if r.kind == "sr"]
    groups = hd.sr.srread(sr_record.path).content.get_image_measurement_groups()
    (no_finding,) = [g for g in groups if g.tracking_identifier.endswith("/" + NO_FINDING)]
    assert no_finding.finding_type is None
    (statement,) = no_finding.get_qualitative_evaluations(name=codes.DCM.Impression)
    assert statement.value == codes.DCM.NoAbnormality
    finding_types = {(g.finding_type.value, g.finding_type.scheme_designator) for g in groups if g.finding_type}
    assert (codes.DCM.NoAbnormality.value, "DCM") not in finding_types


# --- parametric maps --------------------------------------------------------------------------------------------


def test_pm_round_trip(source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path) -> None:
    records, heatmaps = _outputs(source, predictions, tmp_path, pm_max_size=64)
    maps = [r for r in records if r.kind == "pm"]
    assert len(maps) == len(heatmaps) == 2
    assert len({r.series_instance_uid for r in maps}) == 1, "the maps of one study and model set share a series"
    sc = next(r for r in records if r.kind == "sc")
    assert maps[0].series_instance_uid not in (sc.series_instance_uid, source.SeriesInstanceUID)
    numbers = set()
    for record, heat in zip(maps, heatmaps):
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(record.path))
        assert pm.SOPClassUID == PM_CLASS
        assert pm.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert (pm.StudyInstanceUID, pm.PatientID, pm.PatientName) == (
            source.StudyInstanceUID,
            source.PatientID,
            source.PatientName,
        )
        assert max(pm.Rows, pm.Columns) == 64
        assert pm.Rows / pm.Columns == pytest.approx(source.Rows / source.Columns, rel=0.05)
        (derivation,) = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        groups = (pm.PerFrameFunctionalGroupsSequence[0], pm.SharedFunctionalGroupsSequence[0])
        (mapping,) = [g.RealWorldValueMappingSequence[0] for g in groups if "RealWorldValueMappingSequence" in g]
        assert float(mapping.RealWorldValueSlope) == pytest.approx(1 / STORED_MAX)
        assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        values = pm.pixel_array.astype(float) * float(mapping.RealWorldValueSlope)
        assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.9
        # the hot spot is where the heat map has it
        hot_col = np.unravel_index(values.argmax(), values.shape)[1] / pm.Columns
        assert hot_col == pytest.approx(float(np.argmax(heat.values.max(axis=0))) / source.Columns, abs=0.05)
        spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert float(spacing[1]) * pm.Columns == pytest.approx(float(source.PixelSpacing[1]) * source.Columns)
        assert heat.target in pm.ContentDescription
        numbers.add(pm.InstanceNumber)
    assert len(numbers) == 2
    # the SR references the maps and the SC
    sr = pydicom.dcmread(next(r for r in records if r.kind == "sr").path)
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert {r.sop_instance_uid for r in maps} | {sc.sop_instance_uid, source.SOPInstanceUID} <= evidence
    library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    assert library and sc.sop_instance_uid in str(library[0])


def test_pm_shares_the_source_geometry_when_it_has_one(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...]
) -> None:
    source.FrameOfReferenceUID = "1.2.3.4"
    source.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    source.ImagePositionPatient = [-100, -120, 0]
    source.PixelSpacing = [0.5, 0.5]
    rows, cols = int(source.Rows), int(source.Columns)
    pm = build_pm(source, _heat(rows, cols, 0.5, "Hernia", "nih-densenet"), predictions, OutputConfig(pm_max_size=32))
    assert pm.FrameOfReferenceUID == "1.2.3.4"
    without = make_dataset()
    del without.PixelData
    other = build_pm(without, _heat(rows, cols, 0.5, "Hernia", "nih-densenet"), predictions, OutputConfig())
    assert is_uid(other.FrameOfReferenceUID) and other.FrameOfReferenceUID != source.FrameOfReferenceUID


def test_pm_from_a_coarse_heat_map_matches_the_full_one(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...]
) -> None:
    """Heat maps come on the outputs' grid (xraybatch.explain); a coarse one gives the map a full one gives."""
    import cv2

    rows, cols = int(source.Rows), int(source.Columns)
    full = _heat(rows, cols, 0.4, "Hernia", "nih-densenet")
    cfg = OutputConfig(pm_max_size=32)
    grid = (round(rows * 48 / max(rows, cols)), round(cols * 48 / max(rows, cols)))  # coarser than the source
    small = cv2.resize(full.values, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    coarse = dataclasses.replace(full, values=small, source_shape=(rows, cols))
    a, b = build_pm(source, full, predictions, cfg), build_pm(source, coarse, predictions, cfg)
    assert (a.Rows, a.Columns) == (b.Rows, b.Columns) and max(a.Rows, a.Columns) == 32
    assert np.abs(a.pixel_array.astype(int) - b.pixel_array.astype(int)).max() <= 0.03 * STORED_MAX
    other = dataclasses.replace(coarse, source_shape=(rows + 1, cols))
    with pytest.raises(ValueError, match="covers an image of"):
        build_pm(source, other, predictions, cfg)


def test_pm_off_by_configuration(source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path) -> None:
    records, _ = _outputs(source, predictions, tmp_path, parametric_map=False)
    assert {r.kind for r in records} == {"sc", "sr"}
    assert "pm" not in str(pydicom.dcmread(next(r for r in records if r.kind == "sr").path).ContentSequence)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_pm_dciodvfy_clean(source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path) -> None:
    records, _ = _outputs(source, predictions, tmp_path)
    for record in (r for r in records if r.kind == "pm"):
        assert dciodvfy.findings(record.path) == [], record.path


# --- UIDs, numbers, identity, paths -----------------------------------------------------------------------------


def test_uids_are_our_own_and_deterministic(source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path) -> None:
    first, _ = _outputs(source, predictions, tmp_path / "a")
    second, _ = _outputs(source, predictions, tmp_path / "b")
    assert [r.sop_instance_uid for r in first] == [r.sop_instance_uid for r in second]
    for record in first:
        ds = pydicom.dcmread(record.path)
        assert ds.SOPInstanceUID.startswith("2.25.") and is_uid(ds.SOPInstanceUID)
        assert ds.DeviceUID == device_uid(predictions)
    sited, _ = _outputs(source, predictions, tmp_path / "c", uid_root="1.2.840.99999.7")
    assert all(r.sop_instance_uid.startswith("1.2.840.99999.7.") and is_uid(r.sop_instance_uid) for r in sited)
    newer = (predictions[0], Prediction("pneumonia-resnet", "2.1", BINARY_TARGETS, (0.83,), (0.6,)))
    assert device_uid(newer) != device_uid(predictions), "a new model version is a new device"


def _equipment_of_ours(ds: pydicom.Dataset) -> pydicom.Dataset:
    (item,) = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "xraybatch"]
    return item


def _content_items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _devices(records: list[OutputRecord]) -> set[tuple[str, str]]:
    """(Device UID, Device Serial Number) of the Contributing Equipment item of every output, read back."""
    devices = set()
    for record in records:
        ds = pydicom.dcmread(record.path)
        if record.kind == "pm":
            ds = hd.pm.ParametricMap.from_dataset(ds)
        item = _equipment_of_ours(ds)
        assert is_uid(item.DeviceUID) and re.fullmatch("[0-9a-f]{16}", item.DeviceSerialNumber), record.kind
        assert (item.DeviceUID, item.DeviceSerialNumber) == (ds.DeviceUID, ds.DeviceSerialNumber), record.kind
        devices.add((item.DeviceUID, item.DeviceSerialNumber))
    return devices


def test_device_uid_in_contributing_equipment_round_trip(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path
) -> None:
    """SR, SC and maps of one run name one device (Device UID and serial of its models and their weights) in
    Contributing Equipment and General Equipment; the SR's Device Observer is that device and its algorithm
    identifications name the models of the equipment; a new model version or new weights is a new device."""
    hashed = tuple(dataclasses.replace(p, weights_sha256=h * 64) for p, h in zip(predictions, "ab"))
    records, _ = _outputs(source, hashed, tmp_path / "run")
    assert sorted(r.kind for r in records) == ["pm", "pm", "sc", "sr"]
    (device,) = _devices(records)
    assert device[0] == device_uid(hashed)

    sr = hd.sr.srread(next(r.path for r in records if r.kind == "sr"))
    items = list(_content_items(sr))
    (observer,) = [
        i.UID for i in items if i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.DeviceObserverUID.value
    ]
    assert observer == device[0], "the SR's Device Observer UID is the Device UID of its equipment"
    (observer_serial,) = [
        i.TextValue
        for i in items
        if i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.DeviceObserverSerialNumber.value
    ]
    assert observer_serial == device[1]
    names = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.AlgorithmName.value]
    versions = [
        i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.AlgorithmVersion.value
    ]
    assert len(names) == len(versions) == sum(len(p.targets) for p in predictions)
    algorithms = {f"{n}@{v}" for n, v in zip(names, versions)}
    assert algorithms == set(_equipment_of_ours(sr).SoftwareVersions[1:]) == {"nih-densenet@1.2", "pneumonia-resnet@2.0"}

    changed = {
        "newer": (hashed[0], dataclasses.replace(hashed[1], model_version="2.1")),
        "retrained": (hashed[0], dataclasses.replace(hashed[1], weights_sha256="c" * 64)),
        "weights unknown": predictions,
    }
    others = {name: _devices(_outputs(source, models, tmp_path / name)[0]) for name, models in changed.items()}
    assert all(len(d) == 1 for d in others.values()), others
    uids = {device[0]} | {uid for d in others.values() for uid, _ in d}
    serials = {device[1]} | {serial for d in others.values() for _, serial in d}
    assert len(uids) == len(serials) == 4, "a new version, new weights or unknown weights: another device"


def test_instance_numbers_unique_within_each_series(predictions: tuple[Prediction, ...], tmp_path: Path) -> None:
    """Two images of one study: every series holds distinct Instance Numbers, stable on re-processing."""
    first = make_dataset()
    second = make_dataset(study_instance_uid=first.StudyInstanceUID)
    series_uids: set[str] = set()
    for src in (first, second, first):  # the first again: re-processing rewrites the same objects
        del_pixels = pydicom.Dataset(src)
        if "PixelData" in del_pixels:
            del del_pixels.PixelData
        records, _ = _outputs(del_pixels, predictions, tmp_path)
        series_uids.update(r.series_instance_uid for r in records)
    files = set(tmp_path.rglob("*.dcm"))
    for series in series_uids:
        on_disk = [pydicom.dcmread(p).InstanceNumber for p in files if p.parent.name == series]
        assert len(on_disk) == len(set(on_disk)), series
    assert len(files) == 2 * 4  # SC, two maps and SR per image; the re-run added nothing


@pytest.mark.parametrize("bad", ["../../escape", "/tmp/abs", "1.2.3/../../x", "1.02.3", "1." + "2" * 70])
def test_unsafe_uids_never_name_a_file(bad: str, tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.StudyInstanceUID = bad
    ds.SeriesInstanceUID = "1.2.3"
    ds.SOPInstanceUID = "1.2.3.4"
    with pytest.raises(InvalidInputError, match="StudyInstanceUID .*not a valid UID") as info:
        output_path(tmp_path / "outbox", ds)
    assert bad not in str(info.value)


def test_unsafe_source_study_uid_writes_nothing(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    source.StudyInstanceUID = "../../outside"
    outbox = tmp_path / "deep" / "outbox"
    with pytest.raises(InvalidInputError, match="not a valid UID"):
        _outputs(source, predictions, outbox)
    assert not any(tmp_path.rglob("*.dcm"))


def test_identity_is_copied_exactly_even_when_invalid(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    source.PatientID = "X" * 80  # LO allows 64 characters; the PACS still knows the patient by this
    source.PatientBirthDate = "1950-01-01"  # not DA
    records, _ = _outputs(source, predictions, tmp_path)
    for record in records:
        ds = pydicom.dcmread(record.path)
        assert ds.PatientID == "X" * 80, record.kind
        assert ds.PatientBirthDate == "1950-01-01", record.kind


def test_derive_uid_fits_any_root() -> None:
    assert derive_uid("", "a") == derive_uid("", "a") != derive_uid("", "b")
    long_root = "1.2.840.10008.999999.999999.99999.9999"
    uid = derive_uid(long_root, "a")
    assert is_uid(uid) and len(uid) <= 64 and uid.startswith(long_root + ".")


@pytest.mark.parametrize("root", ["1.02.3", "abc", "1..2", "1." + "2" * 45])
def test_uid_root_is_validated_at_start_up(root: str) -> None:
    with pytest.raises(ConfigError, match="uid_root"):
        load_settings(overrides={"output": {"uid_root": root}}, environ={})


def test_sc_encoding_is_validated() -> None:
    with pytest.raises(ConfigError, match="sc_encoding"):
        load_settings(overrides={"output": {"sc_encoding": "png"}}, environ={})
    assert dataclasses.replace(OutputConfig(), sc_encoding="rle").sc_encoding == "rle"
