"""Known pixel values through modality LUT, VOI (window or LUT), percentile window and MONOCHROME1 inversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from tests.conftest import shared_file
from tests.synth import make_dataset
from xraybatch import ingest, preprocess
from xraybatch.domain import DisplayImage, InstanceHeader, XrayImage
from xraybatch.errors import InvalidInputError
from xraybatch.models.registry import ModelPreprocess
from xraybatch.settings import IngestConfig, PreprocessConfig

CFG = PreprocessConfig()
RAMP = np.array([[0, 100, 200, 300]], dtype=np.uint16).repeat(4, axis=0)


def _image(ds: Dataset, pixels: np.ndarray) -> XrayImage:
    header = InstanceHeader(
        path=Path("mem"), sop_instance_uid="1.2", sop_class_uid="1.2", study_instance_uid="1.2",
        series_instance_uid="1.2", accession_number="", patient_id="", modality="CR", body_part="CHEST",
        view_position="PA", photometric_interpretation=ds.PhotometricInterpretation,
        rows=pixels.shape[0], columns=pixels.shape[1], transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    return XrayImage(header=header, dataset=ds, pixels=pixels)


def _window(photometric: str, **attrs: object) -> DisplayImage:
    ds = make_dataset(RAMP, photometric=photometric, bits_stored=12, **attrs)
    return preprocess.to_display(_image(ds, RAMP), CFG)


def test_rescale_then_linear_window() -> None:
    # Modality LUT: 2 * stored -> [0, 200, 400, 600]. LINEAR window c=300, w=401 (PS3.3 C.11.2.1.2.1):
    # y = ((x - 299.5) / 400 + 0.5), clipped to [0, 1].
    out = _window("MONOCHROME2", RescaleSlope=2, RescaleIntercept=0, WindowCenter=300, WindowWidth=401)
    np.testing.assert_allclose(out.pixels[0], [0.0, 0.25125, 0.75125, 1.0], atol=1e-6)
    assert "rescale slope/intercept applied" in out.notes and "window center/width applied" in out.notes


def test_monochrome1_is_inverted_after_voi() -> None:
    out = _window("MONOCHROME1", RescaleSlope=2, RescaleIntercept=0, WindowCenter=300, WindowWidth=401)
    np.testing.assert_allclose(out.pixels[0], [1.0, 0.74875, 0.24875, 0.0], atol=1e-6)
    assert out.notes[-1] == "MONOCHROME1 inverted"


def test_voi_lut_sequence_preferred() -> None:
    ds = make_dataset(RAMP, bits_stored=12, WindowCenter=150, WindowWidth=300)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]  # 4 entries, first input value 0, 8-bit output
    item.LUTData = [0, 51, 102, 255]
    ds.VOILUTSequence = [item]
    lut_ramp = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    out = preprocess.to_display(_image(ds, lut_ramp), CFG)
    np.testing.assert_allclose(out.pixels[0], [0.0, 0.2, 0.4, 1.0], atol=1e-6)
    assert "VOI LUT applied" in out.notes


@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_voi_lut_sequence_after_rescale(slope: float) -> None:
    # Rescale makes float modality values (even slope 1, intercept 0 does); the VOI LUT maps them all the same.
    stored = np.array([[0, 2, 4, 6]], dtype=np.uint16).repeat(4, axis=0)
    ds = make_dataset(stored, bits_stored=12, RescaleSlope=slope, RescaleIntercept=10)
    item = Dataset()
    item.LUTDescriptor = [7, 10, 8]  # 7 entries, first input value 10, 8-bit output
    item.LUTData = [0, 51, 51, 102, 102, 204, 255]
    ds.VOILUTSequence = [item]
    out = preprocess.to_display(_image(ds, stored), CFG)
    expected = {1.0: [0.0, 0.2, 0.4, 1.0], 0.5: [0.0, 0.2, 0.2, 0.4]}[slope]
    np.testing.assert_allclose(out.pixels[0], expected, atol=1e-6)
    assert "VOI LUT applied" in out.notes


def test_percentile_window_without_voi() -> None:
    pixels = np.arange(1000, dtype=np.uint16).reshape(25, 40)
    out = preprocess.to_display(_image(make_dataset(pixels), pixels), CFG)
    low, high = np.percentile(pixels, [0.5, 99.5])  # 4.995 and 994.005
    np.testing.assert_allclose(out.pixels.ravel()[[0, 500, 999]], [0.0, (500 - low) / (high - low), 1.0], atol=1e-6)
    assert out.notes == ("no VOI in file: percentile window 0.5-99.5",)


def _voi_lut(entries: int, first: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, first, 16]
    item.LUTData = [int(v) for v in np.linspace(0, 65535, entries) ** 1.5 / 65535 ** 0.5]
    return item


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("case", ["window", "rescale+window", "sigmoid", "voi-lut", "no-voi", "rescale+no-voi",
                                  "signed", "8-bit"])
def test_the_display_is_computed_per_stored_value_exactly(
    case: str, photometric: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """to_display runs the LUTs once per distinct stored value and expands the result: pixel for pixel the
    same as running them on every pixel (the path a non-integer image takes)."""
    rng = np.random.default_rng(len(case))
    dtype, bits = {"signed": (np.int16, 16), "8-bit": (np.uint8, 8)}.get(case, (np.uint16, 12))
    low, high = (-2000, 3000) if case == "signed" else (0, (1 << bits) - 1)
    pixels = rng.integers(low, high, (96, 80), endpoint=True).astype(dtype)
    attrs: dict[str, object] = {}
    if "rescale" in case:
        attrs.update(RescaleSlope=0.37, RescaleIntercept=-1024)
    if "window" in case or case in ("sigmoid", "signed"):
        attrs.update(WindowCenter=1500, WindowWidth=1800)
    if case == "sigmoid":
        attrs.update(VOILUTFunction="SIGMOID")
    ds = make_dataset(pixels, photometric=photometric, bits_stored=bits, **attrs)
    if case == "signed":
        ds.PixelRepresentation = 1
    if case == "voi-lut":
        ds.VOILUTSequence = [_voi_lut(4096, 0)]
    per_value = preprocess.to_display(_image(ds, pixels), CFG)
    monkeypatch.setattr(preprocess._Levels, "of", classmethod(lambda cls, stored: None))
    per_pixel = preprocess.to_display(_image(ds, pixels), CFG)
    assert per_value.notes == per_pixel.notes
    assert per_value.pixels.dtype == per_pixel.pixels.dtype == np.float32
    np.testing.assert_array_equal(per_value.pixels, per_pixel.pixels)


def test_the_percentile_window_of_counted_values_is_numpys() -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(size=300)
    counts = rng.integers(1, 50, 300)
    for window in [(0.5, 99.5), (0.0, 100.0), (10.0, 90.0)]:
        cfg = PreprocessConfig(percentile_window=window)
        expected = np.percentile(np.repeat(values, counts), window)
        np.testing.assert_allclose(preprocess.percentile_window(values, cfg, counts), expected, rtol=0, atol=1e-12)
    assert preprocess.percentile_window(np.array([4.0]), CFG, np.array([9])) == (4.0, 4.0)


def test_8bit_training_picture_equals_monochrome2_dicom_of_it() -> None:
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    from_dicom = preprocess.to_display(_image(make_dataset(picture, bits_stored=8), picture), CFG)
    from_jpeg = preprocess.from_8bit(picture, CFG)
    np.testing.assert_array_equal(from_dicom.pixels, from_jpeg.pixels)
    size = (32, 32)
    np.testing.assert_array_equal(
        preprocess.to_model_input(from_dicom, size).pixels, preprocess.to_model_input(from_jpeg, size).pixels
    )


def test_constant_image_is_rejected() -> None:
    from xraybatch.errors import InvalidInputError

    flat = np.full((8, 8), 7, np.uint16)
    with pytest.raises(InvalidInputError, match="no contrast"):
        preprocess.to_display(_image(make_dataset(flat), flat), CFG)


def test_resample_averages_and_keeps_range() -> None:
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)  # worst case for aliasing
    small = preprocess.resample(checker, (16, 16))
    np.testing.assert_allclose(small, 0.5, atol=1e-6)  # BinShrink averages instead of sampling
    ramp = np.linspace(0, 1, 100, dtype=np.float32)[None].repeat(50, axis=0)
    assert preprocess.resample(ramp, (25, 200)).shape == (25, 200)


@pytest.mark.parametrize(
    ("name", "lung_darker"),
    [("RG1_UNCI.dcm", True), ("RG1_J2KI.dcm", True)],
)
def test_real_monochrome1_cr_displays_bone_bright(name: str, lung_darker: bool) -> None:
    from pydicom.data import get_testdata_file

    header, _ = ingest.read_header(Path(get_testdata_file(name)), IngestConfig())
    out = preprocess.to_display(ingest.read(header), CFG)
    assert out.pixels.dtype == np.float32 and 0.0 <= out.pixels.min() and out.pixels.max() <= 1.0
    assert "MONOCHROME1 inverted" in out.notes and "window center/width applied" in out.notes
    h, w = out.pixels.shape
    lungs = out.pixels[h // 4 : h // 2, w // 5 : w // 3].mean()  # right lung field
    spine = out.pixels[h // 4 : h // 2, int(w * 0.47) : int(w * 0.53)].mean()
    assert (lungs < spine) == lung_darker  # air is dark, mediastinum/spine bright


def test_relabelled_monochrome1_is_the_inverse() -> None:
    normal = shared_file("dicom/torchxrayvision_tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    fake = shared_file("dicom/torchxrayvision_tests/Fake_MONOHR1.dcm")
    a = preprocess.to_display(ingest.read(ingest.read_header(normal, IngestConfig())[0]), CFG)
    b = preprocess.to_display(ingest.read(ingest.read_header(fake, IngestConfig())[0]), CFG)
    np.testing.assert_allclose(a.pixels, 1.0 - b.pixels, atol=1e-6)


# -- the model input: rank-equalised, binding per bundle ------------------------------------------------------

def test_equalise_ignores_monotonic_re_encodings_exactly() -> None:
    picture = np.random.default_rng(3).integers(0, 256, (40, 36)).astype(np.uint8)
    base = preprocess.equalise(picture)
    for encoded in (picture.astype(np.float64) * 16 + 7, np.sqrt(picture.astype(np.float64)), -(255.0 - picture)):
        np.testing.assert_array_equal(preprocess.equalise(encoded), base)
    assert 0.0 < base.min() < base.max() < 1.0
    with pytest.raises(InvalidInputError, match="no contrast"):
        preprocess.equalise(np.full((8, 8), 3))


def test_equalised_input_follows_rescale_and_monochrome1() -> None:
    picture = np.random.default_rng(4).integers(0, 256, (50, 40)).astype(np.uint16)
    mono2 = _image(make_dataset(picture, bits_stored=8), picture)
    stored1 = (4095 - 16 * picture).astype(np.uint16)
    mono1 = _image(make_dataset(stored1, bits_stored=12, photometric="MONOCHROME1", RescaleSlope=0.5,
                                RescaleIntercept=-1024), stored1)
    np.testing.assert_array_equal(preprocess.model_input(mono1, ModelPreprocess(), (20, 16)).pixels, preprocess.model_input(mono2, ModelPreprocess(), (20, 16)).pixels)
    # a negative slope reverses the order of the stored values: bone stays bright after the Modality LUT
    stored_neg = (4095 - 16 * picture).astype(np.uint16)
    negative = _image(make_dataset(stored_neg, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095), stored_neg)
    np.testing.assert_array_equal(preprocess.model_input(negative, ModelPreprocess(), (20, 16)).pixels, preprocess.model_input(mono2, ModelPreprocess(), (20, 16)).pixels)


def test_model_input_ignores_the_window_but_display_keeps_it() -> None:
    picture = (np.random.default_rng(5).integers(0, 4096, (64, 64))).astype(np.uint16)
    plain = _image(make_dataset(picture, bits_stored=12), picture)
    windowed = _image(make_dataset(picture, bits_stored=12, WindowCenter=1000, WindowWidth=800), picture)
    pre = ModelPreprocess()
    np.testing.assert_array_equal(preprocess.model_input(plain, pre, (32, 32)).pixels,
                                  preprocess.model_input(windowed, pre, (32, 32)).pixels)
    assert not np.allclose(preprocess.to_display(plain, PreprocessConfig()).pixels,
                           preprocess.to_display(windowed, PreprocessConfig()).pixels)
    # the format-1 "display" preprocessing does see the window: the two are told apart
    legacy = ModelPreprocess(contrast="display")
    assert not np.allclose(preprocess.model_input(plain, legacy, (32, 32)).pixels,
                           preprocess.model_input(windowed, legacy, (32, 32)).pixels)


def test_model_inputs_make_one_per_preprocessing_and_size() -> None:
    picture = (np.random.default_rng(6).integers(0, 4096, (64, 64))).astype(np.uint16)
    image = _image(make_dataset(picture, bits_stored=12, WindowCenter=1000, WindowWidth=800), picture)
    plans = [(ModelPreprocess(), (32, 32)), (ModelPreprocess("display"), (32, 32)), (ModelPreprocess(), (16, 16)),
             (ModelPreprocess(jpeg_quality=75), (32, 32))]
    inputs = preprocess.model_inputs(image, plans)
    assert set(inputs) == set(plans)
    for pre, size in plans:
        np.testing.assert_array_equal(inputs[(pre, size)].pixels, preprocess.model_input(image, pre, size).pixels)


def test_bundle_preprocessing_is_parsed_and_format_1_means_display() -> None:
    assert ModelPreprocess.from_meta({}).contrast == "display"
    legacy = ModelPreprocess.from_meta({"percentile_window": [1, 99], "prefer_voi_lut": False})
    assert legacy == ModelPreprocess("display", (1.0, 99.0), False)
    assert ModelPreprocess.from_meta(ModelPreprocess().to_meta()) == ModelPreprocess()
    assert ModelPreprocess.from_meta(legacy.to_meta()) == legacy
    with pytest.raises(ValueError, match="contrast"):
        ModelPreprocess("clahe")


def test_jpeg_quality_stores_the_model_sized_input_as_a_training_picture() -> None:
    """``jpeg_quality``: the input at the model's size becomes what a JPEG training picture of that size gives."""
    import io

    from PIL import Image

    rng = np.random.default_rng(11)
    small = np.clip(rng.normal(128, 60, (24, 20)), 0, 255).astype(np.uint8)
    small[0, 0], small[-1, -1] = 0, 255  # the full 0-255 range: the map onto it changes nothing
    picture = np.kron(small, np.ones((2, 2), np.uint8))  # 48x40: two by two blocks average back to ``small``
    buffer = io.BytesIO()
    Image.fromarray(small, mode="L").save(buffer, format="JPEG", quality=60)
    training_picture = np.asarray(Image.open(buffer))
    lossy = ModelPreprocess(jpeg_quality=60)
    got = preprocess.model_input_8bit(picture, lossy, (24, 20)).pixels
    np.testing.assert_allclose(got, preprocess.model_input_8bit(training_picture, ModelPreprocess(), (24, 20)).pixels,
                               atol=1e-6)
    assert not np.allclose(got, preprocess.model_input_8bit(picture, ModelPreprocess(), (24, 20)).pixels, atol=1e-3)


