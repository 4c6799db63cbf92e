"""Check what a deployment test run left behind: instances per final state in the results DB, and outputs.

    python deploy/check_results.py --db sqlite:///W/xraybatch.sqlite --outbox W/outbox --expect done=2 --expect rejected=1

Exits 1 with a message naming what differs. Used by `make offline-test`, `make image-test` and `make stack-test`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import pydicom
from sqlalchemy import create_engine, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="SQLAlchemy URL of the results DB")
    parser.add_argument("--outbox", type=Path, help="outbox folder: one SR and one SC per done instance")
    parser.add_argument("--expect", action="append", default=[], metavar="STATE=N", help="instances in STATE")
    args = parser.parse_args(argv)

    engine = create_engine(args.db)
    with engine.connect() as conn:
        states = Counter(dict(conn.execute(text("SELECT state, count(*) FROM instances GROUP BY state")).all()))
        outputs = Counter(dict(conn.execute(text("SELECT kind, count(*) FROM outputs GROUP BY kind")).all()))
    engine.dispose()
    problems = []
    for item in args.expect:
        state, _, count = item.partition("=")
        if states.get(state, 0) != int(count):
            problems.append(f"{state}: expected {count}, found {states.get(state, 0)}")
    done = states.get("done", 0)
    if args.outbox is not None:
        files = [p for p in args.outbox.rglob("*") if p.is_file()]
        modalities = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in files)
        if modalities.get("SR", 0) < done:
            problems.append(f"outbox {args.outbox}: {modalities.get('SR', 0)} SR for {done} done instances")
        print(f"outbox: {dict(modalities)}")
    print(f"instances: {dict(states)}; outputs: {dict(outputs)}")
    for problem in problems:
        print(f"check_results: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
