"""What the Secondary Capture and the Structured Report share: labels, UIDs, equipment, the atomic write.

Output UIDs are derived, not random: the same source and model set always give the same SOP and Series
Instance UIDs, so re-running a file after a crash overwrites its outputs instead of adding a second copy.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import highdicom as hd
from pydicom import Dataset, config
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from xraybatch import __version__
from xraybatch.domain import Prediction
from xraybatch.errors import WriteBackError
from xraybatch.files import fsync_dir

logger = logging.getLogger(__name__)

MANUFACTURER = "xraybatch"
SERIES_DESCRIPTION = "AI generated - not for diagnostic use"
BANNER = "AI GENERATED - NOT FOR DIAGNOSTIC USE"

# text VRs whose values are checked before they are copied into an output (UIDs are left alone)
_CHECKED_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UR", "UT"})


class OutputUids(NamedTuple):
    """The UIDs of one output object."""

    series_instance_uid: str
    sop_instance_uid: str


def model_set(predictions: Sequence[Prediction]) -> str:
    """Identify the models behind an output: sorted ``name@version`` joined by ``,``.

    Parameters
    ----------
    predictions
        One prediction per model.

    Returns
    -------
    str
        For example ``"nih-densenet@1.0,pneumonia@2.1"``.
    """
    return ",".join(sorted(f"{p.model_name}@{p.model_version}" for p in predictions))


def output_uids(source: Dataset, kind: str, predictions: Sequence[Prediction]) -> OutputUids:
    """Derive the Series and SOP Instance UIDs of an output from the source and the model set.

    Every output of one kind made by one model set in a study shares one series; the SOP Instance UID is
    unique per source image, kind and model set.

    Parameters
    ----------
    source
        The source image dataset.
    kind
        ``"sc"`` or ``"sr"``.
    predictions
        One prediction per model.

    Returns
    -------
    OutputUids
        Deterministic UIDs under pydicom's UID root.
    """
    models = model_set(predictions)
    return OutputUids(
        series_instance_uid=generate_uid(entropy_srcs=[str(source.StudyInstanceUID), kind, models]),
        sop_instance_uid=generate_uid(entropy_srcs=[str(source.SOPInstanceUID), kind, models]),
    )


def usable_source(source: Dataset) -> Dataset:
    """The source with invalid text values emptied, so that the outputs do not inherit them.

    Real files carry values such as Patient's Age ``62`` (AS wants ``062Y``) that highdicom copies verbatim
    and ``dciodvfy`` reports as errors. An emptied value is allowed for Type 2 and 3 attributes.

    Parameters
    ----------
    source
        The source image dataset.

    Returns
    -------
    pydicom.Dataset
        ``source`` itself when every checked value is valid, else a copy with the invalid values emptied.
    """
    bad = [elem for elem in source if elem.VR in _CHECKED_VRS and not _is_valid(elem)]
    if not bad:
        return source
    clean = Dataset({elem.tag: elem for elem in source})
    for elem in bad:
        clean[elem.tag] = DataElement(elem.tag, elem.VR, None)
        logger.info(
            "source %s has an invalid %s value; it is left empty in the outputs",
            elem.keyword or elem.tag,
            elem.VR,
            extra={"sop_instance_uid": str(source.get("SOPInstanceUID", "")), "stage": "writeback"},
        )
    return clean


def _is_valid(elem: DataElement) -> bool:
    values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
    try:
        for value in values:
            if isinstance(value, str):
                validate_value(elem.VR, value, config.RAISE)
    except ValueError:
        return False
    return True


def software_versions(predictions: Sequence[Prediction]) -> list[str]:
    """``xraybatch <version>`` followed by ``name@version`` of each model (Software Versions, VM 1-n)."""
    return [f"{MANUFACTURER} {__version__}", *model_set(predictions).split(",")]


def contributing_equipment(
    source: Dataset, predictions: Sequence[Prediction], institution: str
) -> list[hd.ContributingEquipment]:
    """The Contributing Equipment item that names xraybatch and the models (PS3.3 C.7.5.1).

    Parameters
    ----------
    source
        The source image dataset; its InstitutionName is used when ``institution`` is empty.
    predictions
        One prediction per model.
    institution
        ``[output] institution``.

    Returns
    -------
    list of highdicom.ContributingEquipment
        One Processing Equipment item.
    """
    return [
        hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=MANUFACTURER,
            software_versions=software_versions(predictions),
            institution_name=institution or source.get("InstitutionName") or None,
            contribution_description=f"AI inference with {model_set(predictions)}; {SERIES_DESCRIPTION}",
        )
    ]


def output_path(outbox: Path, ds: Dataset) -> Path:
    """``outbox/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: named by UIDs only."""
    return outbox / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"


def atomic_write(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file so that ``path`` holds either the old file or the whole new one.

    The dataset goes to a temporary file in the same folder, is flushed and fsynced, replaces ``path``, and
    the folder is fsynced. The temporary file is removed on error.

    Parameters
    ----------
    ds
        A dataset with file meta information.
    path
        The destination; missing parent folders are created.

    Raises
    ------
    WriteBackError
        The folder or file could not be written, or the dataset could not be encoded.
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "xb") as fh:
                ds.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    except OSError as err:
        raise WriteBackError(
            f"could not write {path}: {err.strerror or err}; check that the outbox folder is a writable "
            "folder with free space (it is <workdir>/outbox)"
        ) from err
    except (ValueError, TypeError) as err:
        raise WriteBackError(
            f"could not encode {path.name}: {err}; the dataset holds an invalid value"
        ) from err
    logger.debug("wrote %s", path, extra={"sop_instance_uid": str(ds.SOPInstanceUID), "stage": "writeback"})
