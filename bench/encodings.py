"""Probability spread across encodings of the same validation pictures, through run-folder. Prints the table.

    .venv/bin/python bench/encodings.py                     # both shipped bundles, 20 pictures each
    .venv/bin/python bench/encodings.py --bundle DIR --data ../shared/data/kermany --n 200 --json spread.json

A thin script over :func:`training.consistency.measure_bundle` (the same measurement as
``xraybatch train consistency``; docs/training.md describes the encodings). Without ``--data``, a bundle's data
root is ../shared/data/kermany or ../shared/data/nih_cxr14, by the layout its provenance names. Spread = max -
min of a probability over the encodings of one picture; target: max <= 0.02 over the lossless encodings.
The seconds per file depend on the machine and what else runs on it (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.consistency import measure_bundle, spread_summary, spread_table
from xraybatch.models.registry import SHIPPED_BUNDLES, read_bundle

SHARED = ROOT.parent / "shared" / "data"
DATA_BY_LAYOUT = {"kermany": SHARED / "kermany", "nih": SHARED / "nih_cxr14"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", type=Path, default=[],
                        help="bundle dir (repeatable; default: the shipped bundles)")
    parser.add_argument("--data", type=Path, help="data root of every bundle (default: by the bundle's layout)")
    parser.add_argument("--n", type=int, default=20, help="validation pictures per bundle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the reports to this JSON file")
    args = parser.parse_args()
    bundles = args.bundle or sorted(d for d in SHIPPED_BUNDLES.iterdir() if (d / "model.json").is_file())
    print(f"load average {os.getloadavg()[0]:.1f}")
    reports = []
    for bundle in bundles:
        layout = read_bundle(bundle).meta.get("provenance", {}).get("layout", "")
        data = args.data or DATA_BY_LAYOUT.get(layout)
        if data is None:
            parser.error(f"{bundle}: layout {layout!r} has no default data root; pass --data")
        report = measure_bundle(bundle, data, args.n, args.seed, args.threads)
        reports.append(report)
        print(f"\n{spread_summary(report)}\n{spread_table(report)}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
