"""Run dicom3tools' dciodvfy on an output and sort its findings: the validator's own gaps are named here, once.

dciodvfy checks against its compiled copy of PS3.3/PS3.16. Two of its findings on our outputs are gaps in that
copy, not defects of the objects, and are left out by :func:`findings`:

- Device UID (0018,1002) in a Contributing Equipment Sequence item: a Type 3 attribute of that sequence in
  PS3.3 C.12.1 (SOP Common), which dciodvfy (its 2022 and 2026 builds) does not list there. It reports the
  attribute as "not present in standard DICOM IOD" and the object as a "Standard Extended SOP Class"; the
  second line is left out only when Device UID is the one attribute it reports so.
- A private coding scheme (designator ``99...``) is reported as an unrecognised defined term wherever its
  designator or UID occurs, although PS3.3 8.2 allows it and the SR declares it in the Coding Scheme
  Identification Sequence (dciodvfy does not read that sequence): left out only when ``private_scheme``
  names it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

NOT_IN_IOD = "Attribute is not present in standard DICOM IOD - "
DEVICE_UID_NOT_IN_IOD = NOT_IN_IOD + "(0x0018,0x1002) UI Device UID"
STANDARD_EXTENDED = "Dicom dataset contains attributes not present in standard DICOM IOD"


def lines(path: Path) -> list[str]:
    """Every ``Error`` and ``Warning`` line dciodvfy prints for ``path``, stripped."""
    out = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(("Error", "Warning"))]


def findings(path: Path, private_scheme: Iterable[str] = ()) -> list[str]:
    """dciodvfy's lines for ``path`` without the validator gaps described in the module docstring.

    Parameters
    ----------
    path
        A DICOM file.
    private_scheme
        The designator and UID of a declared private coding scheme whose "Unrecognized defined term" lines
        are left out.
    """
    found = lines(path)
    not_in_iod = [ln for ln in found if NOT_IN_IOD in ln]
    only_device_uid = bool(not_in_iod) and all(ln.endswith(DEVICE_UID_NOT_IN_IOD) for ln in not_in_iod)
    private = [f"<{term}>" for term in private_scheme]
    kept = []
    for line in found:
        if line.endswith(DEVICE_UID_NOT_IN_IOD) or (only_device_uid and STANDARD_EXTENDED in line):
            continue
        if "Unrecognized defined term" in line and any(term in line for term in private):
            continue
        kept.append(line)
    return kept
