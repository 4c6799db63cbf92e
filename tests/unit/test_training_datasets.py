"""Loaders of the three layouts, the shared preprocessing path and the input cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import datasets
from training.datasets import detect_layout, kermany_patient_id, load_inputs, model_input, scan
from training.synthetic import chest_picture, write_dicom_folder, write_kermany, write_nih
from xraybatch.models.findings import NIH_TARGETS
from xraybatch.models.registry import ModelPreprocess
from xraybatch.preprocess import model_input_8bit


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("person17_virus_48.jpeg", "person17"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-1427-0001.jpeg", "IM-1427"),
        ("odd-name.jpeg", "file:odd-name"),
    ],
)
def test_kermany_patient_id(name: str, patient: str) -> None:
    assert kermany_patient_id(name) == patient


def test_scan_kermany(tmp_path: Path) -> None:
    write_kermany(tmp_path, per_class=6, splits=("train", "val"))
    train = scan(tmp_path, "auto", "train")
    assert train.layout == "kermany" and train.targets == ("Pneumonia",)
    assert len(train.samples) == 13  # 6 + 6 + one duplicate
    labels = train.labels()[:, 0]
    assert labels.sum() == 6 and (labels == 0).sum() == 7
    assert {s.patient_id for s in train.samples if s.labels == (1,)} == {"person0", "person1", "person2"}
    dup = next(s for s in train.samples if s.path.name == "IM-9000-0001.jpeg")
    assert sum(s.sha256 == dup.sha256 for s in train.samples) == 2
    val = scan(tmp_path, "kermany", "val")
    assert len(val.samples) == 12 and not {s.path for s in val.samples} & {s.path for s in train.samples}


def test_scan_kermany_missing_class(tmp_path: Path) -> None:
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(ValueError, match="PNEUMONIA"):
        scan(tmp_path, "kermany", "train")


def test_scan_nih(tmp_path: Path) -> None:
    write_nih(tmp_path, patients=8)
    assert detect_layout(tmp_path) == "nih"
    train_val = scan(tmp_path, "auto", "train")
    test = scan(tmp_path, "nih", "test")
    assert train_val.targets == NIH_TARGETS
    assert len(train_val.samples) == 10  # 6 train_val patients x 2, minus absent patient 3
    assert len(test.samples) == 4
    assert not {s.patient_id for s in train_val.samples} & {s.patient_id for s in test.samples}
    by_name = {s.path.name: s for s in train_val.samples}
    labels = dict(zip(NIH_TARGETS, by_name["00000001_001.png"].labels))  # (1 + 1) % 4 -> Pneumonia|Infiltration
    assert labels["Pneumonia"] == 1 and labels["Infiltration"] == 1 and labels["No Finding"] == 0
    assert sum(train_val.labels()[:, NIH_TARGETS.index("No Finding")]) > 0


def test_scan_dicom_folder(tmp_path: Path) -> None:
    write_dicom_folder(tmp_path, per_class=4)
    images = scan(tmp_path)
    assert images.layout == "dicom" and len(images.samples) == 8
    assert images.labels()[:, 0].sum() == 4
    # The rows with an empty patient_id fall back to the file's PatientID.
    assert {s.patient_id for s in images.samples} == {"dicom:P0000", "dicom:P0001", "dicom:P1000", "dicom:P1001"}


def test_scan_dicom_folder_bad_label(tmp_path: Path) -> None:
    write_dicom_folder(tmp_path, per_class=1)
    text = (tmp_path / "labels.csv").read_text().replace("PNEUMONIA", "maybe")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(ValueError, match="'maybe' is not 0/1"):
        scan(tmp_path, "dicom")


def test_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot tell the layout"):
        scan(tmp_path)


def test_jpeg_and_dicom_share_the_inference_transform(tmp_path: Path) -> None:
    """A training JPEG/PNG and the same pixels as DICOM give the inference function's exact output."""
    cfg = ModelPreprocess()
    write_dicom_folder(tmp_path / "dcm", per_class=1, size=40)
    dcm = min((tmp_path / "dcm").glob("*.dcm"))
    import pydicom

    pixels = pydicom.dcmread(dcm).pixel_array
    png = tmp_path / "same.png"
    Image.fromarray(pixels).save(png)
    expected = model_input_8bit(pixels, cfg, (32, 32)).pixels
    np.testing.assert_array_equal(model_input(png, cfg, (32, 32)), expected)
    np.testing.assert_array_equal(model_input(dcm, cfg, (32, 32)), expected)


