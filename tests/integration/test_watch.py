"""``xraybatch watch`` as a real subprocess: every dropped file ends in exactly one final state, through faults.

Each test drops files into a folder watched by one or two daemons and asserts :func:`assert_exactly_once`:
one ``instances`` row per dropped file, each in a final state; one SR and one SC per done instance (read back
with pydicom: they reference distinct source SOP Instance UIDs); the drop folder and ``inflight/`` empty;
every input kept in ``archive/`` or ``quarantine/`` (with a JSON sidecar giving the reason). Waits poll the
database or the filesystem against a deadline. The daemons run tiny random-weight bundles on 160x160 images.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import make_tiny_bundle
from tests.integration import throwaway_postgres_database
from tests.synth import chest_pixels, make_dataset
from xraybatch.db import queue, repo
from xraybatch.db.session import make_engine, make_sessionmaker, upgrade
from xraybatch.db.tables import Instance, PredictionRow
from xraybatch.domain import InstanceHeader, Outcome, Prediction, State
from xraybatch.models.findings import NIH_TARGETS

ROOT = Path(__file__).resolve().parents[2]
# Decoding a 160x160 image takes a millisecond: decode worker processes buy nothing here (the SIGKILL test took
# 39.3 s with 2, 38.2 s with 1 on the 2-core test machine).
DECODE_PROCESSES = 1
PHI = ("Test^Synthetic", "SYN-0001", "19700101")  # what tests/synth.py writes into every file
FAST = {  # [watch] settings that make the daemon react in tenths of a second
    "settle_seconds": 0.5,
    "poll_seconds": 0.1,
    "heartbeat_seconds": 0.5,
    "lease_seconds": 3,
    "orphan_seconds": 1,
    "grace_seconds": 10,
    "batch_wait_seconds": 0.3,
    "retry_max_seconds": 1,
    "rescan_seconds": 600,  # no safety-net scan during a test: files must not depend on it
}


# -- building blocks ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny binary bundle: the fastest model in the real format (SR with one finding)."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-binary")


@pytest.fixture(scope="module")
def both_bundles(tmp_path_factory: pytest.TempPathFactory, binary_bundle: Path) -> list[Path]:
    """The binary bundle and a tiny 15-target one: slower batches (a SR with 16 findings)."""
    multi = make_tiny_bundle(
        tmp_path_factory.mktemp("bundles") / "tiny-multilabel", name="tiny-multilabel", task="multilabel",
        targets=NIH_TARGETS, channels=3, size=48, seed=1,
    )
    return [binary_bundle, multi]


def dicom_bytes(seed: int, **attributes: object) -> bytes:
    """A 160x160 synthetic CR chest PA as DICOM Part 10 bytes (a new SOP Instance UID unless given)."""
    buffer = io.BytesIO()
    make_dataset(chest_pixels(160, 160, seed=seed), **attributes).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def sop_uid(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


@dataclass
class Site:
    """One drop folder, work folder and results DB, shared by the daemons a test starts."""

    root: Path
    db_url: str
    bundles: list[Path]
    watch: dict[str, object]
    batch_size: int = 8
    dropped: int = 0  # files dropped so far
    procs: list[Daemon] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.incoming = self.root / "incoming"
        self.workdir = self.root / "work"
        self.staging = self.root / "staging"  # same filesystem: a rename into incoming is atomic
        for folder in (self.incoming, self.staging):
            folder.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "xraybatch.toml"
        lines = ["[pipeline]", f"batch_size = {self.batch_size}", f"decode_processes = {DECODE_PROCESSES}",
                 "[model]", "threads = 1", "[watch]"]
        lines += [f"{key} = {value}" for key, value in self.watch.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.sessions = make_sessionmaker(make_engine(self.db_url))

    # -- daemons

    def start(self, name: str = "w1", db_url: str | None = None, env: dict[str, str] | None = None,
              extra: tuple[str, ...] = ()) -> Daemon:
        argv = [sys.executable, "-m", "xraybatch", "-v", "--log-format", "json", "watch", str(self.incoming),
                "--workdir", str(self.workdir), "--db", db_url or self.db_url, "--config", str(self.config),
                "--workers", "1", *extra]  # one process per daemon here (extra may ask for a supervisor)
        for bundle in self.bundles:
            argv += ["--bundle", str(bundle)]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("XRAYBATCH_")} | (env or {})
        log = self.root / f"{name}-{len(self.procs)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=err, stderr=subprocess.STDOUT)
        daemon = Daemon(proc, log)
        self.procs.append(daemon)
        return daemon

    def close(self) -> None:
        """Kill the daemons still running, and let go of the database."""
        for daemon in self.procs:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(10)
        self.sessions.kw["bind"].dispose()

    # -- files

    def drop(self, name: str, data: bytes) -> Path:
        """Write a file beside the drop folder, then rename it in (what a DICOM receiver does)."""
        staged = self.staging / name
        staged.write_bytes(data)
        path = self.incoming / name
        os.rename(staged, path)
        self.dropped += 1
        return path

    def drop_many(self, count: int, prefix: str, seed: int = 0) -> dict[str, str]:
        """Stage ``count`` good files first, then rename them all in at once; returns SOP UID -> name."""
        staged = {}
        for i in range(count):
            data = dicom_bytes(seed + i)
            (self.staging / f"{prefix}{i:03d}.dcm").write_bytes(data)
            staged[sop_uid(data)] = f"{prefix}{i:03d}.dcm"
        for name in staged.values():
            os.rename(self.staging / name, self.incoming / name)
        self.dropped += count
        return staged

    # -- reading the results

    def rows(self) -> list[Instance]:
        with self.sessions() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def states(self) -> Counter[str]:
        return Counter(row.state for row in self.rows())

    def wait_finished(self, timeout: float) -> None:
        """Wait until every dropped file has a final row and has left incoming/ and inflight/, on disk and in the DB."""
        inflight = self.workdir / "inflight"

        def finished() -> bool:
            rows = self.rows()
            return (
                len(rows) == self.dropped
                and all(r.state not in ("queued", "processing") for r in rows)
                and not any(r.file_path and Path(r.file_path).is_relative_to(inflight) for r in rows)
                and not any(self.incoming.iterdir())
                and not any(inflight.iterdir())
            )

        wait_for(finished, timeout, lambda: f"{self.dropped} dropped; {self.states()}; "
                 f"incoming {sorted(p.name for p in self.incoming.iterdir())}; "
                 f"inflight {sorted(p.name for p in (self.workdir / 'inflight').iterdir())}")


@dataclass
class Daemon:
    """A ``xraybatch watch`` subprocess and its JSON log (stdout and stderr)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def records(self) -> list[dict[str, object]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: "watching " in self.text() or self.proc.poll() is not None, timeout, self.text)
        assert self.proc.poll() is None, self.text()

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_for(condition: Callable[[], bool], timeout: float, explain: Callable[[], str] = lambda: "") -> None:
    """Poll ``condition`` every 50 ms until it holds; fail with ``explain()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {explain()}")
        time.sleep(0.05)


def assert_exactly_once(site: Site) -> list[Instance]:
    """Every dropped file ended in exactly one final state, with its outputs once and its file kept.

    - one ``instances`` row per dropped file, none queued or processing, at most one live row per SOP UID;
    - ``incoming/`` and ``inflight/`` are empty;
    - done and duplicate inputs lie in ``archive/``, the others in ``quarantine/`` with a ``.json`` sidecar
      holding their state and reason; no other file is there (nothing lost, nothing kept twice);
    - the outbox holds exactly one SR and one SC per done instance, referencing it, and nothing else.
    """
    rows = site.rows()
    assert len(rows) == site.dropped, Counter(r.state for r in rows)
    assert not [r for r in rows if r.state in ("queued", "processing")]
    live = Counter(r.sop_instance_uid for r in rows if r.state in ("done", "not_applicable"))
    assert all(n == 1 for n in live.values()), live
    assert sorted(site.incoming.iterdir()) == []
    assert sorted((site.workdir / "inflight").iterdir()) == []

    archive, quarantine = site.workdir / "archive", site.workdir / "quarantine"
    kept = {p for p in archive.rglob("*") if p.is_file()} | {
        p for p in quarantine.rglob("*") if p.is_file() and p.suffix != ".json"
    }
    for row in rows:
        assert row.file_path, f"row {row.id} ({row.state}) has no file"
        path = Path(row.file_path)
        assert path in kept, f"row {row.id} ({row.state}): {path} is not in archive/ or quarantine/"
        kept.discard(path)
        if row.state in ("done", "duplicate"):
            assert path.is_relative_to(archive)
        else:
            assert path.is_relative_to(quarantine)
            sidecar = json.loads(path.with_name(path.name + ".json").read_text())
            assert sidecar["state"] == row.state and sidecar["reason"] == row.reason and row.reason
    assert kept == set(), f"files kept that no row accounts for: {kept}"
    sidecars = {p.with_suffix("") for p in quarantine.rglob("*.json")}
    assert sidecars == {Path(r.file_path) for r in rows if r.state not in ("done", "duplicate")}

    done = {r.sop_instance_uid for r in rows if r.state == "done"}
    outputs = [p for p in (site.workdir / "outbox").rglob("*") if p.is_file() and not p.name.startswith(".")]
    # parametric maps (one per explained finding) are beside the SR and SC; count those two
    outputs = [p for p in outputs if dcmread(p, stop_before_pixels=True).SOPClassUID != "1.2.840.10008.5.1.4.1.1.30"]
    references: Counter[tuple[str, str]] = Counter()
    for path in outputs:
        ds = dcmread(path, stop_before_pixels=True)
        if ds.Modality == "SR":
            source = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        else:
            source = ds.SourceImageSequence[0]
        references[(str(ds.Modality), str(source.ReferencedSOPInstanceUID))] += 1
    assert len(outputs) == 2 * len(done)
    assert set(references.values()) <= {1}
    assert {uid for _, uid in references} == done
    assert Counter(kind for kind, _ in references) == {"SR": len(done), "OT": len(done)}
    return rows


def assert_no_phi(daemon: Daemon) -> None:
    text = daemon.text()
    for value in PHI:
        assert value not in text


@pytest.fixture
def sqlite_site(tmp_path: Path, binary_bundle: Path) -> Iterator[Site]:
    site = Site(tmp_path, f"sqlite:///{tmp_path / 'work' / 'xraybatch.sqlite'}", [binary_bundle], FAST)
    yield site
    site.close()


# -- the queue, in process ---------------------------------------------------------------------------------------

MODEL_SET = "tiny@1"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def queue_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """An upgraded, empty results database (a throwaway PostgreSQL database per test)."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}")
        upgrade(engine)
        yield make_sessionmaker(engine)
        engine.dispose()
        return
    with throwaway_postgres_database() as url:
        engine = make_engine(url)
        upgrade(engine)
        yield make_sessionmaker(engine)
        engine.dispose()


