"""The same picture as DICOM files in the encodings hospitals send: for the consistency check and its tests.

Each :class:`Encoding` is a stored-value map of an 8-bit grayscale picture ``v`` (as training reads a JPEG or
PNG: ``PIL.Image.convert("L")``) plus the attributes that tell a reader how to display it, so "the same picture"
is well defined: the stored values of a lossless encoding are exactly ``Encoding.stored(v)``.

============================  =================================================================================
``mono2-8bit``                 8-bit MONOCHROME2, stored ``v``, no VOI (the form training reads), uncompressed
``mono1-12bit-window``         12-bit MONOCHROME1, stored ``4095 - 16 v``, a window over the full 12-bit range
``mono2-16bit-rescale-voilut`` 16-bit MONOCHROME2, stored ``256 v + 128``, Rescale Slope 0.5 / Intercept 100,
                               a linear VOI LUT Sequence over the modality range, uncompressed
``mono1-15bit-j2k``            15-bit MONOCHROME1, stored ``32767 - 128 v``, no VOI, JPEG 2000 lossless
``mono2-10bit-jpegls-window``  10-bit MONOCHROME2, stored ``4 v + 2``, a window over the picture's own range,
                               JPEG-LS lossless
``mono2-8bit-jpeg90``          8-bit MONOCHROME2, stored ``v``, JPEG baseline (lossy, quality 90), no VOI
============================  =================================================================================

The files are CR Image Storage with frontal chest headers (Modality CR, BodyPartExamined CHEST, ViewPosition
PA or AP), fresh SOP Instance and Series UIDs per file and one Study per picture. Compression uses pydicom's
encoders (pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS); JPEG baseline bytes come from Pillow and are
encapsulated with :func:`pydicom.encaps.encapsulate`, as the Secondary Capture writer does.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
JPEG_QUALITY = 90
STUDY_DATE = "20260101"  # a fixed date: the files differ only by their UIDs from one run to the next


@dataclass(frozen=True)
class Encoding:
    """One way to store an 8-bit picture ``v``: ``stored = offset + scale * v`` (MONOCHROME2) or
    ``2**bits_stored - 1 - offset - scale * v`` (MONOCHROME1), with its VOI, rescale and transfer syntax.

    ``voi``: ``"none"``, ``"window-full"`` (Window Center/Width over the whole stored range), ``"window-data"``
    (over the picture's own stored range) or ``"lut-linear"`` (a linear VOI LUT Sequence over the modality range
    of every possible ``v``). ``rescale``: (slope, intercept) of the Modality LUT, or ``None``.
    """

    name: str
    description: str
    bits_stored: int
    photometric: str
    scale: int
    offset: int
    syntax: str
    lossless: bool
    voi: str = "none"
    rescale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {self.photometric!r}")
        if self.voi not in ("none", "window-full", "window-data", "lut-linear"):
            raise ValueError(f"voi must be none, window-full, window-data or lut-linear, got {self.voi!r}")
        if not 8 <= self.bits_stored <= 16 or self.offset + 255 * self.scale > (1 << self.bits_stored) - 1:
            raise ValueError(f"encoding {self.name}: offset + 255 * scale does not fit {self.bits_stored} bits")

    @property
    def bits_allocated(self) -> int:
        return 8 if self.bits_stored <= 8 else 16

    @property
    def top(self) -> int:
        """The largest stored value of the bit depth."""
        return (1 << self.bits_stored) - 1

    def stored(self, picture: np.ndarray) -> np.ndarray:
        """The stored values of an 8-bit picture (before any compression)."""
        values = self.offset + self.scale * np.asarray(picture, dtype=np.int64)
        if self.photometric == "MONOCHROME1":
            values = self.top - values
        return values.astype(np.uint8 if self.bits_allocated == 8 else np.uint16)


ENCODINGS: tuple[Encoding, ...] = (
    Encoding("mono2-8bit", "8-bit MONOCHROME2, no VOI, uncompressed", 8, "MONOCHROME2", 1, 0,
             ExplicitVRLittleEndian, True),
    Encoding("mono1-12bit-window", "12-bit MONOCHROME1, full-range window, uncompressed", 12, "MONOCHROME1", 16, 0,
             ExplicitVRLittleEndian, True, voi="window-full"),
    Encoding("mono2-16bit-rescale-voilut", "16-bit MONOCHROME2, rescale 0.5/+100, linear VOI LUT, uncompressed",
             16, "MONOCHROME2", 256, 128, ExplicitVRLittleEndian, True, voi="lut-linear", rescale=(0.5, 100.0)),
    Encoding("mono1-15bit-j2k", "15-bit MONOCHROME1, no VOI, JPEG 2000 lossless", 15, "MONOCHROME1", 128, 0,
             JPEG2000Lossless, True),
    Encoding("mono2-10bit-jpegls-window", "10-bit MONOCHROME2, window over the picture, JPEG-LS lossless", 10,
             "MONOCHROME2", 4, 2, JPEGLSLossless, True, voi="window-data"),
    Encoding("mono2-8bit-jpeg90", f"8-bit MONOCHROME2, no VOI, JPEG baseline quality {JPEG_QUALITY} (lossy)", 8,
             "MONOCHROME2", 1, 0, JPEGBaseline8Bit, False),
)
REFERENCE = ENCODINGS[0]  # the form training reads: the picture itself as MONOCHROME2 stored values
_BY_NAME = {e.name: e for e in ENCODINGS}


def encoding(name: str) -> Encoding:
    """The encoding called ``name``; raises ValueError naming the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}; known: {list(_BY_NAME)}") from None


