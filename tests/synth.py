"""Synthetic DICOM radiographs for tests, written with pydicom (no patient data, UIDs generated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def chest_pixels(rows: int = 256, cols: int = 240, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A smooth chest-like pattern (two dark lung fields in a brighter body) as unsigned stored values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    yy, xx = y / rows, x / cols
    body = 0.7 - 0.3 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    lungs = np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2)) + np.exp(
        -(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2)
    )
    img = body - 0.4 * lungs + 0.02 * rng.standard_normal((rows, cols))
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * (2**bits - 1)).astype(np.uint16)


def make_dataset(
    pixels: np.ndarray | None = None,
    *,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    sop_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    **attributes: Any,
) -> Dataset:
    """A complete CR/DX image Dataset with file meta; extra keyword arguments become attributes."""
    if pixels is None:
        pixels = chest_pixels(bits=bits_stored)
    ds = Dataset()
    sop_class = {"CR": CR_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE, "CT": CTImageStorage}.get(modality, CR_IMAGE_STORAGE)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "xraybatch tests"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.2, 0.2]
    dtype = np.uint16 if ds.BitsAllocated == 16 else np.uint8
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_dicom(path: Path, ds: Dataset | None = None, **kwargs: Any) -> Path:
    """Write ``ds`` (or ``make_dataset(**kwargs)``) to ``path`` as a DICOM Part 10 file."""
    ds = ds if ds is not None else make_dataset(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