def _header(uid: str) -> InstanceHeader:
    return InstanceHeader(
        path=Path(f"/in/{uid}"), sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid=uid + ".1", series_instance_uid=uid + ".2", accession_number="", patient_id="",
        modality="CR", body_part="CHEST", view_position="PA", photometric_interpretation="MONOCHROME2",
        rows=160, columns=160, transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def _enqueue(sessions: sessionmaker[Session], count: int, inflight: str = "/w/inflight") -> list[int]:
    ids = []
    with sessions() as s:
        for i in range(count):
            row_id = queue.enqueue(s, _header(f"1.2.{i}"), f"/in/{i}", f"{inflight}/{i}", MODEL_SET)
            assert row_id is not None
            ids.append(row_id)
    return ids


def test_claims_never_overlap_and_take_the_oldest_first(queue_db: sessionmaker[Session]) -> None:
    ids = _enqueue(queue_db, 40)
    taken: list[list[int]] = []
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            while True:
                with queue_db() as s:
                    batch = queue.claim_batch(s, f"host:1:{name}", 3, 60)
                if not batch:
                    return
                taken.append([c.instance_id for c in batch])
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(str(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    claimed = [i for batch in taken for i in batch]
    assert sorted(claimed) == ids  # each row once
    assert max(len(batch) for batch in taken) <= 3  # never more than asked for
    assert all(batch == sorted(batch) for batch in taken)
    with queue_db() as s:
        assert queue.depth(s) == 0


def test_the_last_batches_are_shared_among_the_workers_that_hold_rows(queue_db: sessionmaker[Session]) -> None:
    _enqueue(queue_db, 26)
    held: dict[str, list[int]] = {"host:1:a": [], "host:1:b": []}
    sizes = []
    with queue_db() as s:
        for worker in ("host:1:a", "host:1:b") * 3:  # each ends its batch, then claims; the other's batch runs
            for row_id in held[worker]:
                assert repo.finish(s, row_id, Outcome(Path("/in"), State.REJECTED, "test"), worker_id=worker)
            held[worker] = [c.instance_id for c in queue.claim_batch(s, worker, 8, 60)]
            sizes.append(len(held[worker]))
    # a full batch while the queue holds one for everyone, then half of what is left each, rounded up
    # (26 queued: a 8, b 8; 10 left: a 5; 5 left: b 3; 2 left: a 1; 1 left: b 1)
    assert sizes == [8, 8, 5, 3, 1, 1]


def test_a_worker_alone_takes_a_full_batch_or_what_is_queued(queue_db: sessionmaker[Session]) -> None:
    _enqueue(queue_db, 11)
    with queue_db() as s:
        assert [len(queue.claim_batch(s, "host:1:a", 8, 60)) for _ in range(3)] == [8, 3, 0]


@pytest.mark.parametrize("first_ends", ["rejected", "failed", "done"])
def test_a_later_copy_waits_for_the_first_and_runs_only_if_that_one_did_not_end_done(
    queue_db: sessionmaker[Session], first_ends: str
) -> None:
    with queue_db() as s:
        first = queue.enqueue(s, _header("1.9.1"), "/in/a", "/w/inflight/a", MODEL_SET)
        second = queue.enqueue(s, _header("1.9.1"), "/in/b", "/w/inflight/b", MODEL_SET)
        other = queue.enqueue(s, _header("1.9.2"), "/in/c", "/w/inflight/c", MODEL_SET)
        assert [c.instance_id for c in queue.claim_batch(s, "host:1:a", 8, 60)] == [first, other]
        assert queue.claim_batch(s, "host:2:b", 8, 60) == []  # the second copy waits: the first is processing
        outcome = Outcome(Path("/in/a"), State(first_ends), "why", _header("1.9.1"))
        assert repo.finish_claimed(s, first, outcome, "host:1:a") == outcome
        [claimed] = queue.claim_batch(s, "host:2:b", 8, 60)  # its turn now, whatever the first became
        assert claimed.instance_id == second
        stored = repo.finish_claimed(s, second, Outcome(Path("/in/b"), State.DONE, "", _header("1.9.1")), "host:2:b")
    assert stored is not None
    if first_ends == "done":  # the unique index: only one copy ends done; the later one is a duplicate
        reason = f"SOP Instance UID already received (instance {first}, state done)"
        assert (stored.state, stored.reason) == (State.DUPLICATE, reason)
    else:
        assert stored.state == State.DONE
    with queue_db() as s:
        assert s.get(Instance, second).state == stored.state.value  # type: ignore[union-attr]


def test_claims_of_copies_racing_from_several_workers_take_one_copy_at_a_time(
    queue_db: sessionmaker[Session],
) -> None:
    with queue_db() as s:
        for i in range(6):
            for copy in range(3):
                queue.enqueue(s, _header(f"1.8.{i}"), f"/in/{i}-{copy}", f"/w/inflight/{i}-{copy}", MODEL_SET)
    taken: list[list[int]] = []
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        with queue_db() as s:
            barrier.wait()
            taken.append([c.instance_id for c in queue.claim_batch(s, f"host:1:{name}", 4, 60)])

    threads = [threading.Thread(target=worker, args=(str(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with queue_db() as s:
        busy = Counter(r.sop_instance_uid for r in s.scalars(select(Instance).where(Instance.state == "processing")))
    assert sum(map(len, taken)) == 6 and set(busy.values()) == {1}  # every instance once, never two copies


def test_the_heartbeat_renews_leases_and_a_silent_worker_loses_them(queue_db: sessionmaker[Session]) -> None:
    _enqueue(queue_db, 6)  # two batches of 2, and 2 more: enough that the second claim takes a full batch
    with queue_db() as s:
        alive = queue.claim_batch(s, "host:1:alive", 2, 0.2)
        silent = queue.claim_batch(s, "host:2:silent", 2, 0.2)
    with queue_db() as s:
        queue.heartbeat(s, "host:1:alive", "/in", MODEL_SET, lease_seconds=60)
    time.sleep(0.4)
    with queue_db() as s:
        requeued, given_up = queue.reclaim_expired(s, max_attempts=3)
    assert (requeued, given_up) == (2, [])
    with queue_db() as s:
        state = {r.id: (r.state, r.worker_id) for r in s.scalars(select(Instance))}
    assert {state[c.instance_id] for c in alive} == {("processing", "host:1:alive")}
    assert {state[c.instance_id] for c in silent} == {("queued", None)}


def test_an_instance_claimed_too_often_is_given_up(queue_db: sessionmaker[Session]) -> None:
    [row_id] = _enqueue(queue_db, 1)
    for attempt in (1, 2):
        with queue_db() as s:
            [claimed] = queue.claim_batch(s, f"host:{attempt}:x", 1, 0.01)
        assert claimed.attempts == attempt
        time.sleep(0.05)
        with queue_db() as s:
            requeued, given_up = queue.reclaim_expired(s, max_attempts=2)
    assert requeued == 0
    assert [(g.instance_id, g.attempts, g.file_path) for g in given_up] == [(row_id, 2, "/w/inflight/0")]


def test_a_worker_that_lost_its_lease_stores_nothing(queue_db: sessionmaker[Session]) -> None:
    [row_id] = _enqueue(queue_db, 1)
    paused, taker = "host:1:paused", "host:2:taker"
    done = Outcome(Path("/in/0"), State.DONE, header=_header("1.2.0"),
                   predictions=(Prediction("tiny", "1", ("Pneumonia",), (0.9,), (0.5,)),))
    with queue_db() as s:
        queue.claim_batch(s, paused, 1, 0.01)
    time.sleep(0.05)  # the paused worker's lease runs out; another worker takes the row back
    with queue_db() as s:
        assert queue.reclaim_expired(s, max_attempts=3) == (1, [])
        assert repo.finish(s, row_id, done, worker_id=paused) is False  # queued again: not the paused one's
        [claimed] = queue.claim_batch(s, taker, 1, 60)
        assert claimed.instance_id == row_id
        assert repo.finish(s, row_id, done, worker_id=paused) is False  # processing, but under the taker
    with queue_db() as s:
        row = s.get(Instance, row_id)
        assert row is not None and (row.state, row.worker_id) == ("processing", taker)
        assert s.scalar(select(func.count()).select_from(PredictionRow)) == 0
        assert repo.finish(s, row_id, done, worker_id=taker) is True
    with queue_db() as s:
        row = s.get(Instance, row_id)
        assert row is not None and (row.state, row.worker_id) == ("done", taker)
        assert s.scalar(select(func.count()).select_from(PredictionRow)) == 1


def test_a_processor_whose_claim_was_taken_leaves_the_row_to_its_new_owner(
    tmp_path: Path, binary_bundle: Path
) -> None:
    from xraybatch.pipeline import Processor
    from xraybatch.settings import load_settings

    settings = load_settings(None, {"workdir": tmp_path / "work", "model": {"bundles": [str(binary_bundle)]},
                                    "pipeline": {"decode_processes": 1}}, environ={})
    processor = Processor.open(settings, "host:1:paused")
    try:
        source = tmp_path / "chest.dcm"
        source.write_bytes(dicom_bytes(7))
        with processor.sessions() as s:
            row_id = queue.enqueue(s, _header(sop_uid(source.read_bytes())), str(source), str(source),
                                   processor.model_set)
            [claimed] = queue.claim_batch(s, "host:2:taker", 1, 60)  # not this processor's claim
        [outcome] = processor.process_claimed([claimed])
        assert (outcome.state, outcome.recorded) == (State.DONE, False)
        with processor.sessions() as s:
            row = s.get(Instance, row_id)
            assert row is not None and (row.state, row.worker_id) == ("processing", "host:2:taker")
            assert s.scalar(select(func.count()).select_from(PredictionRow)) == 0
    finally:
        processor.close()


def test_release_dead_local_takes_back_rows_of_stopped_processes_on_this_host(
    queue_db: sessionmaker[Session],
) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    me = f"host:{os.getpid()}:me"
    owners = {
        "dead": f"host:{dead_pid}:old",  # its process has exited
        "reused": f"host:{os.getpid()}:old",  # an earlier process with this process's pid (container restart)
        "alive": f"host:{os.getppid()}:par",  # a live process on this host
        "other-host": f"elsewhere:{dead_pid}:old",  # left to the lease
        "me": me,
    }
    ids = _enqueue(queue_db, len(owners))
    with queue_db() as s:
        for row_id, owner in zip(ids, owners.values()):
            s.execute(update(Instance).where(Instance.id == row_id).values(state="processing", worker_id=owner))
        s.commit()
        assert queue.release_dead_local(s, me) == 2
    with queue_db() as s:
        state = {r.id: r.state for r in s.scalars(select(Instance))}
    assert [state[i] for i in ids] == ["queued", "queued", "processing", "processing", "processing"]


def test_finished_under_lists_only_file_moves_no_live_worker_is_making(queue_db: sessionmaker[Session]) -> None:
    me = f"host:{os.getpid()}:me"
    ids = _enqueue(queue_db, 4)
    with queue_db() as s:
        for row_id, owner in zip(ids, [me, "elsewhere:1:busy", "elsewhere:1:busy", me]):
            s.execute(update(Instance).where(Instance.id == row_id).values(
                state="done", worker_id=owner, finished_at=datetime.now(UTC)))
        s.execute(update(Instance).where(Instance.id == ids[3]).values(file_path="/w/archive/d/3"))
        s.commit()
        now = datetime.now(UTC)
        assert [r[0] for r in queue.finished_under(s, "/w/inflight", me, now - timedelta(hours=1))] == [ids[0]]
        assert [r[0] for r in queue.finished_under(s, "/w/inflight", me, now + timedelta(hours=1))] == ids[:3]
        assert queue.known_files(s, "/w/inflight") == {f"/w/inflight/{i}" for i in range(3)}


# -- one daemon for the tests of single files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, binary_bundle: Path) -> Iterator[tuple[Site, Daemon]]:
    """A daemon that several tests drop files into; each test ends with the invariant over all of them."""
    root = tmp_path_factory.mktemp("running")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    site = Site(root, f"sqlite:///{root / 'work' / 'xraybatch.sqlite'}", [binary_bundle], {**FAST, "metrics_port": port})
    daemon = site.start()
    daemon.wait_ready()
    yield site, daemon
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(FAST["grace_seconds"]) == 0  # type: ignore[arg-type]
    assert_no_phi(daemon)
    site.close()


def _by_name(site: Site, name: str) -> list[Instance]:
    return [r for r in site.rows() if Path(r.path).name == name]


@pytest.mark.slow
def test_a_single_file_is_processed_once(running: tuple[Site, Daemon]) -> None:
    site, daemon = running
    data = dicom_bytes(1000)
    site.drop("single.dcm", data)
    site.wait_finished(30)  # a deadline, not a target: bench/watch.py measures the latency
    [row] = _by_name(site, "single.dcm")
    assert (row.state, row.sop_instance_uid, row.attempts) == ("done", sop_uid(data), 1)
    assert_exactly_once(site)
    assert_no_phi(daemon)


@pytest.mark.slow
@pytest.mark.parametrize("temp_name", [None, "slow.dcm.part"], ids=["in-place", "part-then-rename"])
def test_a_file_written_slowly_is_processed_once_when_complete(
    running: tuple[Site, Daemon], temp_name: str | None
) -> None:
    """Chunks arrive every 0.3 s for ~3 s, within the 0.5 s settle time: taken only once complete."""
    site, _ = running
    data = dicom_bytes(2000 if temp_name else 2001)
    name = f"slow-{temp_name or 'direct'}.dcm"
    target = site.incoming / (temp_name or name)
    chunks = [data[i : i + len(data) // 10 + 1] for i in range(0, len(data), len(data) // 10 + 1)]
    with open(target, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            fh.flush()
            time.sleep(0.3)
            assert not _by_name(site, target.name), "taken before the writer finished"
    if temp_name:
        time.sleep(1.0)  # a temporary name is never taken, however long it rests
        assert target.exists()
        os.rename(target, site.incoming / name)
    site.dropped += 1
    site.wait_finished(30)
    [row] = _by_name(site, name)
    assert (row.state, row.sop_instance_uid) == ("done", sop_uid(data)), row.reason
    assert_exactly_once(site)


@pytest.mark.slow
def test_a_redelivered_file_is_a_duplicate_without_new_outputs(running: tuple[Site, Daemon]) -> None:
    site, _ = running
    data = dicom_bytes(3000)
    site.drop("first.dcm", data)
    site.wait_finished(30)
    outputs = sorted((site.workdir / "outbox").rglob("*.dcm"))
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    site.drop("first.dcm", data)  # the same name again
    site.drop("again.dcm", data)  # and under another name
    site.wait_finished(30)
    rows = [r for r in site.rows() if r.sop_instance_uid == sop_uid(data)]
    assert [r.state for r in rows] == ["done", "duplicate", "duplicate"]
    assert all("already received" in r.reason for r in rows[1:])
    assert sorted((site.workdir / "outbox").rglob("*.dcm")) == outputs
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes  # not written again either
    assert_exactly_once(site)


def _unknown_vr(data: bytes) -> bytes:
    """``data`` with the VR of (0008,0060) Modality replaced by bytes pydicom does not know."""
    tag = b"\x08\x00\x60\x00CS"
    assert tag in data
    return data.replace(tag, b"\x08\x00\x60\x00C#", 1)


@pytest.mark.slow
@pytest.mark.parametrize("damaged_first", [True, False], ids=["damaged-first", "good-first"])
def test_a_damaged_copy_is_rejected_and_the_good_one_done_in_either_order(
    running: tuple[Site, Daemon], damaged_first: bool
) -> None:
    site, daemon = running
    good = dicom_bytes(3000 + damaged_first)
    cut = good[: len(good) - 20_000]  # the header reads, the pixel data is short
    names = {"damaged": "a-damaged.dcm", "good": "b-good.dcm"} if damaged_first else \
        {"good": "a-good.dcm", "damaged": "b-damaged.dcm"}
    for kind, data in (("damaged", cut), ("good", good)):
        (site.staging / names[kind]).write_bytes(data)
    for name in sorted(names.values()):  # one settle round: queued in name order
        os.rename(site.staging / name, site.incoming / name)
    site.dropped += 2
    site.wait_finished(60)
    [damaged] = _by_name(site, names["damaged"])
    [processed] = _by_name(site, names["good"])
    assert (damaged.state, processed.state) == ("rejected", "done"), (damaged.reason, processed.reason)
    assert damaged.sop_instance_uid == processed.sop_instance_uid == sop_uid(good)
    assert "pixel data" in damaged.reason.lower()
    assert_exactly_once(site)
    assert_no_phi(daemon)


@pytest.mark.slow
def test_hostile_files_are_quarantined_with_their_reason_and_the_daemon_goes_on(
    running: tuple[Site, Daemon],
) -> None:
    site, daemon = running
    good = dicom_bytes(4000)
    garbage = random.Random(7).randbytes(300)
    hostile = {
        "zero.dcm": (b"", "rejected", "empty file"),
        "text.dcm": (b"this is not an image\n" * 20, "rejected", "not a DICOM file"),
        "dicm-garbage.dcm": (b"\0" * 128 + b"DICM" + garbage, "rejected", ""),
        "header-cut.dcm": (good[:300], "rejected", ""),
        "pixels-cut.dcm": (dicom_bytes(4001)[:-20000], "rejected", "the file ends inside Pixel Data"),
        "unknown-vr.dcm": (_unknown_vr(dicom_bytes(4002)), "rejected", "cannot be read (NotImplementedError)"),
    }
    for name, (data, _, _) in hostile.items():
        site.drop(name, data)
    site.drop("good-after.dcm", good)
    site.wait_finished(30)
    assert daemon.alive()
    for name, (_, state, reason) in hostile.items():
        [row] = _by_name(site, name)
        assert row.state == state, (name, row.reason)
        assert reason in row.reason
    [row] = _by_name(site, "good-after.dcm")
    assert row.state == "done"
    assert_exactly_once(site)
    assert_no_phi(daemon)


def test_retry_gives_a_not_applicable_file_a_second_verdict(running: tuple[Site, Daemon]) -> None:
    site, _ = running
    data = dicom_bytes(5000, view="LL")
    site.drop("lateral.dcm", data)
    site.wait_finished(30)
    [first] = [r for r in site.rows() if r.sop_instance_uid == sop_uid(data)]
    assert first.state == "not_applicable" and "ViewPosition 'LL'" in first.reason
    out = subprocess.run(
        [sys.executable, "-m", "xraybatch", "retry", str(site.incoming), "--state", "not_applicable",
         "--workdir", str(site.workdir), "--config", str(site.config)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert out.startswith("1 not_applicable files moved back")
    site.wait_finished(30)
    # judged again, not taken for a duplicate of itself; the earlier row gave way to the new one
    [again] = [r for r in site.rows() if r.sop_instance_uid == sop_uid(data)]
    assert again.state == "not_applicable" and Path(again.path).name.startswith("retry-")
    assert_exactly_once(site)


@pytest.mark.slow
def test_status_shows_the_queue_and_the_worker_alive(running: tuple[Site, Daemon]) -> None:
    site, daemon = running
    site.wait_finished(30)
    out = subprocess.run(
        [sys.executable, "-m", "xraybatch", "status", "--workdir", str(site.workdir), "--config", str(site.config)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert "queue depth: 0 queued, 0 processing" in out
    assert "workers alive: 1" in out
    assert f":{daemon.proc.pid}:" in out
    assert f"done {site.states()['done']}," in out


def test_metrics_count_what_the_daemon_does(running: tuple[Site, Daemon]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    site, daemon = running
    url = f"http://127.0.0.1:{site.watch['metrics_port']}/metrics"

    def scrape() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(url, timeout=10) as response:
            page = response.read().decode()
        assert not any(secret in page for secret in PHI)
        return {(s.name, s.labels.get("state", s.labels.get("stage", ""))): s.value
                for family in text_string_to_metric_families(page) for s in family.samples}

    site.wait_finished(30)
    before = scrape()
    site.drop("metrics.dcm", dicom_bytes(3000))
    site.drop("metrics.txt", b"not an image")
    site.wait_finished(30)
    after = scrape()
    for state in ("done", "rejected"):
        assert after[("xraybatch_instances_total", state)] == before.get(("xraybatch_instances_total", state), 0) + 1
    written = ("xraybatch_stage_seconds_count", "writeback")
    assert after[written] == before.get(written, 0) + 1
    assert after[("xraybatch_queue_depth", "")] == 0
    assert f"metrics on http://127.0.0.1:{site.watch['metrics_port']}/metrics" in daemon.text()


# -- crashes, outages, several workers, signals ------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_burst_then_restart_processes_every_file_once(sqlite_site: Site) -> None:
    site = sqlite_site
    first = site.start()
    first.wait_ready()
    uids = site.drop_many(120, "burst")

    def mid_batch() -> bool:
        rows = site.rows()
        return sum(r.state == "done" for r in rows) >= 16 and any(r.state == "processing" for r in rows)

    wait_for(mid_batch, 60, site.states)
    first.proc.kill()
    assert first.proc.wait(10) == -signal.SIGKILL
    killed = site.rows()
    assert sum(r.state == "done" for r in killed) < 120, "the burst ended before the kill"
    orphaned = {r.id for r in killed if r.state == "processing"}

    # Crash windows a kill rarely hits, set up by hand: a file taken in but never queued (an orphan), an
    # instance finished but its file not yet moved, and one moved but not yet recorded as moved.
    inflight = site.workdir / "inflight"
    orphan = dicom_bytes(9999)
    (inflight / "0rphan").write_bytes(orphan)
    site.dropped += 1
    unmoved, unrecorded = [r for r in killed if r.state == "done"][:2]
    os.rename(str(unmoved.file_path), inflight / Path(str(unmoved.file_path)).name)
    with site.sessions() as s:
        for row in (unmoved, unrecorded):
            stale = str(inflight / Path(str(row.file_path)).name)
            s.execute(update(Instance).where(Instance.id == row.id).values(file_path=stale))
        s.commit()

    second = site.start("w2")
    second.wait_ready()
    site.wait_finished(120)
    rows = assert_exactly_once(site)
    assert {r.sop_instance_uid for r in rows} == set(uids) | {sop_uid(orphan)}
    assert all(r.state == "done" for r in rows)
    assert [Path(r.path).name for r in rows if r.sop_instance_uid == sop_uid(orphan)] == ["recovered-0rphan"]
    if orphaned:  # the kill left claimed rows: the restart took them back at once, not after the lease
        assert {r.id for r in rows if r.attempts == 2} == orphaned
        assert "returned to the queue" in second.text()
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(15) == 0


@pytest.mark.slow
def test_sigterm_exits_0_within_the_grace_time_after_finishing_the_batch(
    tmp_path: Path, both_bundles: list[Path]
) -> None:
    """With a 16-finding SR a batch of 4 takes a second or more: SIGTERM mid-batch lets it finish, starts no
    other, and exits 0; a batch longer than the grace time is abandoned (exit 0 too) and taken up again."""
    site = Site(tmp_path, f"sqlite:///{tmp_path / 'work' / 'xraybatch.sqlite'}", both_bundles, FAST, batch_size=4)
    grace = float(FAST["grace_seconds"])  # type: ignore[arg-type]

    def claimed_now() -> set[int]:
        claimed: set[int] = set()

        def processing() -> bool:
            claimed.update(r.id for r in site.rows() if r.state == "processing")
            return bool(claimed)

        wait_for(processing, 60, site.states)
        return claimed

    try:
        daemon = site.start()
        daemon.wait_ready()
        site.drop_many(12, "term")
        claimed = claimed_now()
        sent = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(grace) == 0
        assert time.monotonic() - sent < grace
        rows = {r.id: r for r in site.rows()}
        assert all(rows[i].state == "done" for i in claimed), [rows[i].state for i in claimed]
        assert not [r for r in rows.values() if r.state == "processing"]
        assert "grace time" not in daemon.text()
        assert site.states()["done"] < 12, "the whole burst was processed after SIGTERM"

        hasty = site.start("hasty", env={"XRAYBATCH_WATCH_GRACE_SECONDS": "0.2"})
        hasty.wait_ready()
        claimed = claimed_now()
        sent = time.monotonic()
        hasty.proc.send_signal(signal.SIGTERM)
        assert hasty.proc.wait(grace) == 0
        assert time.monotonic() - sent < grace / 2
        assert "grace time of" in hasty.text()
        assert not [r for r in site.rows() if r.state == "processing"]  # what was left went back to the queue
        abandoned = {r.id for r in site.rows() if r.state == "queued" and r.attempts == 1}
        assert abandoned and abandoned <= claimed

        again = site.start("again")  # takes the abandoned rows back at once, and processes what is queued
        again.wait_ready()
        site.wait_finished(60)
        rows = {r.id: r for r in assert_exactly_once(site)}
        assert all(rows[i].attempts == 2 for i in abandoned)
        sent = time.monotonic()
        again.proc.send_signal(signal.SIGTERM)  # idle: exits without waiting for the grace time
        assert again.proc.wait(grace) == 0
        assert time.monotonic() - sent < grace / 2
    finally:
        site.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a server; :meth:`stop` refuses new connections and cuts the open ones."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if self._thread is not None:
            self._thread.join()
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.slow
@pytest.mark.postgres
def test_the_database_unavailable_for_a_while(tmp_path: Path, binary_bundle: Path) -> None:
    """PostgreSQL behind a proxy the test cuts, idle and mid-batch: files wait, each fault is logged once."""
    with throwaway_postgres_database() as url:
        real = make_url(url)
        proxy = TcpProxy((real.host or "127.0.0.1", real.port or 5432))
        proxy.start()
        proxied = real.set(port=proxy.port, query={"connect_timeout": "2"}).render_as_string(hide_password=False)
        site = Site(tmp_path, url, [binary_bundle], FAST)  # the test reads the DB directly, not through the proxy

        def errors() -> list[dict[str, object]]:
            return [r for r in daemon.records() if r["level"] in ("ERROR", "CRITICAL")]

        try:
            daemon = site.start(db_url=proxied)
            daemon.wait_ready()
            site.drop_many(3, "before")
            site.wait_finished(30)

            # 1. Down while idle: a bad file first (its outcome cannot be recorded), then good ones.
            proxy.stop()
            site.drop("zero-during.dcm", b"")
            time.sleep(1.5)  # settle time and a try at it
            uids = site.drop_many(10, "during", seed=100)
            wait_for(lambda: len(errors()) > 0, 20, daemon.text)
            time.sleep(3)  # several retries while down
            assert daemon.alive()
            assert len(site.rows()) == 3
            waiting = sorted(p.name for p in site.incoming.iterdir())  # untouched while the DB is down
            assert waiting == sorted([*uids.values(), "zero-during.dcm"])
            [error] = errors()
            assert "retrying with backoff" in str(error["message"])
            proxy.start()
            site.wait_finished(30)
            assert Counter(r.state for r in assert_exactly_once(site)) == {"done": 13, "rejected": 1}
            assert "recovered" in daemon.text()

            # 2. Cut while a batch is being processed: its rows go back to the queue or keep their results.
            site.drop_many(16, "cut", seed=200)
            wait_for(lambda: any(r.state == "processing" for r in site.rows()), 30, site.states)
            proxy.stop()
            time.sleep(2)
            assert daemon.alive()
            proxy.start()
            site.wait_finished(60)
            rows = assert_exactly_once(site)
            assert Counter(r.state for r in rows) == {"done": 29, "rejected": 1}
            assert len(errors()) == 2, errors()  # one per episode, not one per file
            assert_no_phi(daemon)
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(15) == 0
        finally:
            site.close()
            proxy.stop()


def _children(pid: int) -> set[int]:
    """The pids of ``pid``'s child processes (Linux /proc)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


@pytest.mark.slow
def test_a_worker_killed_under_the_supervisor_is_replaced_and_nothing_is_processed_twice(
    tmp_path: Path, binary_bundle: Path
) -> None:
    """``watch --workers 2``: a worker SIGKILLed mid-burst (as the kernel's OOM killer would) is replaced after
    the restart delay; its claimed files are taken back and every file ends exactly once; SIGTERM then stops
    the supervisor and its workers with exit 0."""
    site = Site(tmp_path, f"sqlite:///{tmp_path / 'results.sqlite'}", [binary_bundle], dict(FAST))
    try:
        supervisor = site.start("sup", extra=("--workers", "2"))
        wait_for(lambda: (len(_children(supervisor.proc.pid)) == 2 and supervisor.text().count("watching ") >= 2)
                 or not supervisor.alive(), 90, supervisor.text)
        assert supervisor.alive(), supervisor.text()
        first = _children(supervisor.proc.pid)
        uids = site.drop_many(24, "burst")
        wait_for(lambda: any(r.state == "processing" for r in site.rows()), 60, supervisor.text)
        holders = {int(str(r.worker_id).split(":")[1]) for r in site.rows() if r.state == "processing"}
        victim = min(holders & first)  # a worker that holds claimed files
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(_children(supervisor.proc.pid)) == 2 and victim not in _children(supervisor.proc.pid),
                 60, supervisor.text)
        replacement = _children(supervisor.proc.pid) - first
        assert len(replacement) == 1
        site.wait_finished(120)
        rows = assert_exactly_once(site)
        assert {r.sop_instance_uid for r in rows} == set(uids)
        assert all(r.state == "done" for r in rows)
        warned = [r for r in supervisor.records() if r.get("stage") == "supervisor"]
        assert any(f"(pid {victim}) exited with code -9" in str(r.get("message")) for r in warned), warned
        supervisor.proc.send_signal(signal.SIGTERM)
        assert supervisor.proc.wait(30) == 0, supervisor.text()
    finally:
        site.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_on_one_database_and_folder_never_process_an_instance_twice(
    tmp_path: Path, binary_bundle: Path
) -> None:
    """Leases of 0.5 s, shorter than a batch of 8: only the heartbeat during the batch keeps them."""
    with throwaway_postgres_database() as url:
        site = Site(tmp_path, url, [binary_bundle], {**FAST, "lease_seconds": 0.5, "heartbeat_seconds": 0.1})
        try:
            workers = [site.start("a"), site.start("b")]
            for w in workers:
                w.wait_ready()
            uids = site.drop_many(64, "pair")
            site.wait_finished(120)
            rows = assert_exactly_once(site)
            assert {r.sop_instance_uid for r in rows} == set(uids)
            assert all(r.state == "done" and r.attempts == 1 for r in rows)  # no lease ran out
            batches = Counter((r.worker_id, r.started_at) for r in rows)  # rows claimed together
            assert max(batches.values()) <= 8
            assert max(r.finished_at - r.started_at for r in rows) > timedelta(seconds=0.5)  # outlived a lease
            by_worker = Counter(str(r.worker_id).split(":")[1] for r in rows)
            assert set(by_worker) == {str(w.proc.pid) for w in workers}, by_worker
            processed = Counter(  # the pipeline's "done" record, across both workers' logs
                str(rec["sop_instance_uid"]) for w in workers for rec in w.records()
                if rec.get("stage") == "pipeline" and rec.get("state") == "done"
            )
            assert processed == Counter(set(uids)), "an instance was processed twice"
            for w in workers:
                w.proc.send_signal(signal.SIGTERM)
            assert [w.proc.wait(15) for w in workers] == [0, 0]
        finally:
            site.close()
