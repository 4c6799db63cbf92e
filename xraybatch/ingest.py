"""Read and judge a DICOM file completely before any of it is processed: header, structure, then pixels.

``read_header`` parses everything but Pixel Data (``stop_before_pixels``) and validates the identifying
attributes (the UIDs per PS3.5 9.1); ``select`` applies the selection rules of ``[ingest]`` (SOP Class,
Modality, BodyPartExamined, ViewPosition); ``check_image`` rejects what we cannot or should not decode
(multi-frame, colour, tiny, enormous, odd bit depths, no decoder) and checks the Pixel Data element against
the header: its length against Rows x Columns x SamplesPerPixel x BitsAllocated x frames for native data, its
fragment structure and codestream frame header for encapsulated data, so a truncated copy is rejected with its
reason before it reaches a decoder. ``read`` decodes the pixels: compressed data in this process's decoder
child (:mod:`xraybatch.isolation`), so that a decoder crash ends only that file.

Every reason names the element (keyword and tag) and what is wrong with it, never the element's value: a
reason is stored in the results DB and logged, and a value may be a patient's name or birth date.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Iterable
from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from xraybatch import isolation
from xraybatch.domain import InstanceHeader, XrayImage
from xraybatch.errors import DecoderCrashedError, InvalidInputError, NotApplicableError
from xraybatch.logs import install_in_worker, mask_exception_text
from xraybatch.settings import IngestConfig

logger = logging.getLogger(__name__)

# Errors pydicom raises on damaged files; anything else is our bug and is reported as such by the pipeline.
_READ_ERRORS = (
    InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error, OverflowError,
    NotImplementedError,  # an unknown VR, raised when the value is first converted
    LookupError, RecursionError, MemoryError, AttributeError, IndexError,
)
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_RLE = "1.2.840.10008.1.2.5"
_J2K_FAMILY = {
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
}
_UIDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_PIXEL_TAGS = {0x7FE00010: "Pixel Data", 0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}
_DA = re.compile(r"^\d{8}$")
_DECIMALS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")  # used by the LUT stages
_CODESTREAM_PREFIX = 1 << 16  # bytes of the first fragment searched for the frame header


def _name(keyword: str) -> str:
    """``Keyword (gggg,eeee)``: how a reason names an element."""
    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _raw(ds: Dataset, keyword: str) -> Any:
    """The converted value of ``keyword`` (``None`` when absent); a damaged value raises naming the element."""
    if keyword not in ds:
        return None
    try:
        return ds[keyword].value
    except _READ_ERRORS as err:
        raise InvalidInputError(
            f"{_name(keyword)} cannot be read ({type(err).__name__}): the element is damaged or has a wrong VR"
        ) from err


def _text(ds: Dataset | None, keyword: str) -> str:
    """A text element as one string (multiple values joined with ``\\``); ``""`` when absent or empty."""
    if ds is None:
        return ""
    value = _raw(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError as err:
            raise InvalidInputError(f"{_name(keyword)} is not text (it holds binary data)") from err
    return str(value).replace("\x00", "").strip()


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """An integer element (US, IS, or a number stored with a wrong VR); ``default`` when absent or empty."""
    value = _raw(ds, keyword)
    if value is None or value == "" or value == b"":
        return default
    if isinstance(value, MultiValue | list | tuple):
        if len(value) != 1:
            raise InvalidInputError(f"{_name(keyword)} holds {len(value)} values; it must hold one integer")
        value = value[0]
    if isinstance(value, bool):
        raise InvalidInputError(f"{_name(keyword)} is not an integer")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bytes | str):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        text = text.replace("\x00", "").strip()
        if re.fullmatch(r"[+-]?\d{1,10}", text):
            return int(text)
    raise InvalidInputError(f"{_name(keyword)} is not an integer (VR {ds[keyword].VR} with a non-numeric value)")


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID element, validated per PS3.5 9.1; raises naming the element, never quoting the value."""
    value = _text(ds, keyword)
    if not value:
        raise InvalidInputError(f"DICOM header lacks {_name(keyword)}")
    if len(value) > 64:
        raise InvalidInputError(
            f"{_name(keyword)} is not a valid UID: {len(value)} characters, PS3.5 9.1 allows at most 64"
        )
    if not UID(value).is_valid:
        raise InvalidInputError(
            f"{_name(keyword)} is not a valid UID: PS3.5 9.1 allows only digits and dots, with no empty "
            "component and no leading zero in a component"
        )
    return value


