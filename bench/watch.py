"""Latency and throughput of ``xraybatch watch``, seen from outside as a DICOM router sees it. Medians, not tests.

    .venv/bin/python bench/watch.py                        # defaults below: 5 drops x 2 settle times, 100-file burst
    .venv/bin/python bench/watch.py --drops 5 --settle 2.0 --settle 0.5 --burst 100 --decode-processes 1 2

(a) Latency: one file is written beside the drop folder and renamed in (the drop); the clock stops when its
Structured Report appears in the outbox (written after the Secondary Capture, so: the second file in the
study's outbox folder). Each drop waits for the previous one to be filed away. The settle time dominates.
(b) Burst: ``--burst`` files renamed in at once; images/s = files / (time from the first rename to the last SR).

The daemon runs as ``python -m xraybatch watch`` with SQLite in a temporary work folder and the default
settings except those printed. Images are copies of pydicom-data's ``RG1_UNCR.dcm`` (CR chest PA, 1955x1841,
uncompressed) with new Study/Series/SOP Instance UIDs, or ``--file``. Models: the bundles shipped in
``xraybatch/bundles/`` when there are any, else tiny random-weight bundles in the real format (printed).
Numbers depend on the machine and on what else runs on it (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from xraybatch.settings import host_worker_count

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "xraybatch" / "bundles"


def bundles(tmp: Path) -> tuple[list[Path], str]:
    """The shipped bundles, or tiny random-weight ones made in ``tmp``; and a line saying which."""
    shipped = sorted(p.parent for p in SHIPPED.glob("*/model.json"))
    if shipped:
        return shipped, "shipped bundles: " + ", ".join(p.name for p in shipped)
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_tiny_bundle
    from xraybatch.models.findings import NIH_TARGETS

    made = [
        make_tiny_bundle(tmp / "tiny-binary"),
        make_tiny_bundle(tmp / "tiny-multilabel", name="tiny-multilabel", task="multilabel", targets=NIH_TARGETS,
                         channels=3, size=48, seed=1),
    ]
    return made, "tiny random-weight bundles (none shipped in xraybatch/bundles/): tiny-binary, tiny-multilabel"


def make_copies(source: Path, folder: Path, count: int, prefix: str) -> list[tuple[Path, str]]:
    """``count`` copies of ``source`` with new UIDs in ``folder``; returns (path, StudyInstanceUID) pairs."""
    ds = dcmread(source)
    out = []
    for i in range(count):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{prefix}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, str(ds.StudyInstanceUID)))
    return out


@contextmanager
def daemon(tmp: Path, models: list[Path], watch: dict[str, float], decode_processes: int,
           workers: int = 0) -> Iterator[Path]:
    """Run ``xraybatch watch`` on ``tmp/incoming`` (``workers`` 0: watch's default, one per core); yields the work
    folder once every worker is watching."""
    incoming, work = tmp / "incoming", tmp / "work"
    incoming.mkdir()
    config = tmp / "bench.toml"
    config.write_text(
        f"[pipeline]\ndecode_processes = {decode_processes}\n[watch]\n"
        + "".join(f"{k} = {v}\n" for k, v in watch.items())
    )
    argv = [sys.executable, "-m", "xraybatch", "-v", "--log-format", "json", "watch", str(incoming),
            "--workdir", str(work), "--config", str(config)] + (["--workers", str(workers)] if workers else [])
    for bundle in models:
        argv += ["--bundle", str(bundle)]
    log = tmp / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAYBATCH_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while log.read_text(errors="replace").count('"watching ') < host_worker_count(workers):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        yield work
    finally:
        proc.terminate()
        proc.wait(60)


class Reports:
    """Counts the Structured Reports under an outbox folder: the SR is the last object written for an image
    (after the Secondary Capture and the Parametric Maps), so its arrival ends the image's processing."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._modality: dict[Path, str] = {}

    def __call__(self) -> int:
        if self.folder.exists():
            for path in self.folder.rglob("[!.]*.dcm"):  # not the atomic writes' temp files (".name.tmp-...")
                if path not in self._modality:
                    ds = dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
                    self._modality[path] = str(ds.get("Modality", ""))
        return sum(1 for m in self._modality.values() if m == "SR")


def _wait(condition: object, timeout: float, poll: float) -> float:
    """Poll ``condition()`` until true; returns the perf_counter time it was first seen true."""
    deadline = time.perf_counter() + timeout
    while not condition():  # type: ignore[operator]
        if time.perf_counter() > deadline:
            raise TimeoutError("no result in time")
        time.sleep(poll)
    return time.perf_counter()


def latency(source: Path, models: list[Path], settle: float, drops: int, decode_processes: int,
            workers: int = 0) -> list[float]:
    """Seconds from the drop to the SR in the outbox, for ``drops`` single files one after the other."""
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        staging = tmp / "staging"
        staging.mkdir()
        copies = make_copies(source, staging, drops + 1, "single")
        times = []
        with daemon(tmp, models, {"settle_seconds": settle}, decode_processes, workers) as work:
            incoming, inflight, outbox = tmp / "incoming", work / "inflight", work / "outbox"
            for i, (path, study) in enumerate(copies):
                start = time.perf_counter()
                os.rename(path, incoming / path.name)
                reports = Reports(outbox / study)
                end = _wait(lambda r=reports: r() >= 1, 120, 0.005)
                if i > 0:  # the first file also pays for lazy imports in the daemon (Grad-CAM, highdicom)
                    times.append(end - start)
                _wait(lambda: not any(incoming.iterdir()) and not any(inflight.iterdir()), 60, 0.05)
            modalities = sorted(str(dcmread(p, stop_before_pixels=True).Modality)
                                for p in (outbox / copies[-1][1]).rglob("*.dcm"))
            assert "SR" in modalities and "OT" in modalities, modalities
        return times


def burst(source: Path, models: list[Path], settle: float, count: int, decode_processes: int,
          workers: int = 0) -> tuple[float, float]:
    """(seconds from the drop to the last SR, images/s) for ``count`` files renamed in at once."""
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        staging = tmp / "staging"
        staging.mkdir()
        warm = make_copies(source, staging, host_worker_count(workers), "warm")  # one per worker
        copies = make_copies(source, staging, count, "burst")
        with daemon(tmp, models, {"settle_seconds": settle}, decode_processes, workers) as work:
            incoming, outbox = tmp / "incoming", work / "outbox"
            for path, _ in warm:  # lazy imports happen here, outside the clock
                os.rename(path, incoming / path.name)
            reports = Reports(outbox)
            _wait(lambda: reports() >= len(warm), 120, 0.05)
            start = time.perf_counter()
            for path, _ in copies:
                os.rename(path, incoming / path.name)
            end = _wait(lambda: reports() >= count + 1, 3600, 0.05)
        seconds = end - start
        return seconds, count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, help="source DICOM (default: pydicom-data RG1_UNCR.dcm)")
    parser.add_argument("--drops", type=int, default=5, help="single-file drops per settle time (median)")
    parser.add_argument("--settle", type=float, action="append", help="settle_seconds to try (default 2.0, 0.5)")
    parser.add_argument("--burst", type=int, default=100, help="files in the burst (0: skip)")
    parser.add_argument("--burst-settle", type=float, default=2.0, help="settle_seconds for the burst")
    parser.add_argument("--decode-processes", type=int, nargs="+", default=[2],
                        help="[pipeline] decode_processes values for the burst (one worker; several take 1 each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0],
                        help="watch --workers values to try (0: watch's default, one per core)")
    args = parser.parse_args()
    source = args.file or Path(get_testdata_file("RG1_UNCR.dcm"))  # a single named file: no download
    with tempfile.TemporaryDirectory() as t:
        models, which = bundles(Path(t))
        header = dcmread(source, stop_before_pixels=True)
        print(f"models: {which}")
        print(f"images: {source.name}, {header.Rows}x{header.Columns}, {header.file_meta.TransferSyntaxUID.name}")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
        print("settings: defaults (poll_seconds 0.5, batch_size 8) except the values shown\n")
        for workers in args.workers:
            label = f"{host_worker_count(workers)} worker(s)" + (" (the default)" if not workers else "")
            for settle in args.settle or [2.0, 0.5]:
                times = latency(source, models, settle, args.drops, 2, workers)
                print(f"{label}: latency drop -> SR, settle_seconds {settle}: median {statistics.median(times):.2f} s "
                      f"(min {min(times):.2f}, max {max(times):.2f}, n={len(times)})")
            if args.burst:
                for processes in args.decode_processes:
                    seconds, rate = burst(source, models, args.burst_settle, args.burst, processes, workers)
                    print(f"{label}: burst of {args.burst}, settle_seconds {args.burst_settle}, decode_processes "
                          f"{processes}: {seconds:.1f} s from the drop to the last SR, {rate:.2f} images/s")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
