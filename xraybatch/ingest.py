"""Read and validate a DICOM file: the header first (cheap rejection), then the pixels.

``read_header`` parses everything but Pixel Data (``stop_before_pixels``); ``select`` applies the series
selection rules of ``[ingest]`` (Modality, BodyPartExamined, ViewPosition); ``check_image`` rejects what we
cannot decode or should not try to (multi-frame, colour, tiny, enormous, no decoder for the transfer syntax);
``read`` decodes the pixels with pydicom's plugins (pylibjpeg, openjpeg, libjpeg, GDCM).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from xraybatch.domain import InstanceHeader, XrayImage
from xraybatch.errors import InvalidInputError, NotApplicableError
from xraybatch.settings import IngestConfig

logger = logging.getLogger(__name__)

# Errors pydicom raises on damaged files; anything else is our bug and is reported as such by the pipeline.
_READ_ERRORS = (
    InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error, OverflowError,
    NotImplementedError,  # an unknown VR, raised when the value is first converted
)
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def read_header(path: Path, cfg: IngestConfig) -> tuple[InstanceHeader, Dataset]:
    """Parse the file's header without its pixel data and check the identifying attributes.

    Raises
    ------
    InvalidInputError
        For an empty, oversized, non-DICOM or damaged file, or one without SOP/Study/Series UIDs.
    """
    size = path.stat().st_size
    if size == 0:
        raise InvalidInputError("empty file (0 bytes)")
    if size > cfg.max_file_bytes:
        raise InvalidInputError(
            f"file of {size} bytes exceeds ingest.max_file_bytes ({cfg.max_file_bytes}); raise the limit to accept it"
        )
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as err:
        raise InvalidInputError("not a DICOM file: no 'DICM' prefix and no File Meta Information") from err
    except _READ_ERRORS as err:
        raise InvalidInputError(f"damaged DICOM header: {type(err).__name__}: {err}") from err
    try:
        header = _header(path, ds)
    except _READ_ERRORS as err:  # pydicom converts values lazily: a damaged element fails here, not in dcmread
        raise InvalidInputError(f"damaged DICOM header: {type(err).__name__}: {err}") from err
    return header, ds


def _header(path: Path, ds: Dataset) -> InstanceHeader:
    """The identifying attributes of ``ds``; raises pydicom's conversion errors for damaged values."""
    missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID") if not _text(ds, k)]
    if missing:
        raise InvalidInputError(f"DICOM header lacks {', '.join(missing)}")
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    return InstanceHeader(
        path=path,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        accession_number=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        view_position=_text(ds, "ViewPosition").upper(),
        photometric_interpretation=_text(ds, "PhotometricInterpretation").upper(),
        rows=rows,
        columns=columns,
        transfer_syntax_uid=transfer_syntax,
    )


def select(header: InstanceHeader, cfg: IngestConfig) -> None:
    """Apply the series selection rules; return quietly for a chest PA/AP radiograph.

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
    """Reject, before decoding, images we cannot or should not decode.

    Raises
    ------
    InvalidInputError
        For multi-frame, colour, tiny or enormous images, and transfer syntaxes without a decoder.
    """
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InvalidInputError(f"multi-frame image ({frames} frames); only single-frame radiographs are read")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or header.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidInputError(
            f"colour or unsupported image (PhotometricInterpretation {header.photometric_interpretation or '(empty)'!r}, "
            f"SamplesPerPixel {samples}); radiographs are MONOCHROME1/MONOCHROME2"
        )
    if min(header.rows, header.columns) < cfg.min_size:
        raise InvalidInputError(
            f"image of {header.rows}x{header.columns} pixels is smaller than ingest.min_size ({cfg.min_size})"
        )
    if header.rows * header.columns > cfg.max_pixels:
        raise InvalidInputError(
            f"image of {header.rows}x{header.columns} pixels exceeds ingest.max_pixels ({cfg.max_pixels})"
        )
    syntax = header.transfer_syntax_uid
    if syntax and syntax not in _UNCOMPRESSED:
        name = UID(syntax).name
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise InvalidInputError(
                f"transfer syntax {syntax} ({name}) cannot be decoded: no pixel data decoder plugin supports it"
            )


def read(header: InstanceHeader) -> XrayImage:
    """Decode the pixel data of ``header.path``.

    Returns
    -------
    XrayImage
        The Dataset with its Pixel Data removed, and the 2-D stored values.

    Raises
    ------
    InvalidInputError
        When the file has no pixel data or it cannot be decoded (truncated, corrupt).
    """
    try:
        ds = dcmread(header.path)
    except _READ_ERRORS as err:
        raise InvalidInputError(f"damaged DICOM file: {type(err).__name__}: {err}") from err
    if "PixelData" not in ds:
        raise InvalidInputError("the file has no Pixel Data (7FE0,0010)")
    try:
        pixels = ds.pixel_array
    except (*_READ_ERRORS, RuntimeError, NotImplementedError, AttributeError) as err:
        raise InvalidInputError(f"pixel data could not be decoded (truncated or corrupt?): {err}") from err
    if pixels.ndim != 2:
        raise InvalidInputError(f"expected a single grayscale frame, decoded an array of shape {pixels.shape}")
    if pixels.shape != (header.rows, header.columns):
        raise InvalidInputError(f"decoded {pixels.shape} pixels, header says {header.rows}x{header.columns}")
    del ds.PixelData
    return XrayImage(header=header, dataset=ds, pixels=np.asarray(pixels))
