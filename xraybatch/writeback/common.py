"""What the output objects share: labels, UIDs, numbers, equipment, identity, safe paths, the atomic write.

Output UIDs are derived, not random: the same source and model set always give the same Study-level Series
and SOP Instance UIDs, so re-processing a file rewrites its outputs instead of adding copies. They lie under
``[output] uid_root`` when a site configures one, else under ``2.25`` (a UUID-derived UID, PS3.5 B.2, which
needs no registration).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import highdicom as hd
from pydicom import Dataset, config
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import UID
from pydicom.valuerep import validate_value

from xraybatch import __version__
from xraybatch.domain import Prediction
from xraybatch.errors import InvalidInputError, WriteBackError
from xraybatch.files import fsync_dir
from xraybatch.logs import mask_exception_text

logger = logging.getLogger(__name__)

MANUFACTURER = "xraybatch"
SERIES_DESCRIPTION = "AI generated - not for diagnostic use"
BANNER = "AI GENERATED - NOT FOR DIAGNOSTIC USE"
DISCLAIMER = "AI generated - not for diagnostic use"

# PS3.7 D.3.3.2: our own Implementation Class UID (constant per release) and version name (SH, <= 16 chars)
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:xraybatch:implementation:{__version__}").int)
IMPLEMENTATION_VERSION_NAME = f"XRAYBATCH_{__version__}"[:16]

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# text VRs whose values are checked before they are copied into an output (UIDs are left alone)
_CHECKED_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UR", "UT"})
# the patient's and study's identity: copied exactly as received, even when a value does not validate,
# because an output whose identity differs from its source's reaches the PACS unmatched
IDENTITY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def remember_iod_lookups() -> None:
    """Let highdicom look up once whether an IOD has an attribute, not on every object it builds.

    highdicom's ``is_attribute_in_iod`` answers by walking the attributes of the IOD's modules (up to 4 ms a
    question for a CR image), and its constructors ask it several times per object, about 20 times per image:
    whether the source has pixel data, whether an IOD is multi-frame, which date attributes it has. The
    answer depends only on the arguments and highdicom's own tables of the standard, so each question is
    answered once per process (``functools.cache``). Every highdicom module that imported the function by name
    gets the cached one; a highdicom without this private function is left as it is.
    """
    import functools
    import sys

    utils = sys.modules.get("highdicom._standard_utils")
    original = getattr(utils, "is_attribute_in_iod", None)
    if original is None or hasattr(original, "cached"):
        return

    @functools.cache
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return bool(original(attribute, sop_class_uid, list(exclude) if exclude is not None else None))

    @functools.wraps(original)
    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return cached(attribute, str(sop_class_uid), exclude)

    is_attribute_in_iod.cached = cached  # type: ignore[attr-defined]
    for name, module in list(sys.modules.items()):
        if name.startswith("highdicom") and getattr(module, "is_attribute_in_iod", None) is original:
            module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]


remember_iod_lookups()


class OutputUids(NamedTuple):
    """The UIDs of one output object."""

    series_instance_uid: str
    sop_instance_uid: str


def is_uid(value: object) -> bool:
    """True for a valid UID (PS3.5 9.1): digits and dots, no leading zeros, at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def derive_uid(root: str, *parts: str) -> str:
    """A UID determined by ``parts``: ``2.25.<UUID v5>`` when ``root`` is empty, else ``<root>.<digits>``.

    Parameters
    ----------
    root
        ``[output] uid_root``: a site's registered root, or empty for the UUID-derived ``2.25`` form.
    parts
        What the UID identifies; the same parts always give the same UID.

    Returns
    -------
    str
        A valid UID of at most 64 characters.
    """
    name = "\x1f".join(parts)
    if not root:
        return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, name).int)
    room = 64 - len(root) - 1
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest(), "big")
    suffix = str(digest)[:room].lstrip("0") or "1"
    return f"{root}.{suffix}"


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


