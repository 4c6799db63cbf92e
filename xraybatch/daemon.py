"""``xraybatch watch``: process every instance dropped into a folder exactly once, through crashes and faults.

The life of a file::

    INCOMING/x --rename--> WORKDIR/inflight/<uuid> --queued row--> claimed in a batch --> pipeline
        --> done/duplicate: WORKDIR/archive/<day>/<uuid> (or deleted)
        --> not_applicable/rejected/failed: WORKDIR/quarantine/<day>/<uuid> + <uuid>.json (the reason)

- The rename takes the file out of the drop folder atomically: of several workers that see it, one wins.
  ``inflight/`` must be on the same filesystem as the drop folder.
- The queue lives in the results DB (:mod:`xraybatch.db.queue`): workers on several hosts share it.
- A file moves on only after its results are committed. Outputs have UIDs derived from the source, so
  processing an instance again after a crash rewrites the same SR and SC.
- A worker renews the leases of its claimed rows with its heartbeat, also during a long batch. A worker
  killed mid-batch leaves ``processing`` rows: a restarted worker on the same host takes back those of dead
  processes at once; other hosts take them back when the lease expires. A worker that was only paused past
  its lease finds its rows taken when it resumes: it stores nothing for them and leaves their files alone.
- At start-up and every ``orphan_seconds`` a worker also finishes file moves that a crash or a fault
  interrupted (final rows whose file is still in ``inflight/``) and returns orphans (files in ``inflight/``
  that no row names, older than ``orphan_seconds``) to the drop folder as ``recovered-<uuid>``.
- Transient faults (DB unreachable, disk full, outbox unwritable) are logged once per episode and retried
  with backoff; the daemon keeps running. While the DB is unreachable no file is taken in: files wait in the
  drop folder, claimed rows go back to the queue when it returns. A bad file is quarantined with its reason;
  one that pydicom cannot even parse counts as ``failed`` (the pipeline's per-file boundary).
- SIGTERM/SIGINT: no new batch is started; the current one finishes within ``grace_seconds`` or the process
  exits anyway (its rows are taken back later); exit code 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from xraybatch.delivery import DeliveryWorker, start_background
from xraybatch.domain import Outcome, State, file_ref
from xraybatch.errors import PersistError
from xraybatch.files import fsync_dir
from xraybatch.metrics import WorkerMetrics
from xraybatch.pipeline import Processor, read_received
from xraybatch.settings import Settings
from xraybatch.watch import FolderWatcher

logger = logging.getLogger(__name__)

_TO_ARCHIVE = (State.DONE, State.DUPLICATE)


class _RetryLater(Exception):
    """Some files of a batch met a transient fault and went back to the queue: back off, then go on."""


def _atomic_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _warm_up() -> None:
    """Import now what the first batch would import (Grad-CAM, highdicom: seconds), not on the first file."""
    import importlib

    for module in ("xraybatch.explain", "xraybatch.writeback", "pytorch_grad_cam"):
        importlib.import_module(module)


class Daemon:
    """One worker: watches ``incoming``, feeds the shared queue, processes batches from it."""

    def __init__(self, incoming: Path, settings: Settings) -> None:
        from xraybatch.db.queue import new_worker_id

        self.incoming = incoming.resolve()
        self.settings = settings
        self.cfg = settings.watch
        work = settings.workdir.resolve()
        self.inflight, self.archive, self.quarantine = work / "inflight", work / "archive", work / "quarantine"
        self.worker_id = new_worker_id()
        self.stop = threading.Event()
        self._stopping = False  # a signal arrived (set in the handler; ``stop`` is set by another thread)
        self._exited = threading.Event()
        self.processor: Processor | None = None
        self.delivery: DeliveryWorker | None = None  # delivery hook: the background delivery, if any
        self.metrics = WorkerMetrics(self.worker_id)
        self._fault: str | None = None  # the transient fault in progress, logged once
        self._db_fault = False  # the fault is the results DB: probe it before touching files again
        self._backoff = min(1.0, self.cfg.retry_max_seconds)
        self._last_maintenance = float("-inf")
        self._last_sweep = float("-inf")  # the first maintenance (at start-up) sweeps inflight/
        self._log = {"worker_id": self.worker_id, "stage": "watch"}

    # -- running ------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Watch until SIGTERM/SIGINT (or :attr:`stop`); returns the exit code, 0 on a clean stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            return self._run()
        finally:
            self._exited.set()

    def _run(self) -> int:
        for folder in (self.incoming, self.inflight, self.archive, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
        while self.processor is None and not self.stop.is_set():
            with self._transient("opening the models and the results DB"):
                self.processor = Processor.open(self.settings, self.worker_id)
        if self.processor is None:
            return 0
        self.metrics.models_loaded(self._model_set)
        if self.cfg.metrics_port:
            self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_address)
        _warm_up()
        self.delivery = start_background(  # delivery hook: a background thread, never waited on
            self.processor.sessions, self.settings.delivery, self.metrics)
        logger.info("watching %s as %s", self.incoming, self.worker_id, extra=self._log)
        try:
            recovered = False
            while not recovered and not self.stop.is_set():
                with self._transient("recovering after a restart"):
                    self._recover()
                    recovered = True
            with FolderWatcher(self.incoming, self.cfg) as watcher:
                while not self.stop.is_set():
                    self.step(watcher)
                    self.stop.wait(self.cfg.poll_seconds)
        finally:
            if self.delivery is not None:  # delivery hook: stop the background delivery
                self.delivery.stop(self.cfg.grace_seconds)
            self.processor.close()
            self.metrics.close()
            with self._transient("signing off"):
                self._sign_off()
        logger.info("stopped", extra=self._log)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler must not take locks the interrupted main thread may hold (logging's, the stop
        # Event's): a thread does the work.
        if self._stopping:
            return
        self._stopping = True
        threading.Thread(target=self._shut_down, args=(signum,), name="shutdown", daemon=True).start()

    def _shut_down(self, signum: int) -> None:
        logger.info("signal %d: finishing the current batch, then exiting", signum, extra=self._log)
        self.stop.set()
        if not self._exited.wait(self.cfg.grace_seconds):
            self._give_up()

    def _give_up(self) -> None:
        logger.warning("grace time of %g s is over: exiting; unfinished instances return to the queue",
                       self.cfg.grace_seconds, extra=self._log)
        logging.shutdown()
        os._exit(0)

    def step(self, watcher: FolderWatcher) -> None:
        """One round: take settled files in, keep the worker alive, process what the queue holds."""
        if self._fault is not None and self._db_fault:
            with self._transient("reconnecting to the results DB"):
                pass  # leaving the block without a fault releases this worker's rows: a DB round trip
            if self._fault is not None:
                return  # still down: leave the files where they are
        with self._transient("taking files in"):
            self._take_in_all(watcher, watcher.ready())
        if time.monotonic() - self._last_maintenance >= self.cfg.heartbeat_seconds:
            with self._transient("maintenance"):
                self._maintain()
        more = True
        while more and not self.stop.is_set() and self._fault is None:
            more = False
            with self._transient("processing"):
                more = self._process_one_batch(watcher)

    @contextmanager
    def _transient(self, what: str) -> Iterator[None]:
        """Run a step; on a transient fault log once per episode, wait with backoff, and carry on."""
        try:
            yield
            if self._fault is not None:
                self._release_own()  # rows this worker held when the fault struck go back to the queue
                logger.warning("recovered (%s)", self._fault, extra=self._log)
                self._fault = None
                self._backoff = min(1.0, self.cfg.retry_max_seconds)
        except (PersistError, OSError, _RetryLater) as err:
            if self._fault is None:
                logger.error("%s failed: %s; retrying with backoff until it works", what, err, extra=self._log)
                self.metrics.transient_faults.inc()
            self._fault = f"{what}: {err}"
            self._db_fault = isinstance(err, PersistError)
            self.stop.wait(self._backoff)
            self._backoff = min(self._backoff * 2, self.cfg.retry_max_seconds)

    # -- intake -------------------------------------------------------------------------------------------

    def _take_in_all(self, watcher: FolderWatcher, paths: Sequence[Path]) -> None:
        """Take settled files in; on a fault, those not taken go back to the watcher to be handed out again."""
        for i, path in enumerate(paths):
            try:
                self._take_in(path)
            except BaseException:
                for rest in paths[i:]:
                    watcher.note(rest)
                raise

    def _take_in(self, path: Path) -> None:
        """Move a settled file out of the drop folder and queue it (or reject it, or mark it a duplicate).

        The row names the file where it now lies (``file_path``), so a crash or fault before it is filed away
        leaves it to :meth:`_finish_moves`. On a DB fault the file stays in ``inflight/``: whether the insert
        was committed is unknown when the connection drops during the commit, and :meth:`_return_orphans`
        puts it back in the drop folder only if no row names it.
        """
        from xraybatch.db import queue, repo

        dest = self.inflight / uuid.uuid4().hex
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return  # another worker took it first, or the sender removed it
        received = Path(path)
        sessions = self.processor.sessions  # type: ignore[union-attr]
        read = read_received(dest, received, self.settings.ingest)
        with sessions() as s:
            if isinstance(read, Outcome):
                outcome = read
            else:
                if queue.enqueue(s, read, str(received), str(dest), self._model_set) is not None:
                    return  # queued: processed in a batch
                live = repo.live_instance(s, read.sop_instance_uid, self._model_set)
                where = f" (instance {live.id}, state {live.state})" if live is not None else ""
                outcome = Outcome(received, State.DUPLICATE, f"SOP Instance UID already received{where}", read)
            instance_id = repo.record_unclaimed(s, outcome, self._model_set, file_path=str(dest))
        self._log_outcome(outcome)
        self.metrics.record(outcome)
        self._file_away(instance_id, dest, outcome)

    @property
    def _model_set(self) -> str:
        return self.processor.model_set  # type: ignore[union-attr]

    # -- processing ---------------------------------------------------------------------------------------

    def _process_one_batch(self, watcher: FolderWatcher) -> bool:
        """Claim and process one batch; ``False`` when there was nothing to do."""
        from xraybatch.db import queue

        size = self.settings.pipeline.batch_size
        sessions = self.processor.sessions  # type: ignore[union-attr]
        with sessions() as s:
            depth = queue.depth(s)
        self.metrics.queue_depth.set(depth)
        if depth == 0:
            return False
        if depth < size and watcher.pending():
            self.stop.wait(self.cfg.batch_wait_seconds)  # more files are settling: let the batch fill
            if self.stop.is_set():
                return False  # stopping: start no new batch
            self._take_in_all(watcher, watcher.ready())
        with sessions() as s:
            claimed = queue.claim_batch(s, self.worker_id, size, self.cfg.lease_seconds)
        if not claimed:
            return False
        with self._renewing_leases():
            outcomes = self.processor.process_claimed(claimed)  # type: ignore[union-attr]
        retry = ""
        for item, outcome in zip(claimed, outcomes):
            if not outcome.recorded:
                continue  # the lease was lost (see repo.finish): the worker that holds the row now files it away
            if outcome.retryable and item.attempts < self.cfg.max_attempts:
                with sessions() as s:
                    requeued = queue.requeue(s, item.instance_id, outcome.reason)
                if requeued:
                    retry = outcome.reason
                    continue
                outcome = replace(outcome, reason=f"{outcome.reason}; not retried: its SOP Instance UID was "
                                                  "received again meanwhile")
            self.metrics.record(outcome)
            self._file_away(item.instance_id, Path(item.file_path), outcome)
        if retry:
            raise _RetryLater(retry)
        return True

    @contextmanager
    def _renewing_leases(self) -> Iterator[None]:
        """Keep the heartbeat (and so the leases of the claimed rows) going while a batch runs."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.cfg.heartbeat_seconds):
                try:
                    self._heartbeat()
                except PersistError:
                    pass  # the main thread meets the same fault when it next uses the DB, and reports it

        keeper = threading.Thread(target=beat, name="lease-keeper", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()

    # -- file lifecycle -----------------------------------------------------------------------------------

    def _file_away(self, instance_id: int, src: Path, outcome: Outcome) -> None:
        """Archive (or delete) a processed input; quarantine any other, with a JSON sidecar; record where.

        A file already gone from ``src`` was filed away by another worker (or by this one before a crash):
        its place is looked up and recorded, and nothing moves twice.
        """
        from xraybatch.db import queue

        day = datetime.now(UTC).strftime("%Y%m%d")
        dest: Path | None
        try:
            if outcome.state in _TO_ARCHIVE:
                if self.cfg.after_done == "delete":
                    src.unlink()
                    dest = None
                else:
                    dest = self.archive / day / src.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(src, dest)
            else:
                dest = self.quarantine / day / src.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                _atomic_json(dest.with_name(dest.name + ".json"), {
                    "instance_id": instance_id,
                    "state": str(outcome.state),
                    "reason": outcome.reason,
                    "received_path": str(outcome.path),
                    "sop_instance_uid": outcome.header.sop_instance_uid if outcome.header else None,
                    "quarantined_at": datetime.now(UTC).isoformat(),
                    "worker_id": self.worker_id,
                })
                os.rename(src, dest)
        except FileNotFoundError:
            if src.exists():
                raise  # the destination folder is the problem, not the source
            dest = self._filed(src.name)
            if dest is None and not (outcome.state in _TO_ARCHIVE and self.cfg.after_done == "delete"):
                logger.warning("instance %d: its file %s is gone", instance_id, file_ref(src), extra=self._log)
        if dest is not None:
            fsync_dir(dest.parent)
        with self.processor.sessions() as s:  # type: ignore[union-attr]
            queue.set_file_path(s, instance_id, str(dest) if dest else None)

    def _filed(self, name: str) -> Path | None:
        """Where a file named ``name`` was archived or quarantined, if it was."""
        for folder in (self.archive, self.quarantine):
            for day in sorted(folder.iterdir(), reverse=True):
                if (day / name).is_file():
                    return day / name
        return None

    def _log_outcome(self, outcome: Outcome) -> None:
        uid = outcome.header.sop_instance_uid if outcome.header else ""
        logger.info("%s: %s", outcome.state, outcome.reason, extra={**self._log, "sop_instance_uid": uid})

    # -- keeping the queue healthy ------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        from xraybatch.db import queue

        with self.processor.sessions() as s:  # type: ignore[union-attr]
            queue.heartbeat(s, self.worker_id, str(self.incoming), self._model_set,
                            lease_seconds=self.cfg.lease_seconds)

    def _maintain(self) -> None:
        """Heartbeat and take back expired leases; every ``orphan_seconds`` also sweep ``inflight/``."""
        from xraybatch.db import queue

        self._last_maintenance = time.monotonic()
        self._heartbeat()
        with self.processor.sessions() as s:  # type: ignore[union-attr]
            requeued, given_up = queue.reclaim_expired(s, self.cfg.max_attempts)
        if requeued:
            logger.warning("%d instances returned to the queue: their worker stopped", requeued, extra=self._log)
        for item in given_up:
            outcome = Outcome(Path(item.received_path), State.FAILED, f"gave up after {item.attempts} attempts")
            self.metrics.record(outcome)
            self._file_away(item.instance_id, Path(item.file_path), outcome)
        if time.monotonic() - self._last_sweep >= self.cfg.orphan_seconds:
            self._sweep_inflight()

    def _sweep_inflight(self) -> None:
        """Finish interrupted file moves and return orphans (queries that scan ``instances``: not too often)."""
        self._finish_moves()
        self._return_orphans()
        self._last_sweep = time.monotonic()

    def _recover(self) -> None:
        """After a restart: take back rows of dead local workers at once, then maintain (sweeping inflight/)."""
        from xraybatch.db import queue

        with self.processor.sessions() as s:  # type: ignore[union-attr]
            released = queue.release_dead_local(s, self.worker_id)
        if released:
            logger.warning("%d instances of stopped workers returned to the queue", released, extra=self._log)
        self._maintain()

    def _finish_moves(self) -> None:
        """File away inputs whose row is final but whose file is still in ``inflight/`` (crash, fault)."""
        from xraybatch.db import queue

        before = datetime.now(UTC) - timedelta(seconds=max(self.cfg.lease_seconds, self.cfg.orphan_seconds))
        with self.processor.sessions() as s:  # type: ignore[union-attr]
            unfinished = queue.finished_under(s, str(self.inflight), self.worker_id, before)
        for instance_id, state, file_path in unfinished:
            path = Path(file_path)
            self._file_away(instance_id, path, Outcome(path, State(state), "moved after a restart"))

    def _return_orphans(self) -> None:
        """Files in ``inflight/`` that no row names, older than ``orphan_seconds``, go back to the drop folder."""
        from xraybatch.db import queue

        with self.processor.sessions() as s:  # type: ignore[union-attr]
            known = queue.known_files(s, str(self.inflight))
        now = time.time()
        for path in self.inflight.iterdir():
            try:
                if str(path) in known or not path.is_file() or now - path.stat().st_ctime <= self.cfg.orphan_seconds:
                    continue
                os.rename(path, self.incoming / f"recovered-{path.name}")
            except FileNotFoundError:
                continue  # taken back by another worker meanwhile
            logger.warning("returned the orphan %s to the drop folder", file_ref(path), extra=self._log)

    def _release_own(self) -> None:
        """Return this worker's claimed rows to the queue (after a fault interrupted their batch)."""
        from xraybatch.db import queue

        with self.processor.sessions() as s:  # type: ignore[union-attr]
            queue.release_worker(s, self.worker_id)

    def _sign_off(self) -> None:
        from xraybatch.db import queue

        with self.processor.sessions() as s:  # type: ignore[union-attr]
            queue.release_worker(s, self.worker_id)
            queue.heartbeat(s, self.worker_id, str(self.incoming), self._model_set, stopped=True)


def run_workers(argv: Sequence[str], workers: int, metrics_port: int = 0) -> int:
    """Start ``workers`` processes running ``argv`` (``xraybatch watch ... --workers 1``); forward signals.

    With ``metrics_port`` set, worker ``i`` serves its metrics on ``metrics_port + i``.
    """
    import subprocess
    import sys

    children = [
        subprocess.Popen([sys.executable, "-m", "xraybatch", *argv], env=worker_environ(os.environ, metrics_port, i))
        for i in range(workers)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes)


def worker_environ(environ: Mapping[str, str], metrics_port: int, index: int) -> dict[str, str]:
    """The environment of worker ``index`` of ``--workers N``: its own metrics port, when metrics are on."""
    out = dict(environ)
    if metrics_port:
        out["XRAYBATCH_WATCH_METRICS_PORT"] = str(metrics_port + index)
    return out