def _decimals(ds: Dataset, keyword: str) -> None:
    """Check that a DS element holds finite decimal numbers (the LUT stages compute with them)."""
    value = _raw(ds, keyword)
    if value is None or value == "":
        return
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{_name(keyword)} is not a decimal number (DS)") from err
    if not all(np.isfinite(numbers)):
        raise InvalidInputError(f"{_name(keyword)} is not a finite decimal number (DS)")


def read_header(path: Path, cfg: IngestConfig) -> tuple[InstanceHeader, Dataset]:
    """Parse the file's header without its pixel data and check the identifying attributes.

    Raises
    ------
    InvalidInputError
        For an empty, oversized, non-DICOM or damaged file, one without SOP/Study/Series UIDs, or one whose UIDs
        are not valid (PS3.5 9.1: digits and dots, at most 64 characters, no leading zero in a component).
    """
    try:
        size = path.stat().st_size
    except OSError as err:
        raise InvalidInputError(f"the file cannot be read ({type(err).__name__}: {os.strerror(err.errno or 0)})") from err
    if size == 0:
        raise InvalidInputError("empty file (0 bytes)")
    if size > cfg.max_file_bytes:
        raise InvalidInputError(
            f"file of {size} bytes exceeds ingest.max_file_bytes ({cfg.max_file_bytes}); raise the limit to accept it"
        )
    try:
        with open(path, "rb") as fp:
            ds = dcmread(fp, stop_before_pixels=True)
            offset = fp.tell()
    except InvalidDicomError as err:
        raise InvalidInputError("not a DICOM file: no 'DICM' prefix and no File Meta Information") from err
    except _READ_ERRORS as err:
        raise InvalidInputError(f"damaged DICOM header: {_describe(err)}") from err
    try:
        header = _header(path, ds, offset)
    except _READ_ERRORS as err:  # pydicom converts values lazily: a damaged element fails here, not in dcmread
        raise InvalidInputError(f"damaged DICOM header: {_describe(err)}") from err
    return header, ds


def _describe(err: BaseException) -> str:
    """A pydicom read error for a reason: type and message, with any quoted value withheld."""
    return mask_exception_text(f"{type(err).__name__}: {' '.join(str(err).split())}")[:300]


def _header(path: Path, ds: Dataset, pixel_data_offset: int = -1) -> InstanceHeader:
    """The identifying attributes of ``ds``; raises InvalidInputError naming a damaged or invalid element."""
    uids = {keyword: _uid(ds, keyword) for keyword in _UIDS}
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    if transfer_syntax and not UID(transfer_syntax).is_valid:
        raise InvalidInputError(f"{_name('TransferSyntaxUID')} in the File Meta Information is not a valid UID")
    return InstanceHeader(
        path=path,
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        accession_number=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        view_position=_text(ds, "ViewPosition").upper(),
        photometric_interpretation=_text(ds, "PhotometricInterpretation").upper(),
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        transfer_syntax_uid=transfer_syntax,
        pixel_data_offset=pixel_data_offset,
    )


def select(header: InstanceHeader, cfg: IngestConfig) -> None:
    """Apply the selection rules; return quietly for a chest PA/AP radiograph of an accepted SOP Class.

    Raises
    ------
    NotApplicableError
        With the attribute, its value and the setting that would accept it.
    """
    if header.modality not in cfg.modalities:
        raise NotApplicableError(
            f"Modality {header.modality or '(empty)'!r} not in ingest.modalities {list(cfg.modalities)}; "
            "add it to [ingest] modalities to process it"
        )
    if header.sop_class_uid not in cfg.sop_classes:
        name = UID(header.sop_class_uid).name
        described = f"{header.sop_class_uid} ({name})" if name != header.sop_class_uid else header.sop_class_uid
        raise NotApplicableError(
            f"SOPClassUID {described} is not a radiograph storage class in ingest.sop_classes; "
            "add it to [ingest] sop_classes to process it"
        )
    if header.body_part:
        if header.body_part not in cfg.body_parts:
            raise NotApplicableError(
                f"BodyPartExamined {header.body_part!r} not in ingest.body_parts {list(cfg.body_parts)}; "
                "add it to [ingest] body_parts to process it"
            )
    elif not cfg.accept_missing_body_part:
        raise NotApplicableError("BodyPartExamined is empty and ingest.accept_missing_body_part is false")
    if header.view_position:
        if header.view_position not in cfg.views:
            raise NotApplicableError(
                f"ViewPosition {header.view_position!r} not in ingest.views {list(cfg.views)}; "
                "add it to [ingest] views to process it (laterals are not read by the models)"
            )
    elif not cfg.accept_missing_view:
        raise NotApplicableError("ViewPosition is empty and ingest.accept_missing_view is false")


