"""The one table of model targets and the codes that name them in DICOM outputs.

Target names are spelled as in the NIH ChestX-ray14 data (and ``Pneumonia`` for the binary model). A finding
is coded with SNOMED CT where pydicom's code dictionary (``pydicom.sr.codedict.codes.SCT``) holds the concept;
the rest use the private coding scheme ``99XRAYBATCH`` (documented in docs/results-db.md), so that no code
value is typed from memory.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIVATE_SCHEME = "99XRAYBATCH"
PRIVATE_SCHEME_NAME = "xraybatch findings"

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
    """A coded concept: (value, scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


def _sct(keyword: str) -> FindingCode:
    from pydicom.sr.codedict import codes

    code = getattr(codes.SCT, keyword)
    return FindingCode(code.value, code.scheme_designator, code.meaning)


def _private(value: str, meaning: str) -> FindingCode:
    return FindingCode(value, PRIVATE_SCHEME, meaning)


TARGET_CODES: dict[str, FindingCode] = {
    "Atelectasis": _private("XRB-001", "Atelectasis"),
    "Cardiomegaly": _sct("Cardiomegaly"),
    "Effusion": _sct("PleuralEffusion"),
    "Infiltration": _private("XRB-004", "Infiltration"),
    "Mass": _sct("Mass"),
    "Nodule": _sct("Nodule"),
    "Pneumonia": _private("XRB-007", "Pneumonia"),
    "Pneumothorax": _sct("Pneumothorax"),
    "Consolidation": _private("XRB-009", "Consolidation"),
    "Edema": _sct("PulmonaryEdema"),
    "Emphysema": _private("XRB-011", "Emphysema"),
    "Fibrosis": _sct("Fibrosis"),
    "Pleural_Thickening": _private("XRB-013", "Pleural thickening"),
    "Hernia": _private("XRB-014", "Hernia"),
    "No Finding": _private("XRB-015", "No finding"),
}
