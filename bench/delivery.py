"""Delivery throughput to a real Orthanc: 100 outputs over one association (C-STORE) and in one STOW-RS request.

    .venv/bin/python bench/delivery.py                 # 50 synthetic CR images -> 100 outputs (SC + SR)
    .venv/bin/python bench/delivery.py --images 50 --verify commitment --pdu 131072

Measured here (2 shared cores, load average 5): C-STORE 13.8 objects/s over one association (9.9 before
TCP_NODELAY), STOW-RS 41.5 objects/s in one request; the SC is 1024x960 RGB (2.9 MB), the SR a few kB.

Needs root (Orthanc runs in a network namespace with only loopback, as in the tests) and the Debian packages
orthanc and orthanc-dicomweb. The outputs are made by ``run_folder`` with a tiny random-weight bundle (the
model does not matter here); the SC of a 256x240 source is the SC xraybatch writes for it (8-bit RGB). The
clock covers ``deliver_pending`` alone: reading the files, the association or request, the answers, and the
results DB updates. Numbers depend on the machine and what else runs on it (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import pacs
from tests.conftest import make_tiny_bundle
from tests.synth import write_dicom
from xraybatch.db import session as db_session
from xraybatch.delivery import deliver_pending
from xraybatch.pipeline import run_folder
from xraybatch.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50, help="source images (two outputs each)")
    parser.add_argument("--verify", choices=["none", "commitment"], default="none")
    parser.add_argument("--pdu", type=int, default=16384, help="Orthanc's MaximumPduLength (its default: 16384)")
    args = parser.parse_args()
    reason = pacs.netns_unavailable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundle = make_tiny_bundle(tmp / "bundle")
        for i in range(args.images):
            write_dicom(tmp / "in" / f"{i}.dcm", seed=i)
        with pacs.netns() as ns:
            commit_port = pacs.free_port()
            modalities = {"xraybatch": ["XRAYBATCH", "127.0.0.1", commit_port]}
            for protocol in ("dicom", "dicomweb"):
                work = tmp / f"work-{protocol}"
                settings = load_settings(None, {
                    "workdir": work, "model": {"bundles": [str(bundle)]}, "pipeline": {"decode_processes": 1},
                    "delivery": {"batch_size": 2 * args.images, "concurrency": 1, "verify": args.verify,
                                 "commitment_port": commit_port, "timeout": 120.0, "commitment_timeout": 120.0},
                }, environ={})
                run_folder(tmp / "in", settings)
                sessions = db_session.make_sessionmaker(db_session.make_engine(settings.db_url))
                orthanc = pacs.Orthanc(ns, tmp / f"orthanc-{protocol}", modalities=modalities,
                                       config={"MaximumPduLength": args.pdu}).start()
                try:
                    url = orthanc.dicom_url if protocol == "dicom" else orthanc.dicomweb_url
                    with pacs.in_netns(ns):
                        start = time.perf_counter()
                        report = deliver_pending(sessions, [url], settings.delivery)
                        seconds = time.perf_counter() - start
                    stored = int(orthanc.rest("/statistics")["CountInstances"])
                finally:
                    orthanc.stop()
                how = "one association (C-STORE)" if protocol == "dicom" else "one STOW-RS request"
                print(f"{how}: {report.sent} sent, {report.unsent} unsent, {stored} stored in Orthanc, "
                      f"{seconds:.2f} s, {report.sent / seconds:.1f} objects/s (verify={args.verify}, PDU {args.pdu})")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
