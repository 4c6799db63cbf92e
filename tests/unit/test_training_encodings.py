"""The same picture in every encoding: known stored values, the pipeline's reading of them, and the model input.

The equalised model input of a lossless encoding, read as the pipeline reads it (``ingest.read_header`` /
``read``), equals the input training makes from the 8-bit picture (``model_input_8bit``) within 1e-6; lossy
JPEG stays within a measured bound; the legacy display preprocessing does not (the test tells them apart).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.synth import chest_pixels
from training.encodings import ENCODINGS, REFERENCE, encode, encoding, write_encodings
from training.synthetic import chest_picture
from xraybatch import ingest, preprocess
from xraybatch.domain import XrayImage
from xraybatch.models.registry import ModelPreprocess
from xraybatch.settings import IngestConfig

SIZE = (224, 224)
EQUALISE = ModelPreprocess("equalise")
DISPLAY = ModelPreprocess("display")
LOSSLESS = [e for e in ENCODINGS if e.lossless]
# JPEG baseline q90 of the synthetic pictures (512 and 600x560 px), measured with the model input resampled
# before it is ranked: an equalised input pixel moves by at most 0.12 and by about 0.01 on average (ranking
# amplifies JPEG noise in flat regions). The bounds leave a little room over those measurements.
JPEG_MAX, JPEG_MEAN = 0.15, 0.012


def _pictures() -> dict[str, np.ndarray]:
    return {
        "chest_picture": chest_picture(512, True, np.random.default_rng(3)),
        "chest_pixels": chest_pixels(600, 560, bits=8, seed=1).astype(np.uint8),
    }


@pytest.fixture(scope="module", params=sorted(_pictures()))
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[np.ndarray, dict[str, tuple[Path, str]]]:
    picture = _pictures()[request.param]
    return picture, write_encodings(picture, tmp_path_factory.mktemp("enc"), "pic")


def _read(path: Path) -> XrayImage:
    """As the pipeline reads a file: header, selection, image checks, then the pixels."""
    cfg = IngestConfig()
    header, ds = ingest.read_header(path, cfg)
    ingest.select(header, cfg)
    ingest.check_image(header, ds, cfg)
    return ingest.read(header)


def test_stored_value_maps_are_the_documented_ones() -> None:
    v = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    assert encoding("mono2-8bit").stored(v).tolist() == [[0, 1, 128, 255]]
    assert encoding("mono1-12bit-window").stored(v).tolist() == [[4095, 4079, 2047, 15]]
    assert encoding("mono2-16bit-rescale-voilut").stored(v).tolist() == [[128, 384, 32896, 65408]]
    assert encoding("mono1-15bit-j2k").stored(v).tolist() == [[32767, 32639, 16383, 127]]
    assert encoding("mono2-10bit-jpegls-window").stored(v).tolist() == [[2, 6, 514, 1022]]
    with pytest.raises(ValueError, match="unknown encoding"):
        encoding("mono3")


def test_headers_are_frontal_chest_cr_with_fresh_uids(written: tuple[np.ndarray, dict[str, tuple[Path, str]]]
                                                      ) -> None:
    picture, files = written
    datasets = {name: dcmread(path) for name, (path, _) in files.items()}
    assert list(datasets) == [e.name for e in ENCODINGS]
    for enc in ENCODINGS:
        ds = datasets[enc.name]
        assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("CR", "CHEST", "PA")
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1" and ds.file_meta.TransferSyntaxUID == enc.syntax
        assert (ds.PhotometricInterpretation, ds.BitsStored) == (enc.photometric, enc.bits_stored)
        assert (ds.Rows, ds.Columns) == picture.shape
        assert str(ds.SOPInstanceUID) == files[enc.name][1]
        assert ("LossyImageCompression" in ds) == (not enc.lossless)
    assert len({str(d.SOPInstanceUID) for d in datasets.values()}) == len(ENCODINGS)
    assert len({str(d.SeriesInstanceUID) for d in datasets.values()}) == len(ENCODINGS)
    assert len({str(d.StudyInstanceUID) for d in datasets.values()}) == 1
    lossy = datasets["mono2-8bit-jpeg90"]
    assert lossy.LossyImageCompression == "01" and lossy.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(lossy.LossyImageCompressionRatio) > 1
    window = datasets["mono1-12bit-window"]
    assert (float(window.WindowCenter), float(window.WindowWidth)) == (2048.0, 4096.0)
    lut = datasets["mono2-16bit-rescale-voilut"]
    assert (float(lut.RescaleSlope), float(lut.RescaleIntercept)) == (0.5, 100.0)
    assert list(lut.VOILUTSequence[0].LUTDescriptor) == [32641, 164, 16]  # modality 164..32804, 16-bit entries


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_files_pass_dciodvfy(written: tuple[np.ndarray, dict[str, tuple[Path, str]]]) -> None:
    for name, (path, _) in written[1].items():
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        problems = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("Error", "Warning"))]
        assert problems == [], name


@pytest.mark.parametrize("enc", LOSSLESS, ids=lambda e: e.name)
def test_lossless_files_decode_to_the_stored_values(
        enc: object, written: tuple[np.ndarray, dict[str, tuple[Path, str]]]) -> None:
    picture, files = written
    image = _read(files[enc.name][0])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(image.pixels, enc.stored(picture))  # type: ignore[attr-defined]


@pytest.mark.parametrize("enc", LOSSLESS, ids=lambda e: e.name)
def test_lossless_encodings_give_the_training_model_input(
        enc: object, written: tuple[np.ndarray, dict[str, tuple[Path, str]]]) -> None:
    picture, files = written
    expected = preprocess.model_input_8bit(picture, EQUALISE, SIZE)
    got = preprocess.model_input(_read(files[enc.name][0]), EQUALISE, SIZE)  # type: ignore[attr-defined]
    assert got.pixels.shape == SIZE and got.source_shape == picture.shape
    np.testing.assert_allclose(got.pixels, expected.pixels, rtol=0, atol=1e-6)
    assert float(got.pixels.std()) > 0.1  # a real picture, not a constant that would match anything


def test_lossy_jpeg_stays_within_the_measured_bound(written: tuple[np.ndarray, dict[str, tuple[Path, str]]]) -> None:
    picture, files = written
    expected = preprocess.model_input_8bit(picture, EQUALISE, SIZE).pixels
    image = _read(files["mono2-8bit-jpeg90"][0])
    assert not np.array_equal(image.pixels, picture)  # lossy: the stored values did change
    diff = np.abs(preprocess.model_input(image, EQUALISE, SIZE).pixels - expected)
    assert 0 < float(diff.max()) <= JPEG_MAX and float(diff.mean()) <= JPEG_MEAN


def test_legacy_display_preprocessing_is_not_invariant(written: tuple[np.ndarray, dict[str, tuple[Path, str]]]
                                                       ) -> None:
    """The format-1 "display" input follows each file's window: the check above would catch it."""
    picture, files = written
    expected = preprocess.model_input_8bit(picture, DISPLAY, SIZE).pixels
    diffs = {enc.name: float(np.abs(preprocess.model_input(_read(files[enc.name][0]), DISPLAY, SIZE).pixels
                                    - expected).max()) for enc in LOSSLESS}
    assert diffs[REFERENCE.name] <= 1e-6  # the 8-bit file without VOI is the training picture
    assert diffs["mono1-12bit-window"] > 0.05  # a full-range window instead of the percentile window
    assert diffs["mono2-16bit-rescale-voilut"] > 0.05


def test_encode_refuses_what_is_not_an_8bit_picture() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        encode(np.zeros((4, 4), dtype=np.uint16), REFERENCE)
    with pytest.raises(ValueError, match="view"):
        encode(np.zeros((4, 4), dtype=np.uint8), REFERENCE, view="LL")
