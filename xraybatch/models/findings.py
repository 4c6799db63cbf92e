"""The one table of model targets and the codes that name them in DICOM outputs.

Target names are spelled as in the NIH ChestX-ray14 data (and ``Pneumonia`` for the binary model). Each finding
is coded with a standard concept where one exists, in this order of preference:

1. a concept of the DICOM chest CAD context groups (CID 6100-6129) or of pydicom's code dictionaries
   (``pydicom.sr.codedict.codes.SCT``, ``codes.DCM``, ...): looked up by keyword, never retyped;
2. a SNOMED CT concept that DICOM does not list (``SCT``, the concept id and its preferred term);
3. the private scheme ``99XRAYBATCH`` (declared with name, UID and responsible organisation in the SR's
   Coding Scheme Identification Sequence) only where neither exists.

"No Finding" is not a finding: the SR states it as a qualitative evaluation "Impression = No abnormality"
(:data:`NO_ABNORMALITY`). docs/outputs.md lists the table.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

PRIVATE_SCHEME = "99XRAYBATCH"
PRIVATE_SCHEME_NAME = "xraybatch chest radiograph findings"
# a UUID-derived UID (PS3.5 B.2) needs no registration; it names this scheme and never changes
PRIVATE_SCHEME_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:xraybatch:coding-scheme:findings").int)
PRIVATE_SCHEME_ORGANIZATION = "xraybatch"

# The NIH ChestX-ray14 findings in NIH order, then "No Finding": the multi-label model's output order.
NIH_TARGETS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
    "No Finding",
)
BINARY_TARGETS: tuple[str, ...] = ("Pneumonia",)
NO_FINDING = "No Finding"


@dataclass(frozen=True)
class FindingCode:
    """A coded concept: (value, scheme designator, meaning), and where the code comes from."""

    value: str
    scheme: str
    meaning: str
    source: str  # "pydicom codes.SCT.<kw>", "pydicom codes.DCM.<kw>", "SNOMED CT", or "private"


def _dicom(scheme: str, keyword: str) -> FindingCode:
    from pydicom.sr.codedict import codes

    code = getattr(getattr(codes, scheme), keyword)
    return FindingCode(code.value, code.scheme_designator, code.meaning, f"pydicom codes.{scheme}.{keyword}")


def _snomed(value: str, meaning: str) -> FindingCode:
    """A SNOMED CT concept that DICOM's code lists do not hold (id and preferred term)."""
    return FindingCode(value, "SCT", meaning, "SNOMED CT")


def _private(value: str, meaning: str) -> FindingCode:
    return FindingCode(value, PRIVATE_SCHEME, meaning, "private")


TARGET_CODES: dict[str, FindingCode] = {
    "Atelectasis": _snomed("46621007", "Atelectasis"),
    "Cardiomegaly": _dicom("SCT", "Cardiomegaly"),
    "Effusion": _dicom("SCT", "PleuralEffusion"),
    "Infiltration": _dicom("DCM", "Infiltrate"),  # CID 6104 Abnormal Opacity Finding or Feature
    "Mass": _dicom("SCT", "Mass"),  # CID 6104
    "Nodule": _dicom("SCT", "Nodule"),  # CID 6104
    "Pneumonia": _snomed("233604007", "Pneumonia"),
    "Pneumothorax": _dicom("SCT", "Pneumothorax"),  # CID 6105
    "Consolidation": _snomed("95436008", "Lung consolidation"),
    "Edema": _dicom("SCT", "PulmonaryEdema"),
    "Emphysema": _snomed("87433001", "Pulmonary emphysema"),
    "Fibrosis": _dicom("SCT", "Fibrosis"),
    # no concept in pydicom's dictionaries (any scheme) or in the chest CAD groups CID 6100-6129, no DCM
    # code, no SNOMED CT id confirmed from a reliable source: private until one is (docs/outputs.md, "Codes")
    "Pleural_Thickening": _private("XRB-013", "Pleural thickening"),
    "Hernia": _snomed("84089009", "Hiatal hernia"),  # ChestX-ray14 "Hernia" is the hiatal hernia seen on a CXR
    "No Finding": _dicom("DCM", "NoAbnormality"),  # stated as "Finding = No abnormality", never as a finding
}

# DCM 121073 "Impression", the concept name of the "No Finding" statement; not DCM 121071 "Finding", which
# TID 1501 uses for the Finding Type and readers would take for one
IMPRESSION = _dicom("DCM", "Impression")
NO_ABNORMALITY = TARGET_CODES[NO_FINDING]


def label(target: str) -> str:
    """How people read a target: ``Pleural_Thickening`` -> ``Pleural thickening``."""
    text = target.replace("_", " ")
    return text[:1] + text[1:].lower() if " " in text else text