def test_jpeg_quality_keeps_the_lossless_encodings_of_a_picture_one_input() -> None:
    picture = np.random.default_rng(12).integers(0, 256, (64, 48)).astype(np.uint16)
    lossy = ModelPreprocess(jpeg_quality=75)
    mono2 = _image(make_dataset(picture, bits_stored=8), picture)
    stored1 = (4095 - 16 * picture).astype(np.uint16)
    mono1 = _image(make_dataset(stored1, bits_stored=12, photometric="MONOCHROME1", RescaleSlope=0.5,
                                RescaleIntercept=-1024), stored1)
    windowed = _image(make_dataset(picture, bits_stored=8, WindowCenter=100, WindowWidth=80), picture)
    reference = preprocess.model_input(mono2, lossy, (32, 24)).pixels
    for image in (mono1, windowed):
        np.testing.assert_allclose(preprocess.model_input(image, lossy, (32, 24)).pixels, reference, atol=1e-6)
    # the DICOM path and the training pictures' path agree
    np.testing.assert_allclose(preprocess.model_input_8bit(picture.astype(np.uint8), lossy, (32, 24)).pixels,
                               reference, atol=1e-6)


def test_jpeg_quality_is_recorded_in_the_bundle_and_checked() -> None:
    lossy = ModelPreprocess(jpeg_quality=75)
    assert lossy.to_meta()["jpeg_quality"] == 75 and "jpeg_quality" not in ModelPreprocess().to_meta()
    assert ModelPreprocess.from_meta(lossy.to_meta()) == lossy
    assert "jpeg_quality = 75" in lossy.describe()
    with pytest.raises(ValueError, match="jpeg_quality"):
        ModelPreprocess(jpeg_quality=101)
    with pytest.raises(ValueError, match="equalise"):
        ModelPreprocess("display", jpeg_quality=75)


def test_a_site_setting_that_contradicts_a_bundle_stops_the_start_up(tmp_path: Path) -> None:
    from tests.conftest import make_tiny_bundle
    from xraybatch.errors import ModelError
    from xraybatch.models.registry import check_preprocessing, read_bundle

    spec = read_bundle(make_tiny_bundle(tmp_path / "b"))
    check_preprocessing(PreprocessConfig(), [spec])  # no demand: fine
    check_preprocessing(PreprocessConfig(contrast=spec.preprocess.contrast), [spec])
    other = "display" if spec.preprocess.contrast == "equalise" else "equalise"
    with pytest.raises(ModelError, match=rf"contrast = '{other}' contradicts bundle .*binding"):
        check_preprocessing(PreprocessConfig(contrast=other), [spec])