def test_rgb_jpeg_goes_through_grey(tmp_path: Path) -> None:
    cfg = ModelPreprocess()
    grey = chest_picture(48, True, np.random.default_rng(1))
    path = tmp_path / "rgb.png"
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    expected = model_input_8bit(grey, cfg, (24, 24)).pixels
    np.testing.assert_array_equal(model_input(path, cfg, (24, 24)), expected)


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_kermany(tmp_path / "data", per_class=4)
    images = scan(tmp_path / "data")
    first = load_inputs(images, ModelPreprocess(), (32, 32), tmp_path / "cache")
    assert first.shape == (len(images.samples), 32, 32) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0

    def no_decoding(*args: object) -> np.ndarray:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(datasets, "model_input", no_decoding)
    np.testing.assert_array_equal(load_inputs(images, ModelPreprocess(), (32, 32), tmp_path / "cache"), first)
    # Other preprocessing settings are another cache entry.
    with pytest.raises(AssertionError, match="decoded"):
        load_inputs(images, ModelPreprocess(contrast="display"), (32, 32), tmp_path / "cache")


def test_the_jpeg_quality_of_the_training_pictures_is_read_off_their_tables(tmp_path: Path) -> None:
    """Pictures that are all JPEG files of one quality at the model's size give that quality; anything else 0."""
    write_kermany(tmp_path / "k", per_class=4, size=48)
    kermany = scan(tmp_path / "k", "kermany", "train")
    for sample in kermany.samples:  # store every picture again at quality 60
        Image.open(sample.path).convert("L").save(sample.path, format="JPEG", quality=60)
    assert datasets.jpeg_quality_of(kermany, (48, 48)) == 60
    assert datasets.jpeg_quality_of(kermany, (32, 32)) == 0  # another size: resampling blurs the artefacts away
    Image.open(kermany.samples[1].path).save(kermany.samples[1].path, format="JPEG", quality=90)
    assert datasets.jpeg_quality_of(kermany, (48, 48)) == 0  # two qualities
    write_nih(tmp_path / "n", patients=4)
    assert datasets.jpeg_quality_of(scan(tmp_path / "n", "nih", "train"), (32, 32)) == 0  # PNG: lossless
    write_dicom_folder(tmp_path / "d", per_class=2)
    assert datasets.jpeg_quality_of(scan(tmp_path / "d"), (48, 48)) == 0


def test_the_shipped_binary_bundle_has_the_jpeg_quality_of_its_training_pictures() -> None:
    from tests.conftest import shared_file
    from xraybatch.models.registry import read_bundle

    root = shared_file("kermany")  # skips with its reason where the shared data is absent
    spec = read_bundle(Path(__file__).resolve().parents[2] / "xraybatch" / "bundles" / "pneumonia-binary")
    assert datasets.jpeg_quality_of(scan(root, "kermany", "train"), spec.input.size) == spec.preprocess.jpeg_quality == 75


def test_training_batches_are_the_same_made_by_workers_or_in_this_process() -> None:
    """The re-encoded training batches (what fit() trains on) do not depend on the DataLoader workers that make
    them: each batch draws its randomness from (seed, epoch, step) alone."""
    import functools

    from training.train import _reencoded
    from training.transforms import ReencodeConfig

    rng = np.random.default_rng(3)
    inputs = rng.random((12, 40, 40), dtype=np.float32)
    batches = [np.array([0, 5, 7]), np.array([1, 2]), np.array([11, 3, 4, 9]), np.array([6, 8])]
    step = functools.partial(_reencoded, cfg=ReencodeConfig(probability=1.0, jpeg=1.0), seed=20240601, epoch=2,
                             jpeg_quality=75)
    here = list(datasets.iter_batches(inputs, batches, workers=0, transform=step))
    workers = list(datasets.iter_batches(inputs, batches, workers=2, transform=step))
    assert [idx.tolist() for idx, _ in workers] == [b.tolist() for b in batches]
    for (_, a), (_, b), idx in zip(here, workers, batches, strict=True):
        assert a.shape == (len(idx), 40, 40)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, inputs[idx])  # the transform ran
    other_epoch = functools.partial(step.func, **{**step.keywords, "epoch": 3})
    assert not np.array_equal(next(datasets.iter_batches(inputs, batches, 0, transform=other_epoch))[1], here[0][1])
