"""The one worker loop under ``run-folder``: real signals, resumed runs, copies of one instance, other sources.

``run-folder`` runs as a real subprocess over synthetic 160x160 radiographs with a tiny random-weight bundle.
Each interrupt test sends SIGINT, SIGTERM and SIGKILL at random moments (the seed is printed) to successive
runs over the same folder and database, then reruns to the end, and checks: every input has exactly one row, in
a final state; one SR and one SC per done instance; the input files byte for byte as they were, and no file
added to the folder; no process of a stopped run outlives it.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from tests.conftest import make_tiny_bundle
from tests.integration import throwaway_postgres_database
from tests.synth import chest_pixels, make_dataset
from xraybatch.db import queue
from xraybatch.db.session import make_engine, make_sessionmaker, upgrade
from xraybatch.db.tables import Instance
from xraybatch.pipeline import folder_source, run_folder, take_in_folder
from xraybatch.settings import load_settings, worker_count

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
ROOT = Path(__file__).resolve().parents[2]
CONFIG = """\
[pipeline]
batch_size = 6
decode_processes = 2
[model]
threads = 1
[watch]
heartbeat_seconds = 0.5
lease_seconds = 5
grace_seconds = 20
poll_seconds = 0.1
settle_seconds = 0.3
orphan_seconds = 1
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-binary")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'work' / 'xraybatch.sqlite'}"
    else:
        with throwaway_postgres_database() as url:
            yield url


def dicom_bytes(seed: int, **attributes: object) -> bytes:
    buffer = io.BytesIO()
    make_dataset(chest_pixels(160, 160, seed=seed), **attributes).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def damaged(data: bytes) -> bytes:
    """The file cut inside its Pixel Data: the header reads fine, the pixels do not."""
    return data[: len(data) - 20_000]


def make_inbox(inbox: Path, good: int) -> dict[str, str]:
    """``good`` radiographs, a damaged copy before its good copy, a good copy before its damaged copy, and junk.

    Returns the expected final state per file name.
    """
    inbox.mkdir(parents=True)
    expected = {}
    for i in range(good):
        (inbox / f"p{i:03d}.dcm").write_bytes(dicom_bytes(i))
        expected[f"p{i:03d}.dcm"] = "done"
    first, second = dicom_bytes(9001), dicom_bytes(9002)
    (inbox / "dup-a-damaged.dcm").write_bytes(damaged(first))
    (inbox / "dup-b-good.dcm").write_bytes(first)
    (inbox / "dup-c-good.dcm").write_bytes(second)
    (inbox / "dup-d-damaged.dcm").write_bytes(damaged(second))
    (inbox / "notes.txt").write_text("not an image")
    expected |= {"dup-a-damaged.dcm": "rejected", "dup-b-good.dcm": "done", "dup-c-good.dcm": "done",
                 "dup-d-damaged.dcm": "rejected", "notes.txt": "rejected"}
    return expected


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Runs:
    """``xraybatch run-folder`` subprocesses over one folder, work folder and results DB."""

    def __init__(self, root: Path, inbox: Path, db_url: str, bundle: Path) -> None:
        self.root, self.inbox, self.db_url, self.bundle = root, inbox, db_url, bundle
        self.workdir = root / "work"
        self.config = root / "xraybatch.toml"
        self.config.write_text(CONFIG)
        self.engine = make_engine(db_url)
        self.sessions = make_sessionmaker(self.engine)
        self.logs: list[Path] = []

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "xraybatch", "-v", "--log-format", "json", "run-folder", str(self.inbox),
                "--workdir", str(self.workdir), "--db", self.db_url, "--bundle", str(self.bundle),
                "--config", str(self.config), "--no-progress", *extra]
        log = self.root / f"run-{len(self.logs)}.log"
        self.logs.append(log)
        env = {k: v for k, v in os.environ.items() if not k.startswith("XRAYBATCH_")}
        with open(log, "wb") as out:
            return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def rows(self) -> list[Instance]:
        try:
            with self.sessions() as s:
                return list(s.scalars(select(Instance).order_by(Instance.id)))
        except Exception:  # noqa: BLE001 - the schema may not exist yet while the first run starts
            return []

    def done(self) -> int:
        return sum(r.state == "done" for r in self.rows())

    def workers_alive(self) -> int:
        with self.sessions() as s:
            return len(queue.status(s, alive_within_seconds=5).workers_alive)

    def interrupt(self, rng: random.Random, signum: int, *extra: str, workers: int = 1) -> int:
        """Start a run, send ``signum`` at a random moment while it processes; returns its exit code.

        Before the signal, ``status`` must count the run's ``workers`` worker processes alive.
        """
        before = self.done()
        proc = self.start(*extra)
        target = before + rng.randint(2, 15)
        wait_for(lambda: self.done() >= target or proc.poll() is not None, 180, f"{target} done rows")
        wait_for(lambda: self.workers_alive() == workers or proc.poll() is not None, 60, f"{workers} workers")
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the signal: {self.logs[-1].read_text()[-3000:]}")
        time.sleep(rng.uniform(0, 0.5))
        family = descendants(proc.pid)
        proc.send_signal(signum)
        code = proc.wait(60)
        family |= {p for p in descendants(proc.pid)} if alive(proc.pid) else set()
        wait_for(lambda: not any(alive(p) for p in family), 20, f"the processes of the run to end: {family}")
        return code


