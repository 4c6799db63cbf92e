"""Tests of xraybatch.writeback: the Secondary Capture, the TID 1500 SR, UIDs and the atomic write.

Every output is round-tripped through the file system and read back with pydicom/highdicom; conformance is
checked with dciodvfy (dicom3tools) on synthetic sources, pydicom's test files and ../shared/data.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from tests import dciodvfy
from tests.synth import make_dataset
from xraybatch import __version__
from xraybatch.domain import DisplayImage, Heatmap, OutputRecord, Prediction
from xraybatch.errors import WriteBackError
from xraybatch.models.findings import (
    BINARY_TARGETS,
    NIH_TARGETS,
    NO_FINDING,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_UID,
    TARGET_CODES,
    label,
)
from xraybatch.settings import OutputConfig
from xraybatch.writeback import build_sc, build_sr, write_outputs
from xraybatch.writeback.common import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    SERIES_DESCRIPTION,
    atomic_write,
    instance_number,
    model_set,
    output_uids,
)
from xraybatch.writeback.sc import COLOURS, findings_text, panel_lines, render
from xraybatch.writeback.sr import disagreements

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
THRESHOLD = 0.5


# --- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture
def source() -> pydicom.Dataset:
    """A synthetic CR chest PA as the pipeline hands it over: every attribute but Pixel Data."""
    ds = make_dataset()
    del ds.PixelData
    return ds


@pytest.fixture
def nih() -> Prediction:
    """The 15-target model; probabilities spread over [0.02, 0.98], one exactly at the threshold."""
    probabilities = np.linspace(0.02, 0.98, len(NIH_TARGETS))
    probabilities[len(NIH_TARGETS) // 2] = THRESHOLD
    return Prediction(
        "nih-densenet", "1.2", NIH_TARGETS, tuple(map(float, probabilities)), (THRESHOLD,) * len(NIH_TARGETS)
    )


@pytest.fixture
def pneumonia() -> Prediction:
    return Prediction("pneumonia-resnet", "2.0", BINARY_TARGETS, (0.83,), (0.6,))


@pytest.fixture
def predictions(nih: Prediction, pneumonia: Prediction) -> tuple[Prediction, ...]:
    return (nih, pneumonia)


def _display(rows: int, cols: int, value: float | None = None) -> DisplayImage:
    """A diagonal gradient, or a constant ``value``, at the source geometry."""
    if value is not None:
        return DisplayImage(np.full((rows, cols), value, np.float32))
    y, x = np.mgrid[0:rows, 0:cols]
    return DisplayImage(((x + y) / (rows + cols)).astype(np.float32))


def _blob(rows: int, cols: int, target: str = "Pneumonia", model: str = "pneumonia-resnet") -> Heatmap:
    """A Gaussian heat map centred on the image."""
    y, x = np.mgrid[0:rows, 0:cols]
    values = np.exp(-(((x / cols - 0.5) ** 2 + (y / rows - 0.5) ** 2) / 0.02)).astype(np.float32)
    return Heatmap(model, target, 0.83, values)


def _write(
    src: pydicom.Dataset, predictions: tuple[Prediction, ...], outbox: Path, cfg: OutputConfig | None = None
) -> dict[str, OutputRecord]:
    records = write_outputs(
        src,
        _display(src.Rows, src.Columns),
        predictions,
        [_blob(src.Rows, src.Columns)],
        cfg or OutputConfig(),
        outbox,
    )
    return {r.kind: r for r in records}


def _dciodvfy_errors(path: Path) -> list[str]:
    return [line for line in dciodvfy.lines(path) if line.startswith("Error")]


def _dciodvfy_warnings_of_ours(path: Path, source: pydicom.Dataset) -> list[str]:
    """dciodvfy warnings about what xraybatch wrote: those about values copied from the source are left out,
    and so are the validator's gaps (tests/dciodvfy.py: Device UID in Contributing Equipment, the declared
    private scheme of the findings that have no standard code)."""
    source_values = {str(e.value) for e in source if e.VR not in ("SQ", "OB", "OW")}
    if not source.get("StudyID"):
        source_values.add("Study ID")  # "needed to build DICOMDIR - Study ID": the source has none
    ours = []
    for line in dciodvfy.findings(path, private_scheme=(PRIVATE_SCHEME, PRIVATE_SCHEME_UID)):
        quoted = set(re.findall(r"<([^>]*)>", line)) | {line.rsplit(" - ", 1)[-1].strip()}
        if not line.startswith("Warning") or quoted & source_values:
            continue  # a value (or a missing value) copied from the source
        if "Person Name" in line:
            continue  # names are copied from the source
        ours.append(line)
    return ours


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent; the shared test data live in ../shared/data beside the repository")
    return path


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is unavailable; install pydicom-data")
    return Path(path)


def _synthetic(tmp_path: Path, **kwargs: Any) -> Path:
    path = tmp_path / "in" / "source.dcm"
    path.parent.mkdir()
    make_dataset(**kwargs).save_as(path, enforce_file_format=True)
    return path


SOURCES = [
    pytest.param(lambda tmp: _synthetic(tmp), id="synthetic-cr"),
    pytest.param(
        lambda tmp: _synthetic(tmp, modality="DX", photometric="MONOCHROME1"), id="synthetic-dx-monochrome1"
    ),
    pytest.param(lambda tmp: _testdata("RG1_UNCI.dcm"), id="pydicom-RG1_UNCI-cr"),
    pytest.param(
        lambda tmp: _shared("dicom/highdicom_test_files/dx_image.dcm"),
        id="shared-dx_image",
        marks=pytest.mark.shared_data,
    ),
    pytest.param(
        lambda tmp: _shared("dicom/torchxrayvision_tests/Fake_MONOHR1.dcm"),
        id="shared-xrv-jpeg-monochrome1",
        marks=pytest.mark.shared_data,
    ),
    pytest.param(
        lambda tmp: _shared(
            "dicom/torchxrayvision_tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
        ),
        id="shared-xrv-jpeg-monochrome2",
        marks=pytest.mark.shared_data,
    ),
]


# --- Secondary Capture -----------------------------------------------------------------------------------------


def test_sc_round_trip(source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path) -> None:
    record = _write(source, predictions, tmp_path, OutputConfig(sc_max_size=512))["sc"]
    sc = pydicom.dcmread(record.path)

    assert (
        record.path == tmp_path / source.StudyInstanceUID / sc.SeriesInstanceUID / f"{sc.SOPInstanceUID}.dcm"
    )
    assert (record.sop_instance_uid, record.series_instance_uid) == (sc.SOPInstanceUID, sc.SeriesInstanceUID)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyDate",
    ):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SOPInstanceUID != source.SOPInstanceUID
    assert sc.SeriesDescription == SERIES_DESCRIPTION
    assert len(sc.SeriesDescription) <= 64
    assert sc.Manufacturer == "xraybatch"
    assert sc.BurnedInAnnotation == "YES"
    assert sc.ConversionType == "WSD"
    assert "Laterality" not in sc, "the source gives no laterality: the SC must not invent (or empty) one"
    assert sc.BodyPartExamined == source.BodyPartExamined
    assert sc.InstanceNumber == instance_number(source, "sc") and sc.InstanceNumber != 1
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert (sc.LossyImageCompression, sc.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert sc.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert sc.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert sc.SOPInstanceUID.startswith("2.25.") and sc.SeriesInstanceUID.startswith("2.25.")
    ref = sc.SourceImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    ours = [e for e in sc.ContributingEquipmentSequence if e.Manufacturer == "xraybatch"]
    assert ours and {f"xraybatch {__version__}", "nih-densenet@1.2", "pneumonia-resnet@2.0"} <= set(
        ours[0].SoftwareVersions
    )
    assert ours[0].DeviceSerialNumber == sc.DeviceSerialNumber
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("YBR_FULL_422", 3, 8)
    pixels = sc.pixel_array
    assert pixels.dtype == np.uint8 and pixels.shape == (sc.Rows, sc.Columns, 3)
    assert sc.Rows > 512 or sc.Columns > 512, "the banner and panel are added around the 512-pixel image"
    top = pixels[:30].astype(int)
    assert ((top[..., 0] > 200) & (top[..., 1] > 150) & (top[..., 2] < 100)).any(), (
        "no yellow banner text at the top"
    )


@pytest.mark.parametrize(("rows", "cols", "max_size"), [(1955, 1841, 1024), (256, 240, 512), (300, 900, 256)])
def _image_part(pixels: np.ndarray, rows: int, cols: int, max_size: int) -> np.ndarray:
    """The radiograph's area of a rendered SC: below the banner band, left of the panel."""
    scale = max_size / max(rows, cols)
    height, width = round(rows * scale), round(cols * scale)
    banner = pixels.shape[0] - height
    return pixels[banner:, :width]