def check_image(header: InstanceHeader, ds: Dataset, cfg: IngestConfig) -> None:
    """Judge the image completely before decoding: attributes, transfer syntax and the Pixel Data element.

    Raises
    ------
    InvalidInputError
        For multi-frame, colour, tiny or enormous images, odd bit depths, transfer syntaxes without a decoder,
        and Pixel Data that does not match the header: too short for Rows x Columns x SamplesPerPixel x
        BitsAllocated x frames (native), or a damaged fragment structure or codestream frame header
        (encapsulated, PS3.5 A.4), as in a truncated copy.
    """
    frames = _int(ds, "NumberOfFrames", 1)
    if frames < 1:
        raise InvalidInputError(f"{_name('NumberOfFrames')} is {frames}; an image has at least one frame")
    if frames > 1:
        raise InvalidInputError(f"multi-frame image ({frames} frames); only single-frame radiographs are read")
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1 or header.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2"):
        shown = header.photometric_interpretation[:16] or "(empty)"
        raise InvalidInputError(
            f"colour or unsupported image (PhotometricInterpretation {shown!r}, SamplesPerPixel {samples}); "
            "radiographs are MONOCHROME1/MONOCHROME2"
        )
    if header.rows <= 0 or header.columns <= 0:
        raise InvalidInputError(f"{_name('Rows')} or {_name('Columns')} is missing or zero")
    if min(header.rows, header.columns) < cfg.min_size:
        raise InvalidInputError(
            f"image of {header.rows}x{header.columns} pixels is smaller than ingest.min_size ({cfg.min_size})"
        )
    if header.rows * header.columns > cfg.max_pixels:
        raise InvalidInputError(
            f"image of {header.rows}x{header.columns} pixels exceeds ingest.max_pixels ({cfg.max_pixels})"
        )
    bits_allocated = _int(ds, "BitsAllocated", 0)
    if bits_allocated not in (8, 16, 32):
        raise InvalidInputError(
            f"{_name('BitsAllocated')} is {bits_allocated}; grayscale radiographs are stored with 8, 16 or 32 bits"
        )
    bits_stored = _int(ds, "BitsStored", bits_allocated)
    if not 1 <= bits_stored <= bits_allocated:
        raise InvalidInputError(
            f"{_name('BitsStored')} is {bits_stored}, outside 1..BitsAllocated ({bits_allocated})"
        )
    representation = _int(ds, "PixelRepresentation", 0)
    if representation not in (0, 1):
        raise InvalidInputError(f"{_name('PixelRepresentation')} is {representation}; it must be 0 or 1")
    for keyword in _DECIMALS:
        _decimals(ds, keyword)
    syntax = header.transfer_syntax_uid or "1.2.840.10008.1.2"
    if syntax not in _NATIVE:
        name = UID(syntax).name
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise InvalidInputError(
                f"transfer syntax {syntax} ({name}) cannot be decoded: no pixel data decoder plugin supports it"
            )
    if syntax == _DEFLATED:
        return  # the data set is deflated as a whole: its Pixel Data is checked as it is decoded
    expected = (header.rows * header.columns * samples * bits_allocated * frames + 7) // 8
    _check_pixel_data(header, syntax, expected)