def check_every_input_once(runs: Runs, expected: dict[str, str], before: dict[str, str]) -> list[Instance]:
    rows = runs.rows()
    by_name = Counter(Path(r.path).name for r in rows)
    assert by_name == Counter(expected.keys()), "one row per input file"
    states = {Path(r.path).name: r.state for r in rows}
    assert states == expected
    assert all(r.source == folder_source(runs.inbox.resolve()) for r in rows)
    assert digests(runs.inbox) == before, "input files untouched, none added or removed"
    for name in ("dup-a-damaged.dcm", "dup-d-damaged.dcm"):
        [row] = [r for r in rows if Path(r.path).name == name]
        assert "decode" in row.reason or "pixel" in row.reason.lower(), row.reason
    outputs = sorted(runs.workdir.joinpath("outbox").rglob("*.dcm"))
    done_uids = {r.sop_instance_uid for r in rows if r.state == "done"}
    kinds: dict[str, list[str]] = {}
    for path in outputs:
        ds = dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID == PARAMETRIC_MAP:
            continue  # a map per explained finding, beside the one SR and one SC
        ref = (ds.SourceImageSequence[0].ReferencedSOPInstanceUID if "SourceImageSequence" in ds else
               ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        kinds.setdefault(ref, []).append(ds.Modality)
    assert set(kinds) == done_uids and all(sorted(k) == ["OT", "SR"] for k in kinds.values())
    return rows


@pytest.mark.slow
def test_run_folder_through_sigint_sigterm_and_sigkill_then_a_rerun_processes_every_file_once(
    tmp_path: Path, bundle: Path, db_url: str
) -> None:
    seed = random.randrange(1_000_000)
    print(f"seed {seed}")
    rng = random.Random(seed)
    expected = make_inbox(tmp_path / "in", good=146)
    before = digests(tmp_path / "in")
    runs = Runs(tmp_path, tmp_path / "in", db_url, bundle)
    try:
        assert runs.interrupt(rng, signal.SIGINT, "--workers", "1") == 130  # one worker, in the command's process
        assert "interrupted by SIGINT" in runs.logs[-1].read_text()
        assert not any(r.state == "processing" for r in runs.rows())  # the batch finished or went back

        proc_done = runs.done()
        workers = 2 if db_url.startswith("sqlite") else 1  # worker processes do not depend on the database
        code = runs.interrupt(rng, signal.SIGTERM, "--workers", str(workers), workers=workers)
        assert code == 143, runs.logs[-1].read_text()[-3000:]
        assert runs.done() > proc_done
        with runs.sessions() as s:
            assert queue.status(s, alive_within_seconds=60).workers_alive == []  # each signed off

        # the default: one worker process per core, at most one per batch (of 6, see CONFIG)
        auto = worker_count(0, len(expected), 6)
        assert runs.interrupt(rng, signal.SIGKILL, workers=auto) == -signal.SIGKILL

        final = runs.start()
        assert final.wait(300) == 0, runs.logs[-1].read_text()[-3000:]
        text = runs.logs[-1].read_text()
        assert "already final" in text or "run-folder summary" in text
        check_every_input_once(runs, expected, before)
        for log in runs.logs:
            assert "Test^Synthetic" not in log.read_text() and "Traceback" not in log.read_text(), log
    finally:
        runs.engine.dispose()


@pytest.mark.slow
def test_watch_on_a_run_folder_workdir_leaves_its_files_alone(tmp_path: Path, bundle: Path) -> None:
    """A watch daemon on the same workdir takes dead run-folder claims back but never claims or moves them."""
    inbox = tmp_path / "in"
    make_inbox(inbox, good=6)
    before = digests(inbox)
    settings = load_settings(None, {"workdir": tmp_path / "work", "model": {"bundles": [str(bundle)]}}, environ={})
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    sessions = make_sessionmaker(engine)
    root = inbox.resolve()
    take_in_folder(root, settings, "tiny-binary@0.0.1-test", sessions, threading.Event())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    import socket

    owner = f"{socket.gethostname()}:{int(dead.stdout)}:dead"
    with sessions() as s:
        ids = list(s.scalars(select(Instance.id).where(Instance.state == "queued").order_by(Instance.id)))
        s.execute(update(Instance).where(Instance.id.in_(ids[:2])).values(state="processing", worker_id=owner))
        s.execute(update(Instance).where(Instance.id == ids[2]).values(  # tried too often: given up
            state="processing", worker_id="elsewhere:1:x", attempts=3, lease_expires_at=Instance.received_at))
        s.commit()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    config = tmp_path / "xraybatch.toml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAYBATCH_")}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "xraybatch", "--log-format", "json", "watch", str(incoming), "--workdir",
         str(tmp_path / "work"), "--bundle", str(bundle), "--config", str(config), "--workers", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        def rescued() -> bool:
            with sessions() as s:
                return not list(s.scalars(select(Instance.id).where(Instance.state == "processing")))

        wait_for(lambda: rescued() or watcher.poll() is not None, 120, "the watch rescuer")
        time.sleep(2)  # a few more rounds of claims: none may take a run-folder row
        watcher.send_signal(signal.SIGTERM)
        out = watcher.communicate(timeout=60)[0].decode(errors="replace")
        assert watcher.returncode == 0, out[-3000:]
    finally:
        if watcher.poll() is None:
            watcher.kill()
    with sessions() as s:
        states = Counter(s.scalars(select(Instance.state)))
    assert states == {"queued": 9, "failed": 1, "rejected": 1}  # nothing processed by watch; notes.txt judged
    assert digests(inbox) == before
    assert not any((tmp_path / "work").glob("archive/*/*")) and not any((tmp_path / "work").glob("quarantine/*/*"))
    summary = run_folder(inbox, settings)  # the next run-folder finishes the work
    assert (summary.counts, summary.skipped) == ({"done": 8, "rejected": 2}, 1)
    assert digests(inbox) == before
    engine.dispose()