@pytest.mark.parametrize(("rows", "cols", "max_size"), [(1955, 1841, 1024), (256, 240, 512), (300, 900, 256)])
def test_sc_keeps_the_whole_image(rows: int, cols: int, max_size: int, nih: Prediction) -> None:
    """The image part is the whole radiograph at max_size, aspect kept; banner and panel lie outside it."""
    display = _display(rows, cols)
    pixels = render(display, [nih], [], max_size)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    image = _image_part(pixels, rows, cols, max_size)
    assert max(image.shape[:2]) == max_size
    scale = max_size / max(rows, cols)
    expected = cv2.resize(display.pixels, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    assert np.abs(image[..., 0].astype(int) - np.round(expected * 255)).max() <= 1, "text drawn over the image"
    assert pixels.shape[0] > image.shape[0] and pixels.shape[1] > image.shape[1]


def test_sc_banner_is_a_band_above_the_image(nih: Prediction) -> None:
    """On a white image, the rows above it are a dark band holding yellow text; the image stays white."""
    pixels = render(_display(400, 400, value=1.0), [nih], [], 400).astype(int)
    banner = pixels.shape[0] - 400
    assert banner > 10
    band = pixels[:banner]
    assert band.mean() < 120
    yellow = (band[..., 0] > 200) & (band[..., 1] > 150) & (band[..., 2] < 100)
    assert yellow.sum() > 50
    assert (pixels[banner:, :400] == 255).all(), "something is drawn over the image"


def test_sc_heat_fades_in_smoothly(pneumonia: Prediction) -> None:
    rows, cols = 300, 300
    heat = _blob(rows, cols)
    pixels = render(_display(rows, cols, value=0.5), [pneumonia], [heat], 300).astype(int)
    image = _image_part(pixels, rows, cols, 300)
    centre, corner = image[150, 150], image[10, 10]
    assert len(set(centre)) > 1, "the heat map is not blended at the hot spot"
    assert len(set(corner)) == 1, "colour where there is no heat"
    # along a ray from the centre the colour changes in small steps: no hard edge
    ray = image[150, 150:300, 0]
    steps = np.abs(np.diff(ray))
    assert len(set(ray.tolist())) > 10, "the fill has few levels: a hard edge"
    assert (steps >= 20).sum() <= 4, "hard steps beyond the edges of the outline"


def test_sc_each_explained_finding_has_its_colour_and_legend(nih: Prediction, pneumonia: Prediction) -> None:
    rows, cols = 300, 300
    left = Heatmap("pneumonia-resnet", "Pneumonia", 0.83, _shifted_blob(rows, cols, 0.25))
    right = Heatmap("nih-densenet", "Hernia", 0.91, _shifted_blob(rows, cols, 0.75))
    pixels = render(_display(rows, cols, value=0.5), [nih, pneumonia], [left, right], 300).astype(int)
    image = _image_part(pixels, rows, cols, 300)
    a, b = image[150, 75], image[150, 225]
    assert np.abs(a - b).sum() > 60, "two findings share one colour"
    lines = panel_lines([nih, pneumonia], {("pneumonia-resnet", "Pneumonia"): COLOURS[0], ("nih-densenet", "Hernia"): COLOURS[1]})
    swatches = {line.cells[0]: line.swatch for line in lines if line.swatch}
    assert swatches == {"Pneumonia": COLOURS[0], "Hernia": COLOURS[1]}
    # the legend swatch colour is the colour blended onto the image: same hue as the hot spot
    assert np.argmax(a) == np.argmax(COLOURS[0]) and np.argmax(b) == np.argmax(COLOURS[1])
    texts = [" ".join(line.cells) for line in lines]
    assert "Outlined: the 2 most probable positive findings" in texts
    one = [" ".join(line.cells) for line in panel_lines([nih], {("nih-densenet", "Hernia"): COLOURS[0]})]
    assert "Outlined: the most probable positive finding" in one


def _shifted_blob(rows: int, cols: int, cx: float) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return np.exp(-(((x / cols - cx) ** 2 + (y / rows - 0.5) ** 2) / 0.005)).astype(np.float32)


def test_sc_rejects_heatmap_of_other_geometry(pneumonia: Prediction) -> None:
    with pytest.raises(ValueError, match=r"covers an image of \(200, 300\), expected \(300, 300\)"):
        render(_display(300, 300), [pneumonia], [_blob(200, 300)], 256)
    coarse_of_other = dataclasses.replace(_blob(100, 100), source_shape=(300, 200))
    with pytest.raises(ValueError, match="covers an image of"):
        render(_display(300, 300), [pneumonia], [coarse_of_other], 256)


def test_sc_from_a_coarse_heat_map_matches_the_full_one(pneumonia: Prediction) -> None:
    """Heat maps come on the outputs' grid (xraybatch.explain): the SC must look as it does from a full map."""
    rows, cols = 1200, 1000
    full = _blob(rows, cols)
    small = cv2.resize(full.values, (213, 256), interpolation=cv2.INTER_AREA)
    coarse = dataclasses.replace(full, values=small, source_shape=(rows, cols))
    with_full = render(_display(rows, cols), [pneumonia], [full], 512).astype(int)
    with_coarse = render(_display(rows, cols), [pneumonia], [coarse], 512).astype(int)
    without = render(_display(rows, cols), [pneumonia], [], 512).astype(int)
    diff = np.abs(with_full - with_coarse)
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) < 40
    image = (slice(-512, None), slice(0, 427))  # the image part: under the banner, left of the panel
    assert np.abs(with_coarse[image] - without[image]).mean() > 5 * diff.mean() + 1  # the heat is drawn at all