def read_picture(path: Path) -> np.ndarray:
    """An image file as training reads it: 8-bit grayscale (``PIL.Image.convert("L")``)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def encode(picture: np.ndarray, enc: Encoding, *, study_instance_uid: str | None = None, view: str = "PA",
           patient_id: str = "CONSISTENCY", instance_number: int = 1) -> Dataset:
    """The DICOM CR dataset (with file meta) of ``picture`` in encoding ``enc``.

    Parameters
    ----------
    picture
        2-D uint8 grayscale picture with at least two distinct values.
    enc
        One of :data:`ENCODINGS`.
    study_instance_uid
        The Study the file belongs to (one per picture); a new one when omitted.
    view
        ViewPosition, ``"PA"`` or ``"AP"``.
    patient_id, instance_number
        Written as given (no patient data: the pictures come from public data sets).

    Raises
    ------
    ValueError
        When ``picture`` is not a 2-D uint8 array.
    """
    picture = np.asarray(picture)
    if picture.ndim != 2 or picture.dtype != np.uint8:
        raise ValueError(f"picture must be a 2-D uint8 array, got {picture.dtype} of shape {picture.shape}")
    if view not in ("PA", "AP"):
        raise ValueError(f"view must be 'PA' or 'AP', got {view!r}")
    stored = enc.stored(picture)
    ds = _header(picture.shape, enc, study_instance_uid or generate_uid(), view, patient_id, instance_number)
    _set_voi(ds, enc, stored)
    syntax = UID(enc.syntax)
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
    elif syntax == JPEGBaseline8Bit:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        frame = buffer.getvalue()
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = f"{stored.nbytes / len(frame):.2f}"[:16]
    else:
        ds.compress(syntax, stored, encoding_plugin="pyjpegls" if syntax == JPEGLSLossless else "pylibjpeg")
    return ds


def write_encodings(picture: np.ndarray, folder: Path, stem: str, encodings: Sequence[Encoding] = ENCODINGS, *,
                    view: str = "PA", patient_id: str = "CONSISTENCY") -> dict[str, tuple[Path, str]]:
    """Write ``picture`` once per encoding as ``folder/<stem>-<encoding>.dcm``, all in one new Study.

    Returns
    -------
    dict
        Encoding name -> (file path, SOP Instance UID).
    """
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    written: dict[str, tuple[Path, str]] = {}
    for number, enc in enumerate(encodings, start=1):
        ds = encode(picture, enc, study_instance_uid=study, view=view, patient_id=patient_id, instance_number=number)
        path = folder / f"{stem}-{enc.name}.dcm"
        partial = path.with_name(path.name + ".part")
        ds.save_as(partial, enforce_file_format=True)
        partial.replace(path)
        written[enc.name] = (path, str(ds.SOPInstanceUID))
    return written


def _header(shape: tuple[int, ...], enc: Encoding, study: str, view: str, patient_id: str,
            instance_number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Consistency^Check"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = ""
    ds.StudyID = "1"
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = "000000"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = instance_number
    ds.InstanceNumber = instance_number
    ds.Modality = "CR"
    ds.Manufacturer = "xraybatch consistency check"
    ds.SeriesDescription = f"consistency check: {enc.name}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = enc.photometric
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.BitsAllocated = enc.bits_allocated
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = 0
    if enc.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = enc.rescale
        ds.RescaleType = "US"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _set_voi(ds: Dataset, enc: Encoding, stored: np.ndarray) -> None:
    """The VOI of ``enc`` (PS3.3 C.11.2): a window in stored = modality units, or a linear VOI LUT."""
    if enc.voi == "window-full":
        ds.WindowCenter, ds.WindowWidth = (enc.top + 1) / 2.0, float(enc.top + 1)
    elif enc.voi == "window-data":
        low, high = int(stored.min()), int(stored.max())
        ds.WindowCenter, ds.WindowWidth = (low + high + 1) / 2.0, float(high - low + 1)
    elif enc.voi == "lut-linear":
        slope, intercept = enc.rescale or (1.0, 0.0)
        ends = [intercept + slope * float(s) for s in enc.stored(np.array([0, 255], dtype=np.uint8))]
        first, last = int(np.floor(min(ends))), int(np.ceil(max(ends)))
        entries = last - first + 1
        if first < 0 or not 1 < entries <= 65536:
            raise ValueError(f"encoding {enc.name}: a VOI LUT cannot cover modality values {first}..{last}")
        item = Dataset()
        # 65536 entries are written as 0; 16-bit entries (PS3.3 C.11.2.1.1 allows 8 or 16)
        item.add_new("LUTDescriptor", "US", [entries % 65536, first, 16])
        item.LUTExplanation = "linear"
        item.add_new("LUTData", "OW", np.rint(np.linspace(0, 65535, entries)).astype("<u2").tobytes())
        ds.VOILUTSequence = [item]
