"""Header reading, selection rules and the rejection of bad input, on real pydicom-written files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.synth import make_dataset, write_dicom
from xraybatch import ingest
from xraybatch.errors import InvalidInputError, NotApplicableError
from xraybatch.settings import IngestConfig

CFG = IngestConfig()


def _read_all(path: Path, cfg: IngestConfig = CFG) -> None:
    header, ds = ingest.read_header(path, cfg)
    ingest.select(header, cfg)
    ingest.check_image(header, ds, cfg)
    ingest.read(header)


def test_chest_cr_is_read(dicom_factory: Callable[..., Path]) -> None:
    path = dicom_factory("a.dcm")
    header, ds = ingest.read_header(path, CFG)
    assert (header.modality, header.body_part, header.view_position) == ("CR", "CHEST", "PA")
    assert "PixelData" not in ds  # header only
    ingest.select(header, CFG)
    ingest.check_image(header, ds, CFG)
    image = ingest.read(header)
    assert image.pixels.shape == (256, 240) and image.pixels.dtype == np.uint16
    assert "PixelData" not in image.dataset and image.dataset.PatientID == "SYN-0001"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modality": "CT"}, r"Modality 'CT' not in ingest.modalities"),
        ({"body_part": "HAND"}, r"BodyPartExamined 'HAND' not in ingest.body_parts"),
        ({"view": "LL"}, r"ViewPosition 'LL' not in ingest.views .* add it to \[ingest\] views"),
        ({"view": "LATERAL"}, r"ViewPosition 'LATERAL'"),
    ],
)
def test_not_applicable(dicom_factory: Callable[..., Path], kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(NotApplicableError, match=match):
        _read_all(dicom_factory("x.dcm", **kwargs))


def test_missing_view_and_body_part_follow_config(dicom_factory: Callable[..., Path]) -> None:
    path = dicom_factory("x.dcm", view=None, body_part=None)
    _read_all(path)
    with pytest.raises(NotApplicableError, match="ViewPosition is empty"):
        _read_all(path, IngestConfig(accept_missing_view=False))
    with pytest.raises(NotApplicableError, match="BodyPartExamined is empty"):
        _read_all(path, IngestConfig(accept_missing_body_part=False))


def _truncated(tmp: Path) -> Path:
    path = write_dicom(tmp / "t.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40_000])
    return path


def _no_pixels(tmp: Path) -> Path:
    ds = make_dataset()
    del ds.PixelData
    return write_dicom(tmp / "np.dcm", ds)


def _multiframe(tmp: Path) -> Path:
    frames = np.zeros((2, 200, 200), np.uint16)
    ds = make_dataset(frames[0], NumberOfFrames=2)
    ds.PixelData = frames.tobytes()
    return write_dicom(tmp / "mf.dcm", ds)


def _rgb(tmp: Path) -> Path:
    ds = make_dataset(np.zeros((200, 200), np.uint8), bits_stored=8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = np.zeros((200, 200, 3), np.uint8).tobytes()
    return write_dicom(tmp / "rgb.dcm", ds)


def _huge_header(tmp: Path) -> Path:
    ds = make_dataset(np.zeros((200, 200), np.uint16))
    ds.Rows, ds.Columns = 30000, 30000  # the header claims 900 MP; rejected before any decode
    return write_dicom(tmp / "huge.dcm", ds)


def _mpeg(tmp: Path) -> Path:
    ds = make_dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 MP@ML: no decoder plugin
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    return write_dicom(tmp / "mpeg.dcm", ds)


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


BAD = {
    "zero-byte": (_bytes("z", b""), r"empty file"),
    "text": (_bytes("t.txt", b"hello, not an image"), r"not a DICOM file"),
    "dicm-garbage": (_bytes("g", b"\0" * 128 + b"DICM" + bytes(range(256)) * 8), r"damaged DICOM|not a DICOM|lacks"),
    "truncated": (_truncated, r"the file ends inside Pixel Data: \d+ of its \d+ bytes are present \(truncated copy\)"),
    "no-pixels": (_no_pixels, r"no Pixel Data"),
    "multi-frame": (_multiframe, r"multi-frame image \(2 frames\)"),
    "colour": (_rgb, r"colour or unsupported image \(PhotometricInterpretation 'RGB'"),
    "tiny": (lambda t: write_dicom(t / "tiny.dcm", pixels=np.zeros((32, 32), np.uint16)), r"smaller than ingest.min_size"),
    "huge": (_huge_header, r"exceeds ingest.max_pixels"),
    "mpeg2": (_mpeg, r"transfer syntax 1.2.840.10008.1.2.4.100 .* cannot be decoded"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_is_rejected_with_reason(tmp_path: Path, kind: str) -> None:
    make, match = BAD[kind]
    path = make(tmp_path)
    with pytest.raises(InvalidInputError, match=match):
        _read_all(path)


def test_real_jpeg2000_decodes_like_uncompressed() -> None:
    from pydicom.data import get_testdata_file

    raw = ingest.read(ingest.read_header(Path(get_testdata_file("RG1_UNCR.dcm")), CFG)[0])
    j2k = ingest.read(ingest.read_header(Path(get_testdata_file("RG1_J2KR.dcm")), CFG)[0])
    assert raw.pixels.shape == (1955, 1841)
    np.testing.assert_array_equal(raw.pixels, j2k.pixels)  # lossless
    assert dcmread(get_testdata_file("RG1_J2KR.dcm"), stop_before_pixels=True).BodyPartExamined == "CHEST"


def test_unknown_value_representation_is_rejected(tmp_path: Path) -> None:
    data = bytearray(write_dicom(tmp_path / "a.dcm").read_bytes())
    at = data.find(bytes([0x08, 0x00, 0x60, 0x00]) + b"CS")  # Modality, explicit VR little endian
    assert at > 0
    data[at + 4:at + 6] = b"ZZ"  # pydicom converts values lazily: this fails after dcmread, not in it
    (tmp_path / "b.dcm").write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match=r"Modality \(0008,0060\) cannot be read \(NotImplementedError\)"):
        ingest.read_header(tmp_path / "b.dcm", CFG)