def test_findings_text_lists_every_result(nih: Prediction, pneumonia: Prediction) -> None:
    lines = findings_text([nih, pneumonia])
    assert "nih-densenet 1.2" in lines and "pneumonia-resnet 2.0" in lines
    for target, prob, pos in zip(nih.targets, nih.probabilities, nih.positive):
        expected = f"{label(target)}  {prob:.2f}  0.50  {'POSITIVE' if pos else 'negative'}"
        assert expected in lines, expected
    assert "Pneumonia  0.83  0.60  POSITIVE" in lines


def test_findings_text_shows_a_negative_binary_result() -> None:
    negative = Prediction("pneumonia-resnet", "2.0", BINARY_TARGETS, (0.1,), (0.6,))
    assert findings_text([negative])[1:] == ["pneumonia-resnet 2.0", "Pneumonia  0.10  0.60  negative"]
    assert render(_display(200, 200), [negative], [], 200).shape[0] > 200


def test_disagreement_on_pneumonia_is_stated(nih: Prediction, pneumonia: Prediction) -> None:
    (sentence,) = disagreements([nih, pneumonia])  # NIH Pneumonia 0.43 < 0.5, binary 0.83 >= 0.6
    assert sentence.startswith("The models disagree on Pneumonia:")
    assert "pneumonia-resnet@2.0 0.83 (present" in sentence and "nih-densenet@1.2 0.43 (absent" in sentence
    assert "The result of record is pneumonia-resnet's, the model trained for Pneumonia alone" in sentence
    agreeing = Prediction("pneumonia-resnet", "2.0", BINARY_TARGETS, (0.1,), (0.6,))
    assert disagreements([nih, agreeing]) == []
    assert any("disagree" in line for line in findings_text([nih, pneumonia]))