def output_uids(
    source: Dataset, kind: str, predictions: Sequence[Prediction], root: str = "", item: str = ""
) -> OutputUids:
    """Derive the Series and SOP Instance UIDs of an output from the source and the model set.

    Every output of one kind made by one model set in a study shares one series; the SOP Instance UID is
    unique per source image, kind, model set and ``item`` (the finding of a parametric map).

    Parameters
    ----------
    source
        The source image dataset.
    kind
        ``"sc"``, ``"sr"`` or ``"pm"``.
    predictions
        One prediction per model.
    root
        ``[output] uid_root``.
    item
        What distinguishes objects of one kind made from one source, e.g. ``"model/target"``.

    Returns
    -------
    OutputUids
        Deterministic UIDs under ``root`` (or ``2.25``).
    """
    models = model_set(predictions)
    return OutputUids(
        series_instance_uid=derive_uid(root, "series", str(source.StudyInstanceUID), kind, models),
        sop_instance_uid=derive_uid(root, "instance", str(source.SOPInstanceUID), kind, models, item),
    )


def instance_number(source: Dataset, kind: str, item: str = "") -> int:
    """A deterministic Instance Number, unique with overwhelming odds among the objects of one series.

    The objects of one series come from several source images (and, for parametric maps, several findings),
    and several workers write them with no shared counter; a number derived from the source's SOP Instance
    UID (and ``item``) is the same when a file is re-processed and differs between sources. It lies in
    ``[1, 999999999]`` (IS, PS3.5 6.2).
    """
    digest = hashlib.sha256(f"{source.SOPInstanceUID}\x1f{kind}\x1f{item}".encode()).digest()
    return 1 + int.from_bytes(digest[:8], "big") % 999_999_999


def device_identity(predictions: Sequence[Prediction]) -> str:
    """What makes xraybatch with these models one "device": each ``name@version#<weights sha256>``, sorted.

    The weights' sha256 (checked when the bundle is loaded) is left out where a prediction does not carry
    one. A retrained model is a new device even when its bundle keeps the version (IHE AI Results).

    Parameters
    ----------
    predictions
        One prediction per model.

    Returns
    -------
    str
        For example ``"nih-densenet@1.0#3f2a...,pneumonia@2.1#9b1c..."``.
    """
    return ",".join(
        sorted(
            f"{p.model_name}@{p.model_version}" + (f"#{p.weights_sha256}" if p.weights_sha256 else "")
            for p in predictions
        )
    )


def device_serial_number(predictions: Sequence[Prediction]) -> str:
    """The Device Serial Number of xraybatch with these models: 16 hex digits of the hash of
    :func:`device_identity`."""
    return hashlib.sha256(device_identity(predictions).encode()).hexdigest()[:16]


def device_uid(predictions: Sequence[Prediction], root: str = "") -> str:
    """The Device UID of xraybatch with these models, derived from :func:`device_identity`: a new model
    version or new weights give a new UID (IHE AI Results)."""
    return derive_uid(root, "device", MANUFACTURER, device_identity(predictions))


def usable_source(source: Dataset) -> Dataset:
    """The source with invalid non-identity text values emptied, so that the outputs do not inherit them.

    Real files carry values such as Patient's Age ``62`` (AS wants ``062Y``) that highdicom copies verbatim
    and ``dciodvfy`` reports as errors; an emptied value is allowed for these Type 2 and 3 attributes. The
    identity attributes (:data:`IDENTITY`) are never emptied: :func:`keep_identity` copies them exactly.

    Parameters
    ----------
    source
        The source image dataset.

    Returns
    -------
    pydicom.Dataset
        ``source`` itself when every checked value is valid, else a copy with the invalid values emptied.
    """
    bad = [
        elem
        for elem in source
        if elem.VR in _CHECKED_VRS and elem.keyword not in IDENTITY and not _is_valid(elem)
    ]
    invalid_identity = [
        elem for elem in source if elem.keyword in IDENTITY and elem.VR in _CHECKED_VRS and not _is_valid(elem)
    ]
    if not bad and not invalid_identity:
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
    for elem in invalid_identity:
        # highdicom validates what it copies: hand it an empty value, keep_identity restores the original
        clean[elem.tag] = DataElement(elem.tag, elem.VR, None)
        logger.info(
            "source %s has an invalid %s value; it is copied unchanged into the outputs",
            elem.keyword,
            elem.VR,
            extra={"sop_instance_uid": str(source.get("SOPInstanceUID", "")), "stage": "writeback"},
        )
    return clean