def _check_pixel_data(header: InstanceHeader, syntax: str, expected: int) -> None:
    """Find the Pixel Data element in the file and check its length or fragment structure against the header."""
    path = header.path
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            offset = header.pixel_data_offset
            if offset < 0:
                dcmread(fp, stop_before_pixels=True)
                offset = fp.tell()
            _check_element(fp, offset, size, syntax, expected, header)
    except InvalidInputError:
        raise
    except _READ_ERRORS as err:
        raise InvalidInputError(f"the Pixel Data element cannot be read: {_describe(err)}") from err


def _check_element(fp: BinaryIO, offset: int, size: int, syntax: str, expected: int, header: InstanceHeader) -> None:
    endian = ">" if syntax == _BIG_ENDIAN else "<"
    fp.seek(offset)
    head = fp.read(12)
    if len(head) < 8:
        raise InvalidInputError("the file has no Pixel Data (7FE0,0010)")
    group, element = struct.unpack(f"{endian}HH", head[:4])
    tag = group << 16 | element
    if tag not in _PIXEL_TAGS:
        raise InvalidInputError("the file has no Pixel Data (7FE0,0010)")
    if tag != 0x7FE00010:
        raise InvalidInputError(f"the image is stored as {_PIXEL_TAGS[tag]}, not Pixel Data (7FE0,0010)")
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR
        if vr in _LONG_VRS:
            if len(head) < 12:
                raise InvalidInputError("the file ends inside the Pixel Data element header (truncated copy)")
            length = struct.unpack(f"{endian}L", head[8:12])[0]
            value_offset = offset + 12
        else:
            length = struct.unpack(f"{endian}H", head[6:8])[0]
            value_offset = offset + 8
    else:
        length = struct.unpack(f"{endian}L", head[4:8])[0]
        value_offset = offset + 8
    name = UID(syntax).name
    if syntax in _NATIVE:
        if length == 0xFFFFFFFF:
            raise InvalidInputError(
                f"Pixel Data is encapsulated (compressed fragments) but the transfer syntax is {name}: "
                "the File Meta Information names the wrong transfer syntax"
            )
        if length not in (expected, expected + expected % 2):  # PS3.5 8.1.1: padded to an even length
            raise InvalidInputError(
                f"Pixel Data holds {length} bytes, but Rows x Columns x SamplesPerPixel x BitsAllocated x frames "
                f"needs {expected}: the header does not match the pixel data"
            )
        present = size - value_offset
        if present < length:
            raise InvalidInputError(
                f"the file ends inside Pixel Data: {max(present, 0)} of its {length} bytes are present "
                "(truncated copy)"
            )
        return
    if length != 0xFFFFFFFF:
        raise InvalidInputError(
            f"Pixel Data has a defined length ({length} bytes), but transfer syntax {name} stores it "
            "encapsulated (PS3.5 A.4): the File Meta Information names the wrong transfer syntax"
        )
    fragments = _fragments(fp, value_offset, size, endian)
    _check_codestream(fp, fragments, syntax, header)


def _fragments(fp: BinaryIO, offset: int, size: int, endian: str) -> list[tuple[int, int]]:
    """The (offset, length) of every fragment after the Basic Offset Table; checks the item structure."""
    items: list[tuple[int, int]] = []
    position = offset
    while True:
        if position + 8 > size:
            raise InvalidInputError(
                f"the file ends inside the encapsulated Pixel Data after {max(len(items) - 1, 0)} fragments, "
                "before its Sequence Delimitation Item (truncated copy)"
            )
        fp.seek(position)
        group, element, length = struct.unpack(f"{endian}HHL", fp.read(8))
        tag = group << 16 | element
        if tag == 0xFFFEE0DD:
            break
        if tag != 0xFFFEE000:
            raise InvalidInputError(
                f"the encapsulated Pixel Data holds an element ({group:04X},{element:04X}) where item "
                f"{len(items) + 1} should start: the fragment structure is damaged (PS3.5 A.4)"
            )
        if length == 0xFFFFFFFF:
            raise InvalidInputError(
                f"item {len(items) + 1} of the encapsulated Pixel Data has an undefined length (PS3.5 A.4)"
            )
        if position + 8 + length > size:
            what = "the Basic Offset Table" if not items else f"fragment {len(items)}"
            raise InvalidInputError(
                f"{what} of the encapsulated Pixel Data ({length} bytes) runs past the end of the file "
                "(truncated copy)"
            )
        items.append((position + 8, length))
        position += 8 + length
    if not items:
        raise InvalidInputError("the encapsulated Pixel Data has no Basic Offset Table item (PS3.5 A.4)")
    if items[0][1] % 4:
        raise InvalidInputError(
            f"the Basic Offset Table of the encapsulated Pixel Data is {items[0][1]} bytes, not a multiple of 4"
        )
    fragments = [f for f in items[1:] if f[1] > 0]
    if not fragments:
        raise InvalidInputError("the encapsulated Pixel Data has no fragments: the image is missing")
    return fragments


