"""Tiny synthetic datasets in the three layouts, for tests and demos (no patient data).

"Pneumonia" images carry a bright blob in one lung field, so a small network can learn the task in an epoch.
File names follow the Kermany patterns, with two images per patient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

KERMANY_SPLITS = ("train", "val", "test")


def chest_picture(size: int, positive: bool, rng: np.random.Generator) -> np.ndarray:
    """An 8-bit grey chest-like picture (two dark lungs), with an opacity when ``positive``."""
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((x - 0.3) / 0.12) ** 2 + ((y - 0.5) / 0.25) ** 2)) + np.exp(
        -(((x - 0.7) / 0.12) ** 2 + ((y - 0.5) / 0.25) ** 2))
    img = 0.75 - 0.45 * lungs + 0.04 * rng.standard_normal((size, size))
    if positive:
        cx = 0.3 if rng.random() < 0.5 else 0.7
        img += 0.6 * np.exp(-(((x - cx) / 0.08) ** 2 + ((y - 0.55) / 0.1) ** 2))
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def write_kermany(root: Path, per_class: int = 12, size: int = 48, seed: int = 0,
                  splits: tuple[str, ...] = ("train",), duplicates: int = 1) -> Path:
    """Write ``root/<split>/{NORMAL,PNEUMONIA}/*.jpeg`` with Kermany-style names; returns ``root``.

    Patients have two images each; ``duplicates`` Normal files of the train split are byte-identical copies of
    an image of another patient (as in the real data).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for s, split in enumerate(splits):
        base = 1000 * s
        for cls in ("NORMAL", "PNEUMONIA"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                patient = base + i // 2
                picture = chest_picture(size, cls == "PNEUMONIA", rng)
                if cls == "NORMAL":
                    prefix = "NORMAL2-" if i % 4 == 3 else ""
                    name = f"{prefix}IM-{patient:04d}-{i % 2 + 1:04d}.jpeg"
                else:
                    name = f"person{patient}_{'virus' if i % 3 == 0 else 'bacteria'}_{i + 1}.jpeg"
                Image.fromarray(picture).save(folder / name, quality=95)
        if split == "train":
            normals = sorted((root / split / "NORMAL").glob("IM-*.jpeg"))
            for k in range(duplicates):
                src = normals[k]
                (root / split / "NORMAL" / f"IM-{9000 + k:04d}-0001.jpeg").write_bytes(src.read_bytes())
    return root


def write_nih(root: Path, patients: int = 8, per_patient: int = 2, size: int = 32, seed: int = 0) -> Path:
    """A miniature NIH ChestX-ray14 tree: metadata CSV, official split lists and PNG images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    meta = root / "metadata"
    images = root / "images"
    meta.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    rows = [("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
            "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")]
    train_val: list[str] = []
    test: list[str] = []
    findings = ["No Finding", "Effusion", "Pneumonia|Infiltration", "Cardiomegaly"]
    for p in range(1, patients + 1):
        for k in range(per_patient):
            name = f"{p:08d}_{k:03d}.png"
            label = findings[(p + k) % len(findings)]
            rows.append(f"{name},{label},{k},{p},50,M,PA,{size},{size},0.14,0.14")
            (test if p > patients - 2 else train_val).append(name)
            if p != 3:  # one patient listed but absent on disk
                Image.fromarray(chest_picture(size, "Pneumonia" in label, rng)).save(images / name)
    (meta / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
    (meta / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (meta / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def write_dicom_folder(root: Path, per_class: int = 6, size: int = 48, seed: int = 0) -> Path:
    """DICOM files (MONOCHROME2, 8-bit, no VOI) plus ``labels.csv`` with file, label and patient_id columns."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["file,label,patient_id"]
    for label in (0, 1):
        for i in range(per_class):
            pixels = chest_picture(size, bool(label), rng)
            ds = Dataset()
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
            ds.SOPInstanceUID = generate_uid()
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.PatientID = f"P{label}{i // 2:03d}"
            ds.Modality = "CR"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = pixels.shape
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            ds.PixelData = pixels.tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            name = f"img{label}{i:03d}.dcm"
            ds.save_as(root / name, enforce_file_format=True)
            lines.append(f"{name},{'PNEUMONIA' if label else 'NORMAL'},{'' if i == 0 else ds.PatientID}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root