def keep_identity(output: Dataset, source: Dataset) -> None:
    """Copy the patient and study identity elements of ``source`` into ``output`` exactly as received.

    The elements are copied as they are (a value that does not validate stays as it is), so that the PACS
    files the output with its source. The source's Specific Character Set goes with them.
    """
    for keyword in IDENTITY:
        if keyword in source:
            output[keyword] = source[keyword]
    if "SpecificCharacterSet" in source:
        output.SpecificCharacterSet = source.SpecificCharacterSet


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
    source: Dataset, predictions: Sequence[Prediction], institution: str, root: str = ""
) -> list[hd.ContributingEquipment]:
    """The Contributing Equipment item that names xraybatch and the models (SOP Common, PS3.3 C.12.1).

    It carries the Device UID (0018,1002) and Device Serial Number (0018,1000) of these models (the same
    values as General Equipment and the SR's Device Observer), so a retrained model shows as a new device
    (IHE AI Results). Device UID is a Type 3 attribute of this sequence in PS3.3; dicom3tools' dciodvfy
    (2022 and 2026 builds) does not list it there and reports it as a Standard Extended attribute.

    Parameters
    ----------
    source
        The source image dataset; its InstitutionName is used when ``institution`` is empty.
    predictions
        One prediction per model.
    institution
        ``[output] institution``.
    root
        ``[output] uid_root``.

    Returns
    -------
    list of highdicom.ContributingEquipment
        One Processing Equipment item.
    """
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_versions(predictions),
        device_serial_number=device_serial_number(predictions),
        institution_name=institution or source.get("InstitutionName") or None,
        contribution_description=f"AI inference with {model_set(predictions)}; {SERIES_DESCRIPTION}",
    )
    item.DeviceUID = device_uid(predictions, root)  # highdicom's constructor has no parameter for it
    return [item]


def set_equipment(ds: Dataset, predictions: Sequence[Prediction], root: str = "") -> None:
    """General Equipment: Device Serial Number and Device UID of these models; file meta: our own."""
    ds.DeviceSerialNumber = device_serial_number(predictions)
    ds.DeviceUID = device_uid(predictions, root)
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME


def copy_series_context(output: Dataset, source: Dataset) -> None:
    """Study Description, Body Part Examined, timezone, and Laterality only when the source knows it.

    Laterality (General Series, Type 2C) is omitted when unknown, or taken from the source's Laterality or
    Image Laterality when that is R or L; Body Part Examined goes with it so that a reader (and
    ``dciodvfy``) can tell an unpaired body part.
    """
    for keyword in ("StudyDescription", "TimezoneOffsetFromUTC", "BodyPartExamined"):
        value = source.get(keyword)
        if value:
            setattr(output, keyword, value)
    if "Laterality" in output:
        del output.Laterality
    for keyword in ("Laterality", "ImageLaterality"):
        if source.get(keyword) in ("R", "L"):
            output.Laterality = source.get(keyword)
            break


def output_path(outbox: Path, ds: Dataset) -> Path:
    """``outbox/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, named by valid UIDs only.

    Raises
    ------
    InvalidInputError
        A UID is not a valid UID (PS3.5 9.1), or the path would lie outside the outbox: the source is at
        fault (its Study Instance UID names the study folder), so trying again cannot help. The message names
        the attribute, never its value.
    """
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not is_uid(ds.get(keyword)):
            raise InvalidInputError(
                f"the {keyword} of the output is not a valid UID (PS3.5 9.1: digits and dots, at most 64 "
                "characters); the source's study cannot name an output file, so it gets none"
            )
    path = outbox / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    if not path.resolve().is_relative_to(outbox.resolve()):
        raise InvalidInputError("the output path would lie outside the outbox; nothing was written")
    return path


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
            f"could not encode {path.name}: {mask_exception_text(str(err))}; the dataset holds an invalid value"
        ) from err
    logger.debug("wrote %s", path, extra={"sop_instance_uid": str(ds.SOPInstanceUID), "stage": "writeback"})