# --- Structured Report -----------------------------------------------------------------------------------------


def test_sr_round_trip(source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path) -> None:
    record = _write(source, predictions, tmp_path)["sr"]
    sr = hd.sr.srread(record.path)

    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesDescription == SERIES_DESCRIPTION
    assert sr.Manufacturer == "xraybatch"
    assert f"xraybatch {__version__}" in sr.SoftwareVersions
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert (scheme.CodingSchemeDesignator, scheme.CodingSchemeUID) == (PRIVATE_SCHEME, PRIVATE_SCHEME_UID)
    assert scheme.CodingSchemeName and scheme.CodingSchemeResponsibleOrganization
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.InstanceNumber == instance_number(source, "sr")
    assert sr.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID

    groups = sr.content.get_image_measurement_groups()
    expected = [
        (p, t, prob, pos) for p in predictions for t, prob, pos in zip(p.targets, p.probabilities, p.positive)
    ]
    assert len(groups) == len(expected) == len(NIH_TARGETS) + 1
    for group, (prediction, target, probability, positive) in zip(groups, expected):
        if target == NO_FINDING:
            assert group.finding_type is None, "No Finding is a statement, not a finding"
            statements = group.get_qualitative_evaluations(name=codes.DCM.Impression)
            assert [e.value for e in statements] == ([codes.DCM.NoAbnormality] if positive else [])
            continue
        code = TARGET_CODES[target]
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (code.value, code.scheme)
        assert group.tracking_identifier == f"{prediction.model_name}@{prediction.model_version}/{target}"
        (measurement,) = group.get_measurements(name=codes.DCM.Probability)
        assert measurement.value == pytest.approx(probability, abs=5e-5)
        assert measurement.unit == codes.UCUM.NoUnits
        (threshold,) = group.get_measurements(name=codes.DCM.ThresholdValue)
        assert threshold.value == pytest.approx(prediction.thresholds[0])
        (evaluation,) = group.get_qualitative_evaluations(name=group.finding_type)
        assert evaluation.value == (codes.SCT.Present if positive else codes.SCT.Absent), target
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
    # the probability equal to its threshold counts as present
    present = [
        g
        for g in groups
        if g.finding_type is not None
        and g.get_qualitative_evaluations(name=g.finding_type)[0].value == codes.SCT.Present
    ]
    assert len(present) == sum(predictions[0].positive) - predictions[0].positive[-1] + 1
    comments = [i.TextValue for i in _qualitative_container(sr).ContentSequence]
    assert comments[0].startswith("AI generated - not for diagnostic use")
    assert any(c.startswith("The models disagree on Pneumonia") for c in comments)


