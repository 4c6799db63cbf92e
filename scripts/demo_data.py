"""Copy sample radiographs shipped by the PyPI package pydicom-data into a demo input folder.

Chest CR PA (MONOCHROME1, 15-bit) uncompressed and JPEG 2000 lossless; a CR extremity that xraybatch must
skip as not applicable; a second copy of one chest file that must be recorded as a duplicate; a text file
that must be rejected. File names carry no meaning to xraybatch.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pydicom.data import get_testdata_file

SAMPLES = {
    "RG1_UNCI.dcm": "chest-uncompressed",
    "RG1_J2KR.dcm": "chest-jpeg2000-lossless",
    "RG3_UNCI.dcm": "extremity",
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, target in SAMPLES.items():
        source = get_testdata_file(name)
        if source is None:
            raise SystemExit(f"pydicom-data does not provide {name}; install it with `pip install pydicom-data`")
        shutil.copyfile(source, out / target)
    shutil.copyfile(out / "chest-uncompressed", out / "chest-uncompressed-again")
    (out / "notes.txt").write_text("not an image\n", encoding="utf-8")
    print(f"demo input: {len(list(out.iterdir()))} files in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-input"))
