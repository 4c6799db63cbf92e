"""Frozen objects passed between the pipeline stages.

Each stage takes one of these plus its sub-config and returns a new one; only ``pipeline.py`` knows the order::

    Path -> InstanceHeader -> XrayImage -> DisplayImage -> ModelInput -> Prediction -> Heatmap -> Outcome
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset


def file_ref(path: Path) -> str:
    """How log lines name a file: ``file:`` and 12 hex digits of the SHA-256 of its absolute path.

    File names may carry patient names, so logs never show them; the results DB (``instances.path``) and the
    quarantine sidecars keep the path for people with access to the data. Any file name works, whether or not
    it is valid UTF-8 (the digest is taken over the name's bytes).
    """
    return "file:" + hashlib.sha256(os.fsencode(Path(path).absolute())).hexdigest()[:12]


_FS_BYTES = "fs-bytes:"  # prefix of a stored path whose name is not valid UTF-8 (base64 of its bytes follows)


def path_to_db(path: Path | str) -> str:
    """``path`` as text a database can store and :func:`path_from_db` turns back into the same path.

    Valid UTF-8 paths are stored as they are; a name that is not (or that starts with the marker) is stored as
    ``fs-bytes:`` and the base64 of its bytes, so a worker can open the file again from the queue row. For
    display and export use :func:`path_text`.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        if not text.startswith(_FS_BYTES):
            return text
    except UnicodeEncodeError:
        pass
    return _FS_BYTES + base64.urlsafe_b64encode(os.fsencode(text)).decode("ascii")


def path_from_db(text: str) -> str:
    """The path that :func:`path_to_db` stored as ``text``."""
    if text.startswith(_FS_BYTES):
        return os.fsdecode(base64.urlsafe_b64decode(text[len(_FS_BYTES):]))
    return text


def path_text(path: Path | str) -> str:
    """``path`` as text that any database, CSV or JSON file can store: valid UTF-8 always.

    A file name that is not valid UTF-8 (Python holds its undecodable bytes as surrogates) gets those bytes
    written as ``\\xNN`` escapes, so ``/in/caf\\xe9.dcm`` names the Latin-1 file ``café.dcm``; every other name
    is returned unchanged.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


class State(StrEnum):
    """Where an input file stands. Every input ends in exactly one final state."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"  # processed: predictions stored, outputs written
    NOT_APPLICABLE = "not_applicable"  # valid DICOM, but not a chest PA/AP radiograph
    REJECTED = "rejected"  # not readable as a usable image
    DUPLICATE = "duplicate"  # its SOP Instance UID was already taken
    FAILED = "failed"  # our own error; may be retried

    @property
    def is_final(self) -> bool:
        return self not in (State.QUEUED, State.PROCESSING)


FINAL_STATES = tuple(s for s in State if s.is_final)


@dataclass(frozen=True)
class InstanceHeader:
    """Identifying and selection attributes read without the pixel data."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    patient_id: str  # stored in the results DB, never logged
    modality: str
    body_part: str
    view_position: str
    photometric_interpretation: str
    rows: int
    columns: int
    transfer_syntax_uid: str
    pixel_data_offset: int = -1  # where the Pixel Data element starts in the file; -1: not known


@dataclass(frozen=True)
class XrayImage:
    """A decoded single-frame grayscale radiograph: header, the Dataset without pixels, stored values."""

    header: InstanceHeader
    dataset: Dataset  # every attribute but Pixel Data; source of the study context for the outputs
    pixels: np.ndarray  # 2-D stored values exactly as decoded
    notes: tuple[str, ...] = ()  # data-quality facts about the header (odd values passed on as received)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2:
            raise ValueError(f"pixels must be 2-D, got shape {self.pixels.shape}")


@dataclass(frozen=True)
class DisplayImage:
    """The radiograph as a person sees it: float32 in [0, 1], bone bright (MONOCHROME2 sense)."""

    pixels: np.ndarray  # float32, source geometry (rows, columns)
    notes: tuple[str, ...] = ()  # data-quality facts: VOI applied, MONOCHROME1 inverted, ...

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.dtype != np.float32:
            raise ValueError(f"pixels must be 2-D float32, got {self.pixels.dtype} {self.pixels.shape}")


@dataclass(frozen=True)
class ModelInput:
    """One image resampled for a model, plus the geometry to map a heat map back onto the source."""

    pixels: np.ndarray  # float32 (height, width) in [0, 1]
    source_shape: tuple[int, int]  # (rows, columns) of the source image


@dataclass(frozen=True)
class Prediction:
    """One model's output for one image, aligned with the model's ``targets``."""

    model_name: str
    model_version: str
    targets: tuple[str, ...]
    probabilities: tuple[float, ...]
    thresholds: tuple[float, ...]
    weights_sha256: str = ""  # of the bundle's weights file, checked at load; empty when not known

    def __post_init__(self) -> None:
        if not len(self.targets) == len(self.probabilities) == len(self.thresholds):
            raise ValueError("targets, probabilities and thresholds must have the same length")

    @property
    def positive(self) -> tuple[bool, ...]:
        """Per target: probability at or above its operating threshold."""
        return tuple(p >= t for p, t in zip(self.probabilities, self.thresholds))


def fit_within(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(rows, columns) of ``shape``'s aspect ratio with the longest side at most ``max_side`` (never larger)."""
    rows, cols = shape
    scale = min(1.0, max_side / max(rows, cols))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


@dataclass(frozen=True)
class Heatmap:
    """Grad-CAM for one positive finding, in [0, 1], over the whole source image.

    The values lie on a grid of the source's aspect ratio no finer than the outputs need (Grad-CAM holds a few
    dozen cells of detail); ``source_shape`` names the image they cover. Empty, the grid is the source's own.
    """

    model_name: str
    target: str
    probability: float
    values: np.ndarray  # float32 (rows, columns): the source's grid or a coarser one of the same aspect ratio
    source_shape: tuple[int, ...] = ()  # (rows, columns) of the source image; () = values.shape

    @property
    def covers(self) -> tuple[int, int]:
        """(rows, columns) of the source image the map covers."""
        rows, cols = self.source_shape or self.values.shape
        return int(rows), int(cols)


@dataclass(frozen=True)
class OutputRecord:
    """A DICOM object written to the outbox."""

    kind: str  # "sr" or "sc"
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


@dataclass(frozen=True)
class Outcome:
    """What happened to one input file."""

    path: Path
    state: State
    reason: str = ""
    header: InstanceHeader | None = None
    predictions: tuple[Prediction, ...] = ()
    outputs: tuple[OutputRecord, ...] = ()
    notes: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    retryable: bool = False  # a transient fault (disk full, outbox unwritable): try the file again later
    recorded: bool = True  # False: the worker's lease was lost and another worker holds the instance now