def _encoded_undated(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a Part 10 file, its dates and times (of creation) blanked first, for byte comparisons."""
    import io

    ds.walk(lambda _, element: setattr(element, "value", "") if element.VR in ("DA", "TM", "DT") else None)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_sr_is_the_document_highdicom_builds_from_the_whole_tree(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_sr hands highdicom the report's root without its items and attaches them after (the constructor's
    copy and search of the tree cost two thirds of the build): the document, evidence included, is the one
    highdicom makes from the whole tree, byte for byte but for the dates and times of creation."""
    from xraybatch.writeback import build_pm
    from xraybatch.writeback import sr as sr_module

    rows, cols = source.Rows, source.Columns
    sc = build_sc(source, _display(rows, cols), predictions, [_blob(rows, cols)], OutputConfig())
    pm = build_pm(source, _blob(rows, cols), predictions, OutputConfig())
    fast = build_sr(source, predictions, OutputConfig(), [sc, pm])
    monkeypatch.setattr(sr_module, "_without_items", lambda root: root)  # highdicom gets, checks the whole tree
    whole = build_sr(source, predictions, OutputConfig(), [sc, pm])
    assert len(fast.ContentSequence) == len(whole.ContentSequence) > 3
    assert {i.ReferencedSOPInstanceUID for e in fast.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence} == {
        source.SOPInstanceUID, sc.SOPInstanceUID, pm.SOPInstanceUID}
    assert _encoded_undated(fast) == _encoded_undated(whole)
    assert not hasattr(fast, "content")  # a plain dataset: no parsed copy of the tree to go stale


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_sr_encoded_the_same_with_its_content_marked_as_encoded(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], charset: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """build_sr marks its content items as already in the SR's encoding, so that pydicom's writer does not run
    its ambiguous-VR correction again at every level of the tree: the file written is the same, byte for byte,
    whatever the source's character set (non-ASCII names included)."""
    import io

    from xraybatch.writeback import sr as sr_module

    if charset:
        source.SpecificCharacterSet = charset
        source.PatientName = "Müller^Jürgen" if charset == "ISO_IR 100" else "Ωμέγα^Δέλτα"
        source.InstitutionName = "Klinikum Süd"
    marked = build_sr(source, predictions, OutputConfig())
    monkeypatch.setattr(sr_module, "_as_encoded", lambda items: None)
    unmarked = build_sr(source, predictions, OutputConfig())
    encoded = _encoded_undated(marked)
    assert encoded == _encoded_undated(unmarked)
    assert pydicom.dcmread(io.BytesIO(encoded)).PatientName == source.PatientName


def test_sr_items_shared_between_reports_are_those_built_anew(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_sr builds the items that depend only on a target, its threshold and its result once per process
    and shares them between reports: a report is the same, byte for byte, as one built with items of its own,
    and a later report with the opposite results leaves it as it was and gets its own results."""
    from xraybatch.writeback import sr as sr_module

    first = build_sr(source, predictions, OutputConfig())
    encoded = _encoded_undated(first)
    other = copy.deepcopy(source)
    other.SOPInstanceUID = source.SOPInstanceUID + ".2"
    flipped = tuple(
        dataclasses.replace(p, probabilities=tuple(t + (0.2 if not pos else -0.2) for t, pos in zip(p.thresholds, p.positive)))
        for p in predictions
    )
    second = hd.sr.Comprehensive3DSR.from_dataset(build_sr(other, flipped, OutputConfig()))
    assert _encoded_undated(first) == encoded
    for group, (target, positive) in zip(
        second.content.get_image_measurement_groups(),
        [(t, pos) for p in flipped for t, pos in zip(p.targets, p.positive)],
    ):
        if target == NO_FINDING:
            continue
        (evaluation,) = group.get_qualitative_evaluations(name=group.finding_type)
        assert evaluation.value == (codes.SCT.Present if positive else codes.SCT.Absent), target
    for name in ("_finding_type", "_threshold", "_evaluations"):  # the same functions, without their cache
        monkeypatch.setattr(sr_module, name, getattr(sr_module, name).__wrapped__)
    assert _encoded_undated(build_sr(source, predictions, OutputConfig())) == encoded


def test_highdicom_iod_lookups_are_remembered_and_answer_as_before() -> None:
    """Importing the write-back gives every highdicom module that uses ``is_attribute_in_iod`` one cached
    function, which answers each question as highdicom's own does and looks it up once."""
    from highdicom import _standard_utils, base
    from highdicom.sr import content

    cached = _standard_utils.is_attribute_in_iod
    original = cached.__wrapped__
    assert base.is_attribute_in_iod is cached and content.is_attribute_in_iod is cached
    cr, pm, sr = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.88.34"
    questions = [
        ("PixelData", cr, ["IconImageSequence"]),  # True
        ("NumberOfFrames", cr, None),  # False: CR is a single-frame IOD
        ("NumberOfFrames", pm, None),  # True
        ("FloatPixelData", pm, ["IconImageSequence"]),  # True
        ("PixelData", sr, ["IconImageSequence"]),  # False
        ("ContentDate", sr, None),  # True
    ]
    answers = [original(a, uid, exclude) for a, uid, exclude in questions]
    assert answers == [True, False, True, True, False, True]
    assert [cached(a, uid, exclude) for a, uid, exclude in questions] == answers
    cached.cached.cache_clear()
    for _ in range(3):
        assert cached("NumberOfFrames", pm) is True
    info = cached.cached.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def _qualitative_container(sr: pydicom.Dataset) -> pydicom.Dataset:
    (container,) = [
        item
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    ]
    return container


def test_sr_tracking_uids_unique(source: pydicom.Dataset, predictions: tuple[Prediction, ...]) -> None:
    sr = build_sr(source, predictions, OutputConfig())
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    uids = {g.tracking_uid for g in groups}
    assert len(uids) == len(groups) == len(NIH_TARGETS) + 1


def test_sr_names_algorithm_per_group(source: pydicom.Dataset, pneumonia: Prediction) -> None:
    sr = build_sr(source, [pneumonia], OutputConfig())
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"]
    group = measurements.ContentSequence[0]
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in group.ContentSequence
        if item.ValueType == "TEXT"
    }
    assert texts["Algorithm Name"] == "pneumonia-resnet"
    assert texts["Algorithm Version"] == "2.0"


def test_unknown_target_is_a_write_back_error(source: pydicom.Dataset, tmp_path: Path) -> None:
    odd = Prediction("odd-model", "1", ("Fracture",), (0.9,), (0.5,))
    with pytest.raises(WriteBackError, match="TARGET_CODES") as info:
        write_outputs(source, _display(source.Rows, source.Columns), [odd], [], OutputConfig(), tmp_path)
    assert isinstance(info.value.__cause__, ValueError)


def test_invalid_source_value_is_left_empty(
    source: pydicom.Dataset,
    pneumonia: Prediction,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    source.PatientAge = "62"  # as found in real files; AS wants "062Y", and highdicom would copy it verbatim
    caplog.set_level("INFO", logger="xraybatch.writeback")
    sr = build_sr(source, [pneumonia], OutputConfig())
    assert sr.PatientAge in (None, "")
    assert source.PatientAge == "62", "the caller's dataset must not change"
    (message,) = [r.getMessage() for r in caplog.records if r.name.startswith("xraybatch")]
    assert "PatientAge" in message and "62" not in message


# --- UIDs, determinism, flags -------------------------------------------------------------------------------------


def test_rerun_overwrites_with_same_uids(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path
) -> None:
    first = _write(source, predictions, tmp_path)
    second = _write(source, predictions, tmp_path)
    assert first == second
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        r.path.relative_to(tmp_path) for r in first.values()
    )


def test_uids_derive_from_source_and_model_set(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...]
) -> None:
    assert model_set(predictions) == "nih-densenet@1.2,pneumonia-resnet@2.0"
    assert model_set(predictions[::-1]) == model_set(predictions)
    sc, sr = output_uids(source, "sc", predictions), output_uids(source, "sr", predictions)
    assert sc != sr
    sibling = make_dataset(study_instance_uid=source.StudyInstanceUID)
    assert output_uids(sibling, "sc", predictions).series_instance_uid == sc.series_instance_uid
    assert output_uids(sibling, "sc", predictions).sop_instance_uid != sc.sop_instance_uid
    newer = (predictions[0], Prediction("pneumonia-resnet", "2.1", BINARY_TARGETS, (0.83,), (0.6,)))
    assert output_uids(source, "sc", newer).sop_instance_uid != sc.sop_instance_uid
    built = build_sc(source, _display(source.Rows, source.Columns), predictions, [], OutputConfig())
    assert built.SOPInstanceUID == sc.sop_instance_uid