def _check_codestream(fp: BinaryIO, fragments: list[tuple[int, int]], syntax: str, header: InstanceHeader) -> None:
    """The compressed frame's start, end and declared size, checked before it reaches a native decoder."""
    name = UID(syntax).name
    first_offset, first_length = fragments[0]
    fp.seek(first_offset)
    start = fp.read(min(first_length, _CODESTREAM_PREFIX))
    if syntax == _RLE:
        _check_rle(start, first_length, header)
        return
    last_offset, last_length = fragments[-1]
    fp.seek(last_offset + max(0, last_length - 3))
    tail = fp.read(min(3, last_length)).rstrip(b"\x00")
    if not tail.endswith(b"\xff\xd9"):
        raise InvalidInputError(
            f"the {name} codestream does not end with an end-of-image marker (FFD9): the compressed image is "
            "cut short (truncated copy) or damaged"
        )
    if syntax in _J2K_FAMILY:
        declared = _j2k_size(start)
    else:
        declared = _jpeg_size(start)
    if declared is None:
        if start[:2] not in (b"\xff\xd8", b"\xff\x4f") and start[4:8] != b"jP  ":
            raise InvalidInputError(f"the {name} codestream does not start with a start-of-image marker")
        raise InvalidInputError(f"the {name} codestream has no frame header (SOF/SIZ): the compressed image is damaged")
    rows, columns, components = declared
    if components != 1 or columns != header.columns or rows not in (0, header.rows):
        raise InvalidInputError(
            f"the {name} codestream declares {rows}x{columns} pixels in {components} components, the header "
            f"{header.rows}x{header.columns} (Rows x Columns) in 1: the header or the compressed image is wrong"
        )


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the frame header (SOFn, or SOF55 for JPEG-LS) of a JPEG codestream."""
    if data[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):
            position += 2
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image before any frame header
            return None
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            frame = data[position + 4:position + 10]
            if len(frame) < 6 or length < 8:
                return None
            _precision, rows, columns, components = struct.unpack(">BHHB", frame)
            return rows, columns, components
        if length < 2:
            return None
        position += 2 + length
    return None


def _j2k_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SIZ marker segment of a JPEG 2000 codestream (ISO 15444-1 A.5.1)."""
    index = data.find(b"\xff\x4f\xff\x51")
    if index < 0:
        return None
    siz = data[index + 4:index + 4 + 38]
    if len(siz) < 38:
        return None
    _lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz = struct.unpack(">HHLLLL", siz[:20])
    components = struct.unpack(">H", siz[36:38])[0]
    return max(ysiz - yosiz, 0), max(xsiz - xosiz, 0), components


def _check_rle(start: bytes, length: int, header: InstanceHeader) -> None:
    """The RLE header (PS3.5 G.3.1): segment count and offsets inside the fragment."""
    if len(start) < 64:
        raise InvalidInputError("the RLE Lossless fragment is shorter than its 64-byte header: damaged or cut short")
    values = struct.unpack("<16L", start[:64])
    count = values[0]
    if not 1 <= count <= 15:
        raise InvalidInputError(f"the RLE Lossless header declares {count} segments; PS3.5 G.3.1 allows 1 to 15")
    offsets = values[1:count + 1]
    if offsets[0] != 64 or any(b <= a for a, b in pairwise(offsets)) or offsets[-1] >= length:
        raise InvalidInputError("the RLE Lossless segment offsets are out of order or past the fragment's end")


