"""A corpus of hostile and damaged files, each with the final state and reason xraybatch must give it.

``write_corpus(folder)`` writes every case into ``folder`` and returns the cases; a test runs the folder
through ``run-folder`` and checks each row of the results DB against its case. The ways files go wrong:
odd file types, truncation at every level (preamble, meta, mid-element, mid-pixel-data, mid-fragment),
lying headers (lengths, transfer syntax, Rows/Columns, bit depths), invalid UIDs (path traversal included),
bad VRs and character sets, compressed syntaxes with broken codestreams (JPEG, JPEG-LS, JPEG 2000, RLE; some
abort or crash GDCM, one makes libjpeg spin), derived SOP classes, deep nesting, huge elements, and file
names that are not UTF-8. Everything is generated here from synthetic pixels: no patient data.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.synth import make_dataset

ROWS, COLUMNS = 160, 144
PLANTED_NAME = "ZZPLANTED^YYPATIENT"  # must never appear in a log line
PLANTED_BIRTH_DATE = "1933-07-14"  # a birth date in the wrong format, quoted by pydicom's DA validation
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"


@dataclass(frozen=True)
class Case:
    """One hostile file: its name in the corpus folder, the final state, and what its reason must say."""

    name: str | bytes  # bytes: a file name that is not valid UTF-8
    state: str
    reason: str = ""  # a regular expression the row's reason must match (``re.search``)
    note: str = ""  # for ``done``: a regular expression one of the row's notes must match
    kind: str = ""  # the group in the outcome table

    @property
    def path_name(self) -> str:
        return os.fsdecode(self.name)


def _pixels(seed: int = 0, bits: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ROWS, 0:COLUMNS]
    img = 0.6 + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0) + 0.05 * rng.standard_normal((ROWS, COLUMNS))
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * (2**bits - 1)).astype(np.uint16)


def _ds(seed: int = 0, **attributes: object) -> Dataset:
    bits = int(attributes.pop("bits_stored", 12))  # type: ignore[call-overload]
    return make_dataset(_pixels(seed, bits), bits_stored=bits, **attributes)  # type: ignore[arg-type]


def _encode(ds: Dataset, implicit: bool = False) -> bytes:
    """``ds`` as a Part 10 file; ``implicit``: written Implicit VR Little Endian whatever its meta says."""
    buffer = io.BytesIO()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _compressed(syntax: str, seed: int) -> Dataset:
    if syntax == JPEGBaseline8Bit:
        from PIL import Image

        ds = _ds(seed, bits_stored=8)
        out = io.BytesIO()
        Image.fromarray(_pixels(seed, 8).astype(np.uint8)).save(out, format="JPEG", quality=90)
        ds.PixelData = encapsulate([out.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "MONOCHROME2"
        return ds
    if syntax == JPEGLosslessSV1:
        from pydicom.data import get_testdata_file

        source = dcmread(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
        ds = _ds(seed, bits_stored=8)
        ds.Rows, ds.Columns = source.Rows, source.Columns
        ds.PixelData = source.PixelData
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        return ds
    ds = _ds(seed)
    ds.compress(syntax)
    return ds


def _frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _with_frame(ds: Dataset, frame: bytes) -> bytes:
    ds.PixelData = encapsulate([frame])
    return _encode(ds)


def _patch(frame: bytes, marker: bytes, at: int, value: bytes) -> bytes:
    """``frame`` with ``value`` written ``at`` bytes after the first ``marker``."""
    index = frame.index(marker) + at
    return frame[:index] + value + frame[index + len(value):]


def _element_offset(data: bytes, tag: int, vr: bytes = b"") -> int:
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    index = data.find(needle, 132)
    if index < 0:
        raise ValueError(f"tag {tag:08X} not found")
    return index


def _pixel_value_offset(data: bytes) -> int:
    return _element_offset(data, 0x7FE00010, b"OW") + 12


def _set_element_vr(data: bytes, tag: int, old_vr: bytes, new_vr: bytes) -> bytes:
    at = _element_offset(data, tag, old_vr)
    return data[:at + 4] + new_vr + data[at + 6:]


def _nested(depth: int) -> bytes:
    """A good image with Content Sequences nested ``depth`` deep (undefined lengths), before its Pixel Data."""
    data = _encode(_ds(50))
    at = _element_offset(data, 0x7FE00010, b"OW")
    opening = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return data[:at] + opening * depth + closing * depth + data[at:]


def _rle_frame(edit: Callable[[bytes], bytes]) -> bytes:
    ds = _compressed(RLELossless, 40)
    return _with_frame(ds, edit(_frame(ds)))


def _sr() -> bytes:
    ds = _ds(60)
    for keyword in ("Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
                    "PhotometricInterpretation", "PixelRepresentation", "PixelSpacing"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    return _encode(ds)


def _our_output() -> bytes:
    """A Secondary Capture like the ones xraybatch writes, dropped back into the input."""
    ds = _ds(61, bits_stored=8)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.Modality = "OT"
    ds.SeriesDescription = "AI generated - not for clinical use"
    return _encode(ds)


def _charset(value: str | list[str], name: str, seed: int) -> bytes:
    ds = _ds(seed)
    ds.SpecificCharacterSet = value
    ds.PatientName = name
    return _encode(ds)


def _raw_charset(term: bytes, name_bytes: bytes, seed: int) -> bytes:
    """A file with a Specific Character Set term and Patient Name bytes written verbatim."""
    ds = _ds(seed)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "X" * len(name_bytes)
    data = _encode(ds)
    at = _element_offset(data, 0x00080005, b"CS")
    length = struct.unpack("<H", data[at + 6:at + 8])[0]
    padded = term + (b" " if len(term) % 2 else b"")
    data = data[:at + 6] + struct.pack("<H", len(padded)) + padded + data[at + 8 + length:]
    at = _element_offset(data, 0x00100010, b"PN")
    length = struct.unpack("<H", data[at + 6:at + 8])[0]
    value = name_bytes + (b" " if len(name_bytes) % 2 else b"")
    return data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length:]


def _builders() -> list[tuple[Case, Callable[[], bytes]]]:
    good = _encode(_ds(0))
    pixel_at = _pixel_value_offset(good)
    cases: list[tuple[Case, Callable[[], bytes]]] = []

    def add(name: str | bytes, state: str, reason: str, build: Callable[[], bytes], kind: str, note: str = "") -> None:
        cases.append((Case(name, state, reason, note, kind), build))

    # -- odd file types ---------------------------------------------------------------------------------
    rejected_not_dicom = r"not a DICOM file"
    add("zero-length", "rejected", r"empty file \(0 bytes\)", lambda: b"", "odd file type")
    add("one-byte", "rejected", rejected_not_dicom, lambda: b"\x00", "odd file type")
    add("random-bytes.bin", "rejected", rejected_not_dicom + "|damaged DICOM header",
        lambda: np.random.default_rng(1).bytes(4096), "odd file type")
    add("notes.txt", "rejected", rejected_not_dicom, lambda: b"patient list: see the PACS\n" * 20, "odd file type")
    add("page.html", "rejected", rejected_not_dicom, lambda: b"<html><body>not an image</body></html>", "odd file type")

    def _zip() -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("image.dcm", good)
        return out.getvalue()

    add("images.zip", "rejected", rejected_not_dicom, _zip, "odd file type")
    add("image.dcm.gz", "rejected", rejected_not_dicom, lambda: gzip.compress(good), "odd file type")

    def _png() -> bytes:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(_pixels(2, 8).astype(np.uint8)).save(out, format="PNG")
        return out.getvalue()

    add("chest.png", "rejected", rejected_not_dicom, _png, "odd file type")
    add("dicm-then-garbage", "rejected", r"damaged DICOM header|lacks|not a DICOM",
        lambda: b"\0" * 128 + b"DICM" + bytes(range(256)) * 8, "odd file type")

    # -- truncation at every level ----------------------------------------------------------------------
    add("cut-in-preamble", "rejected", rejected_not_dicom, lambda: good[:64], "truncated")
    add("preamble-and-prefix-only", "rejected", rejected_not_dicom + "|damaged DICOM header|lacks",
        lambda: good[:132], "truncated")
    add("cut-in-file-meta", "rejected", r"damaged DICOM header|lacks|not a DICOM", lambda: good[:170], "truncated")
    meta_end = _element_offset(good, 0x00080016)  # the first data set element after the meta
    add("file-meta-only", "rejected", r"lacks SOPInstanceUID|damaged DICOM header", lambda: good[:meta_end], "truncated")
    name_at = _element_offset(good, 0x00100010)
    add("cut-mid-element", "rejected", r"damaged DICOM header|lacks", lambda: good[:name_at + 10], "truncated")
    add("cut-before-pixel-data", "rejected", r"no Pixel Data", lambda: good[:pixel_at - 12], "truncated")
    add("cut-after-pixel-data-tag", "rejected", r"file ends inside Pixel Data: 0 of its \d+ bytes",
        lambda: good[:pixel_at], "truncated")
    add("cut-mid-pixel-data", "rejected", r"file ends inside Pixel Data: \d+ of its \d+ bytes are present \(truncated",
        lambda: good[:pixel_at + (len(good) - pixel_at) // 2], "truncated")
    add("last-byte-missing", "rejected", r"file ends inside Pixel Data", lambda: good[:-1], "truncated")
    j2k = _encode(_compressed(JPEG2000Lossless, 3))
    add("j2k-cut-mid-fragment", "rejected", r"fragment 1 of the encapsulated Pixel Data .* runs past the end",
        lambda: j2k[: len(j2k) - 400], "truncated")
    add("j2k-cut-before-delimiter", "rejected", r"before its Sequence Delimitation Item \(truncated copy\)",
        lambda: j2k[:-8], "truncated")
    jpeg = _encode(_compressed(JPEGBaseline8Bit, 4))
    add("jpeg-cut-mid-fragment", "rejected", r"runs past the end of the file", lambda: jpeg[: len(jpeg) * 2 // 3],
        "truncated")
    rle = _encode(_compressed(RLELossless, 5))
    add("rle-cut-mid-fragment", "rejected", r"runs past the end of the file", lambda: rle[:-1000], "truncated")

    # -- lying headers ----------------------------------------------------------------------------------
    length_lie = r"Pixel Data holds \d+ bytes, but Rows x Columns x SamplesPerPixel x BitsAllocated x frames needs \d+"
    add("rows-lie-bigger", "rejected", length_lie, lambda: _encode(_lie(Rows=ROWS * 2)), "lying header")
    add("columns-lie-smaller", "rejected", length_lie, lambda: _encode(_lie(Columns=COLUMNS - 16)), "lying header")
    add("bits-allocated-lie-8", "rejected", length_lie, lambda: _encode(_lie(BitsAllocated=8, BitsStored=8, HighBit=7)),
        "lying header")
    add("bits-stored-over-allocated", "rejected", r"BitsStored \(0028,0101\) is 20, outside 1..BitsAllocated",
        lambda: _encode(_lie(BitsStored=20, HighBit=19)), "lying header")
    add("bits-stored-zero", "rejected", r"BitsStored \(0028,0101\) is 0", lambda: _encode(_lie(BitsStored=0)),
        "lying header")
    add("bits-allocated-12", "rejected", r"BitsAllocated \(0028,0100\) is 12", lambda: _encode(_lie(BitsAllocated=12)),
        "lying header")
    add("pixel-representation-2", "rejected", r"PixelRepresentation \(0028,0103\) is 2",
        lambda: _encode(_lie(PixelRepresentation=2)), "lying header")
    add("rows-zero", "rejected", r"Rows \(0028,0010\) or Columns \(0028,0011\) is missing or zero",
        lambda: _encode(_lie(Rows=0)), "lying header")
    add("samples-per-pixel-3", "rejected", r"colour or unsupported image .*SamplesPerPixel 3",
        lambda: _encode(_lie(SamplesPerPixel=3)), "lying header")
    add("photometric-palette", "rejected", r"colour or unsupported image \(PhotometricInterpretation 'PALETTE COLOR'",
        lambda: _encode(_lie(PhotometricInterpretation="PALETTE COLOR")), "lying header")
    add("photometric-missing", "rejected", r"colour or unsupported image \(PhotometricInterpretation '\(empty\)'",
        lambda: _encode(_without("PhotometricInterpretation")), "lying header")
    add("number-of-frames-text", "rejected", r"NumberOfFrames \(0028,0008\) is not an integer",
        lambda: _encode(_lie(NumberOfFrames=b"abc")), "lying header")
    add("number-of-frames-zero", "rejected", r"NumberOfFrames \(0028,0008\) is 0",
        lambda: _encode(_lie(NumberOfFrames="0")), "lying header")
    add("number-of-frames-two", "rejected", r"multi-frame image \(2 frames\)",
        lambda: _encode(_lie(NumberOfFrames="2")), "lying header")
    add("rows-huge", "rejected", r"exceeds ingest.max_pixels", lambda: _encode(_lie(Rows=65535, Columns=65535)),
        "lying header")
    add("tiny-image", "rejected", r"smaller than ingest.min_size",
        lambda: _encode(make_dataset(np.zeros((32, 32), np.uint16))), "lying header")
    add("native-data-says-j2k", "rejected", r"Pixel Data has a defined length .* stores it encapsulated",
        lambda: _relabel(_encode(_ds(18)), JPEG2000Lossless), "lying header")

    def _j2k_says_explicit() -> bytes:
        return _relabel(_encode(_compressed(JPEG2000Lossless, 6)), "1.2.840.10008.1.2.1")

    add("j2k-data-says-explicit", "rejected", r"Pixel Data is encapsulated .* names the wrong transfer syntax",
        _j2k_says_explicit, "lying header")
    add("unknown-transfer-syntax", "rejected", r"transfer syntax 1\.2\.3\.4\.5 .*cannot be decoded",
        lambda: _relabel(_encode(_ds(19)), "1.2.3.4.5"), "lying header")
    add("mpeg2-transfer-syntax", "rejected", r"transfer syntax 1\.2\.840\.10008\.1\.2\.4\.100 .*cannot be decoded",
        lambda: _relabel(_encode(_ds(49)), "1.2.840.10008.1.2.4.100"), "lying header")
    add("implicit-data-says-explicit", "done", "",
        lambda: _relabel(_encode(_ds(7), implicit=True), "1.2.840.10008.1.2.1"), "lying header")
    add("big-endian-retired-syntax", "done", "", lambda: _big_endian(8), "transfer syntax")
    add("implicit-vr", "done", "", lambda: _encode(_ds(9), implicit=True),
        "transfer syntax")
    add("deflated", "done", "", lambda: _deflated(10), "transfer syntax")

    def _huge_length() -> bytes:
        at = _element_offset(good, 0x00081030) if b"\x08\x00\x30\x10" in good else name_at
        return good[:at + 6] + struct.pack("<H", 0xFFF0) + good[at + 8:]

    add("element-length-lies", "rejected", r"damaged DICOM header|cannot be read|no Pixel Data|lacks|Pixel Data",
        _huge_length, "lying header")

    # -- UIDs (PS3.5 9.1) -------------------------------------------------------------------------------
    invalid_uid = r"{} \({}\) is not a valid UID"
    add("uid-path-traversal", "rejected", invalid_uid.format("SOPInstanceUID", "0008,0018"),
        lambda: _encode(_uids(sop="../../../etc/x")), "invalid UID")
    add("uid-absolute-path", "rejected", invalid_uid.format("StudyInstanceUID", "0020,000D"),
        lambda: _encode(_uids(study="/tmp/outside")), "invalid UID")
    add("uid-series-dotdot", "rejected", invalid_uid.format("SeriesInstanceUID", "0020,000E"),
        lambda: _encode(_uids(series="1.2.840/../..")), "invalid UID")
    add("uid-too-long", "rejected", r"SOPInstanceUID \(0008,0018\) is not a valid UID: 70 characters",
        lambda: _encode(_uids(sop="1." + "2" * 68)), "invalid UID")
    add("uid-leading-zero", "rejected", invalid_uid.format("StudyInstanceUID", "0020,000D"),
        lambda: _encode(_uids(study="1.2.840.010.5")), "invalid UID")
    add("uid-empty-component", "rejected", invalid_uid.format("SeriesInstanceUID", "0020,000E"),
        lambda: _encode(_uids(series="1.2..3")), "invalid UID")
    add("uid-missing", "rejected", r"DICOM header lacks SOPInstanceUID \(0008,0018\)",
        lambda: _encode(_without("SOPInstanceUID")), "invalid UID")
    add("sop-class-uid-invalid", "rejected", invalid_uid.format("SOPClassUID", "0008,0016"),
        lambda: _encode(_lie(SOPClassUID=b"CR-IMAGE")), "invalid UID")

    # -- bad VRs, values and character sets ---------------------------------------------------------------
    add("unknown-vr", "rejected", r"Modality \(0008,0060\) cannot be read \(NotImplementedError\)",
        lambda: _set_element_vr(good, 0x00080060, b"CS", b"ZZ"), "bad VR")
    add("rows-as-text-vr", "rejected", r"Rows \(0028,0010\) .*(not an integer|cannot be read)",
        lambda: _rows_as_text(), "bad VR")
    add("patient-name-wrong-vr", "done", "",
        lambda: _set_element_vr(_encode(_lie(PatientName=PLANTED_NAME.replace("^", " "))), 0x00100010, b"PN", b"DA"),
        "bad VR")
    add("window-center-text", "rejected", r"WindowCenter \(0028,1050\) is not a decimal number \(DS\)",
        lambda: _encode(_lie(WindowCenter=b"abc", WindowWidth="100")), "bad value")
    add("rescale-slope-text", "rejected", r"RescaleSlope \(0028,1053\) is not a decimal number \(DS\)",
        lambda: _encode(_lie(RescaleSlope=b"x1", RescaleIntercept="0")), "bad value")
    add("birth-date-wrong-format", "done", "", lambda: _encode(_lie(PatientBirthDate=PLANTED_BIRTH_DATE.encode())),
        "bad value", note=r"PatientBirthDate \(0010,0030\) is not a DICOM date")
    add("birth-date-garbage", "done", "", lambda: _encode(_lie(PatientBirthDate=b"unknown")), "bad value",
        note=r"PatientBirthDate \(0010,0030\) is not a DICOM date")
    add("patient-name-control-chars", "done", "", lambda: _encode(_lie(PatientName=b"DOE\x07^JANE\x1b")), "bad value")
    add("patient-id-too-long", "done", "", lambda: _encode(_lie(PatientID=b"P" * 90)), "bad value")
    add("view-position-two-values", "not_applicable", r"ViewPosition 'PA\\\\AP' not in ingest.views",
        lambda: _encode(_lie(ViewPosition=["PA", "AP"])), "bad value")
    add("accession-number-formula", "done", "", lambda: _encode(_lie(AccessionNumber="=HYPERLINK(1)")), "bad value")
    add("accession-number-at-formula", "done", "", lambda: _encode(_lie(AccessionNumber="@SUM(1+1)")), "bad value")
    add("charset-unknown-term", "done", "", lambda: _charset("ISO_IR 999", "DOE^JANE", 11), "character set",
        note=r"SpecificCharacterSet \(0008,0005\) has 1 term\(s\) outside")
    add("charset-iso2022-japanese", "done", "",
        lambda: _charset(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", 12), "character set")
    add("charset-iso2022-korean", "done", "",
        lambda: _charset(["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞", 13), "character set")
    add("charset-iso2022-latin1", "done", "", lambda: _charset("ISO 2022 IR 100", "Müller^Jürgen", 14),
        "character set")
    add("charset-gb18030", "done", "", lambda: _charset("GB18030", "Wang^XiaoDong=王^小东", 15), "character set")
    add("charset-utf8-with-latin1-bytes", "done", "", lambda: _raw_charset(b"ISO_IR 192", b"M\xfcller^J", 16),
        "character set")
    add("charset-garbage-term", "done", "", lambda: _raw_charset(b"\x01\x02??", b"DOE^JANE", 17), "character set",
        note=r"SpecificCharacterSet")

    # -- compressed syntaxes with broken codestreams --------------------------------------------------------
    def j2k_case(seed: int, edit: Callable[[bytes], bytes]) -> Callable[[], bytes]:
        def build() -> bytes:
            ds = _compressed(JPEG2000Lossless, seed)
            return _with_frame(ds, edit(_frame(ds)))

        return build

    def jpeg_case(syntax: str, seed: int, edit: Callable[[bytes], bytes]) -> Callable[[], bytes]:
        def build() -> bytes:
            ds = _compressed(syntax, seed)
            return _with_frame(ds, edit(_frame(ds)))

        return build

    crashed = r"^the pixel data could not be decoded: the decoder crashed \(gdcm killed by SIG(ABRT|SEGV)\)"
    declares = r"codestream declares 65535x65535 pixels"
    add("j2k-good", "done", "", lambda: _encode(_compressed(JPEG2000Lossless, 20)), "compressed, good")
    add("j2k-siz-precision-aborts-gdcm", "rejected", crashed,
        j2k_case(21, lambda f: _patch(f, b"\xff\x51", 40, b"\x7f")), "broken codestream")
    add("j2k-siz-size-lies", "rejected", declares,
        j2k_case(22, lambda f: _patch(f, b"\xff\x51", 6, b"\x00\x00\xff\xff\x00\x00\xff\xff")), "broken codestream")
    add("j2k-siz-components-zero", "rejected", r"codestream declares \d+x\d+ pixels in 0 components",
        j2k_case(23, lambda f: _patch(f, b"\xff\x51", 38, b"\x00\x00")), "broken codestream")
    add("j2k-no-end-marker", "rejected", r"does not end with an end-of-image marker",
        j2k_case(24, lambda f: f[:-2] + b"\x00\x00"), "broken codestream")
    add("j2k-garbage-after-header", "rejected", r"the pixel data could not be decoded",
        j2k_case(25, lambda f: f[:f.index(b"\xff\x90")] + bytes(range(256)) * 8 + b"\xff\xd9"), "broken codestream")
    add("j2k-not-a-codestream", "rejected", r"does not start with a start-of-image marker",
        j2k_case(26, lambda f: b"\x00" * 64 + b"\xff\xd9"), "broken codestream")
    add("j2k-empty-fragments", "rejected", r"has no fragments",
        lambda: _empty_fragments(27), "broken codestream")
    add("j2k-bad-item-tag", "rejected", r"holds an element \(FFFE,E1DD\) where item 2 should start: the fragment structure is damaged",
        lambda: _bad_item_tag(28), "broken codestream")
    add("j2k-odd-offset-table", "rejected", r"Basic Offset Table .* not a multiple of 4",
        lambda: _odd_offset_table(29), "broken codestream")
    add("jpeg-good", "done", "", lambda: _encode(_compressed(JPEGBaseline8Bit, 30)), "compressed, good")
    add("jpeg-sof-precision-crashes-gdcm", "rejected", crashed,
        jpeg_case(JPEGBaseline8Bit, 31, lambda f: _patch(f, b"\xff\xc0", 4, b"\x63")), "broken codestream")
    add("jpeg-sof-size-lies", "rejected", declares,
        jpeg_case(JPEGBaseline8Bit, 32, lambda f: _patch(f, b"\xff\xc0", 5, b"\xff\xff\xff\xff")), "broken codestream")
    add("jpeg-no-frame-header", "rejected", r"has no frame header",
        jpeg_case(JPEGBaseline8Bit, 33, lambda f: f.replace(b"\xff\xc0", b"\xff\xe5", 1)), "broken codestream")
    add("jpeg-huffman-table-garbage", "rejected", r"the pixel data could not be decoded",
        jpeg_case(JPEGBaseline8Bit, 34, lambda f: _patch(f, b"\xff\xc4", 4, b"\xff" * 16)), "broken codestream")
    add("jpeg-scan-cut-but-marker-kept", "rejected", r"the pixel data could not be decoded|the image has no contrast",
        jpeg_case(JPEGBaseline8Bit, 35, lambda f: f[: f.index(b"\xff\xda") + 40] + b"\xff\xd9"), "broken codestream")
    add("jpeg-lossless-good", "done", "", lambda: _encode(_compressed(JPEGLosslessSV1, 36)), "compressed, good")
    add("jpegls-good", "done", "", lambda: _encode(_compressed(JPEGLSLossless, 37)), "compressed, good")
    add("jpegls-precision-aborts-gdcm", "rejected", crashed,
        jpeg_case(JPEGLSLossless, 38, lambda f: _patch(f, b"\xff\xf7", 4, b"\x63")), "broken codestream")
    add("jpegls-size-lies", "rejected", declares,
        jpeg_case(JPEGLSLossless, 39, lambda f: _patch(f, b"\xff\xf7", 5, b"\xff\xff\xff\xff")), "broken codestream")
    add("rle-good", "done", "", lambda: _encode(_compressed(RLELossless, 41)), "compressed, good")
    add("rle-segment-count-zero", "rejected", r"RLE Lossless header declares 0 segments",
        lambda: _rle_frame(lambda f: b"\x00\x00\x00\x00" + f[4:]), "broken codestream")
    add("rle-offsets-past-end", "rejected", r"RLE Lossless segment offsets",
        lambda: _rle_frame(lambda f: f[:8] + struct.pack("<L", 0x7FFFFFF0) + f[12:]), "broken codestream")
    add("rle-segment-data-garbage", "rejected", r"the pixel data could not be decoded",
        lambda: _rle_frame(lambda f: f[:64] + b"\x80" * (len(f) - 64)), "broken codestream")

    # -- derived SOP classes and other objects that are not radiographs ------------------------------------
    sop_class = r"SOPClassUID {} \({}\) is not a radiograph storage class"
    add("secondary-capture", "not_applicable", sop_class.format(SECONDARY_CAPTURE, "Secondary Capture Image Storage"),
        lambda: _encode(_lie(SOPClassUID=SECONDARY_CAPTURE)), "derived SOP class")
    add("structured-report", "not_applicable", r"Modality 'SR' not in ingest.modalities", _sr, "derived SOP class")
    add("our-own-output-fed-back", "not_applicable", r"Modality 'OT' not in ingest.modalities", _our_output,
        "derived SOP class")
    add("mammography-as-dx", "not_applicable", sop_class.format(MAMMOGRAPHY, "Digital Mammography X-Ray Image Storage - For Presentation"),
        lambda: _encode(_lie(SOPClassUID=MAMMOGRAPHY, Modality="DX")), "derived SOP class")
    add("ct-image", "not_applicable", r"Modality 'CT' not in ingest.modalities",
        lambda: _encode(make_dataset(_pixels(42), modality="CT")), "derived SOP class")
    add("lateral-view", "not_applicable", r"ViewPosition 'LL' not in ingest.views", lambda: _encode(_lie(ViewPosition="LL")),
        "derived SOP class")

    # -- nesting and huge elements ------------------------------------------------------------------------
    add("nested-sequences-64-deep", "done", "", lambda: _nested(64), "nesting / huge")
    add("nested-sequences-3000-deep", "rejected", r"damaged DICOM header: RecursionError",
        lambda: _nested(3000), "nesting / huge")
    add("huge-private-element", "done", "", lambda: _encode(_private_blob(8 << 20)), "nesting / huge")
    add("huge-text-element", "done", "", lambda: _encode(_lie(ImageComments="x" * (1 << 20))), "nesting / huge")

    # -- file names ---------------------------------------------------------------------------------------
    add(b"latin1-name-caf\xe9.dcm", "done", "", lambda: _encode(_ds(43)), "file name")
    add("name with spaces and\nnewline.dcm", "done", "", lambda: _encode(_ds(44)), "file name")
    add('=HYPERLINK("example.invalid","x").dcm', "done", "", lambda: _encode(_ds(45)), "file name")
    add("-cmd|' calc'!A0", "done", "", lambda: _encode(_ds(46)), "file name")
    return cases


def _lie(**attributes: object) -> Dataset:
    """A good image with some attributes overwritten (``seed`` from the attribute names, so each case differs).

    A ``bytes`` value is stored raw, as a file from a broken sender would hold it (pydicom would refuse it).
    """
    ds = _ds(sum(map(ord, "".join(attributes))) % 997)
    for keyword, value in attributes.items():
        if isinstance(value, bytes):
            tag = Tag(keyword)
            raw = value + (b" " if len(value) % 2 else b"")
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
        else:
            setattr(ds, keyword, value)
    if "SOPClassUID" in attributes:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def _without(keyword: str) -> Dataset:
    ds = _ds(sum(map(ord, keyword)) % 997)
    delattr(ds, keyword)
    return ds


def _uids(sop: str | None = None, study: str | None = None, series: str | None = None) -> Dataset:
    ds = _ds(len(sop or "") + 2 * len(study or "") + 3 * len(series or ""))
    if sop is not None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    if study is not None:
        ds.StudyInstanceUID = study
    if series is not None:
        ds.SeriesInstanceUID = series
    return ds


def _relabel(data: bytes, syntax: str) -> bytes:
    """``data`` with the Transfer Syntax UID in its meta replaced (same length, padded)."""
    old = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    old_bytes = old.encode() + (b"\x00" if len(old) % 2 else b"")
    new_bytes = syntax.encode() + (b"\x00" if len(syntax) % 2 else b"")
    at = data.index(old_bytes)
    head = data[:at - 2] + struct.pack("<H", len(new_bytes)) + new_bytes + data[at + len(old_bytes):]
    # fix the File Meta Information Group Length
    ds = dcmread(io.BytesIO(head), stop_before_pixels=True)
    group_length = ds.file_meta.FileMetaInformationGroupLength + len(new_bytes) - len(old_bytes)
    glat = head.index(b"\x02\x00\x00\x00UL")
    return head[:glat + 8] + struct.pack("<L", group_length) + head[glat + 12:]


def _big_endian(seed: int) -> bytes:
    ds = _ds(seed)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _deflated(seed: int) -> bytes:
    ds = _ds(seed)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _encode(ds)


def _rows_as_text() -> bytes:
    """Rows (US) written with VR LO and a non-numeric value of the same length."""
    data = _encode(_ds(47))
    at = _element_offset(data, 0x00280010, b"US")
    return data[:at + 4] + b"LO" + struct.pack("<H", 2) + b"ab" + data[at + 10:]


def _empty_fragments(seed: int) -> bytes:
    ds = _compressed(JPEG2000Lossless, seed)
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return _encode(ds)


def _bad_item_tag(seed: int) -> bytes:
    ds = _compressed(JPEG2000Lossless, seed)
    data = bytearray(_encode(ds))
    at = data.index(b"\xfe\xff\x00\xe0", _element_offset(bytes(data), 0x7FE00010, b"OB"))
    second = data.index(b"\xfe\xff\x00\xe0", at + 8)
    data[second:second + 4] = b"\xfe\xff\xdd\xe1"  # neither an item nor the delimiter
    return bytes(data)


def _odd_offset_table(seed: int) -> bytes:
    ds = _compressed(JPEG2000Lossless, seed)
    frame = _frame(ds)
    ds.PixelData = (
        b"\xfe\xff\x00\xe0\x02\x00\x00\x00\x00\x00"
        + b"\xfe\xff\x00\xe0" + struct.pack("<L", len(frame) + len(frame) % 2) + frame + b"\x00" * (len(frame) % 2)
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    return _encode(ds)


def _private_blob(size: int) -> Dataset:
    ds = _ds(48)
    block = ds.private_block(0x0011, "XRAYBATCH TESTS", create=True)
    block.add_new(0x01, "OB", b"\x5a" * size)
    return ds


def cases() -> list[Case]:
    """Every case of the corpus, without writing it."""
    return [case for case, _ in _builders()]


def write_corpus(folder: Path) -> list[Case]:
    """Write every hostile file into ``folder`` (created) and return the cases, in writing order."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for case, build in _builders():
        target = os.path.join(os.fsencode(folder), os.fsencode(case.name))
        with open(target, "wb") as fh:
            fh.write(build())
        written.append(case)
    names = [c.name for c in written]
    if len(set(names)) != len(names):
        raise ValueError("two hostile cases share a file name")
    return written