@pytest.mark.parametrize(("sc_on", "sr_on"), [(True, True), (True, False), (False, True), (False, False)])
def test_output_flags(
    sc_on: bool, sr_on: bool, source: pydicom.Dataset, pneumonia: Prediction, tmp_path: Path
) -> None:
    cfg = OutputConfig(secondary_capture=sc_on, structured_report=sr_on, sc_max_size=256)
    records = _write(source, (pneumonia,), tmp_path, cfg)
    assert set(records) == {k for k, on in (("sc", sc_on), ("pm", True), ("sr", sr_on)) if on}
    no_maps = _write(source, (pneumonia,), tmp_path / "no-maps", dataclasses.replace(cfg, parametric_map=False))
    assert "pm" not in no_maps


# --- atomic write ----------------------------------------------------------------------------------------------


def test_atomic_write_leaves_no_temp_file(
    source: pydicom.Dataset, pneumonia: Prediction, tmp_path: Path
) -> None:
    ds = build_sr(source, [pneumonia], OutputConfig())
    path = tmp_path / "a" / "b" / "out.dcm"
    atomic_write(ds, path)
    atomic_write(ds, path)
    assert [p.name for p in path.parent.iterdir()] == ["out.dcm"]
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def test_atomic_write_unwritable_folder(
    source: pydicom.Dataset, pneumonia: Prediction, tmp_path: Path
) -> None:
    blocker = tmp_path / "outbox"
    blocker.write_text("a file where the outbox folder should be")
    ds = build_sr(source, [pneumonia], OutputConfig())
    with pytest.raises(WriteBackError, match="outbox folder") as info:
        atomic_write(ds, blocker / "study" / "out.dcm")
    assert isinstance(info.value.__cause__, OSError)