def read(header: InstanceHeader) -> XrayImage:
    """Decode the pixel data of ``header.path``: compressed data in this process's decoder child.

    A native decoder that aborts, segfaults or hangs on the file ends only this call (:mod:`xraybatch.isolation`).

    Returns
    -------
    XrayImage
        The Dataset with its Pixel Data removed, the 2-D stored values, and data-quality notes on the header
        (an unknown character set, a birth date that is not a DICOM date) for the results DB.

    Raises
    ------
    DecoderCrashedError
        The decoder crashed or hung on this file ("the pixel data could not be decoded: the decoder crashed").
    InvalidInputError
        When the file has no pixel data or it cannot be decoded (truncated, corrupt).
    """
    install_in_worker()  # a decode worker process masks library warnings like its parent
    path = header.path
    syntax = header.transfer_syntax_uid
    try:
        if isolation.needs_isolation(syntax):
            ds = dcmread(path, stop_before_pixels=True)
            pixels = _decode_isolated(path, syntax)
        else:
            ds = dcmread(path)
            if "PixelData" not in ds:
                raise InvalidInputError("the file has no Pixel Data (7FE0,0010)")
            pixels = ds.pixel_array
            del ds.PixelData
    except (InvalidInputError, isolation.DecoderUnavailable):
        raise  # DecoderUnavailable is the host's fault: the pipeline records it as failed, to be retried
    except (*_READ_ERRORS, RuntimeError) as err:  # pydicom's decoders raise RuntimeError on damaged data
        raise InvalidInputError(f"the pixel data could not be decoded: {_describe(err)}") from err
    if pixels.ndim != 2:
        raise InvalidInputError(f"expected a single grayscale frame, decoded an array of shape {pixels.shape}")
    if pixels.shape != (header.rows, header.columns):
        raise InvalidInputError(f"decoded {pixels.shape} pixels, header says {header.rows}x{header.columns}")
    return XrayImage(header=header, dataset=ds, pixels=np.asarray(pixels), notes=tuple(_notes(ds)))


def _decode_isolated(path: Path, syntax: str) -> np.ndarray:
    try:
        return isolation.decode(path, syntax)
    except isolation.DecoderCrashed as err:
        raise DecoderCrashedError(f"{DecoderCrashedError.default_message} ({err.plugin} {err.how})") from err
    except isolation.DecodeError as err:
        detail = mask_exception_text("; ".join(err.errors))[:400]
        raise InvalidInputError(f"the pixel data could not be decoded: {detail}") from err


def _notes(ds: Dataset) -> Iterable[str]:
    """Data-quality facts about attributes passed on to the outputs (they do not stop processing).

    Text in a character set with ISO 2022 code extensions, in several character sets, or in one pydicom does
    not know is decoded here (PS3.5 6.1) and the Dataset is re-labelled UTF-8 (``ISO_IR 192``): the outputs
    then carry the same characters, in a character set every DICOM writer and viewer handles.
    """
    try:
        charsets = ds.get("SpecificCharacterSet")
    except _READ_ERRORS:
        charsets = "(unreadable)"
    if charsets is not None:
        terms = [str(t).strip() for t in ([charsets] if isinstance(charsets, str | bytes) else list(charsets))]
        unknown = [t for t in terms if t and t not in python_encoding]
        if unknown:
            yield (
                f"{_name('SpecificCharacterSet')} has {len(unknown)} term(s) outside PS3.3 C.12.1.1.2; "
                "text was decoded with the default repertoire"
            )
        plain = len(terms) == 1 and not unknown and not terms[0].startswith("ISO 2022")
        if not plain and any(terms):
            ds.decode()
            ds.SpecificCharacterSet = "ISO_IR 192"
            yield f"{_name('SpecificCharacterSet')} with code extensions or several terms: text passed on as UTF-8"
    if "PatientBirthDate" in ds:
        try:
            value = ds["PatientBirthDate"].value
        except _READ_ERRORS:
            value = None
        text = str(value or "").strip()
        if text and not _valid_date(text):
            yield f"{_name('PatientBirthDate')} is not a DICOM date (DA, YYYYMMDD); passed on as received"


def _valid_date(text: str) -> bool:
    if not _DA.match(text):
        return False
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True