def test_atomic_write_cleans_temp_file_on_error(
    source: pydicom.Dataset, pneumonia: Prediction, tmp_path: Path
) -> None:
    """The replace fails (the destination is a folder) after the temporary file was written."""
    path = tmp_path / "out.dcm"
    path.mkdir()
    with pytest.raises(WriteBackError, match="could not write"):
        atomic_write(build_sr(source, [pneumonia], OutputConfig()), path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]


def test_write_outputs_wraps_os_errors(
    source: pydicom.Dataset, pneumonia: Prediction, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    outbox.write_text("not a folder")
    with pytest.raises(WriteBackError, match="writable"):
        _write(source, (pneumonia,), outbox)


# --- conformance -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("make_source", SOURCES)
def test_dciodvfy_reports_no_errors(
    make_source: Callable[[Path], Path], predictions: tuple[Prediction, ...], tmp_path: Path
) -> None:
    src = pydicom.dcmread(make_source(tmp_path), stop_before_pixels=True)
    records = _write(src, predictions, tmp_path / "outbox")
    assert set(records) == {"sc", "pm", "sr"}
    for record in records.values():
        assert _dciodvfy_errors(record.path) == [], record.kind
        assert _dciodvfy_warnings_of_ours(record.path, src) == [], record.kind


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_private_scheme_lines_are_its_declaration_and_uses(
    source: pydicom.Dataset, predictions: tuple[Prediction, ...], tmp_path: Path
) -> None:
    """dciodvfy reports the declared private scheme once per place its designator is written (the Coding Scheme
    Identification Sequence, then the Finding Type and the evaluation's name of each group that uses it) and
    once for its UID; it does not read the declaration. Nothing else in the SR is reported about it."""
    path = _write(source, predictions, tmp_path)["sr"].path
    sr = pydicom.dcmread(path)
    written = [e for e in sr.iterall() if e.keyword == "CodingSchemeDesignator" and e.value == PRIVATE_SCHEME]
    groups = [t for p in predictions for t in p.targets if TARGET_CODES[t].scheme == PRIVATE_SCHEME]
    assert groups and len(written) == 1 + 2 * len(groups)
    lines = dciodvfy.lines(path)
    term = "Warning - Unrecognized defined term <{}> for value 1 of attribute <{}>"
    assert [ln for ln in lines if f"<{PRIVATE_SCHEME}>" in ln] == [
        term.format(PRIVATE_SCHEME, "Coding Scheme Designator")
    ] * len(written)
    assert [ln for ln in lines if f"<{PRIVATE_SCHEME_UID}>" in ln] == [
        term.format(PRIVATE_SCHEME_UID, "Coding Scheme UID")
    ]
