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
  exits anyway (its rows are taken back later); exit code 0. A second signal stops at once.
- The claim, the executor, the heartbeat, the rescuer and the file policies are the worker loop of
  :mod:`xraybatch.loop`, shared with ``run-folder``; this module adds the drop folder: intake and the
  ``inflight/`` sweeps. Rows of a ``run-folder`` run in the same database are never claimed here, and their
  files are never moved.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from xraybatch.db.tables import WATCH_SOURCE
from xraybatch.delivery import DeliveryWorker, start_background
from xraybatch.domain import Outcome, State, file_ref, path_to_db
from xraybatch.errors import InvalidInputError
from xraybatch.loop import QueueWorker
from xraybatch.pipeline import read_received
from xraybatch.settings import Settings, for_worker
from xraybatch.watch import FolderWatcher

logger = logging.getLogger(__name__)

PARENT_PID_VARIABLE = "XB_SUPERVISOR_PID"  # set for the workers of ``--workers N``: they die with it
RESTART_DELAY = 5.0  # seconds between a worker's unplanned exit and its replacement
RESTART_WINDOW = 600.0  # the supervisor gives up when the workers exit more than ...
RESTART_LIMIT_PER_WORKER = 3  # ... this many times per worker within RESTART_WINDOW seconds


class Daemon(QueueWorker):
    """One ``watch`` worker: watches ``incoming``, feeds the shared queue, processes batches from it."""

    sources = (WATCH_SOURCE,)

    def __init__(self, incoming: Path, settings: Settings, *, migrate: bool = True) -> None:
        self.incoming = incoming.resolve()
        super().__init__(settings, str(self.incoming))
        self.migrate = migrate
        self._watcher: FolderWatcher | None = None
        self.delivery: DeliveryWorker | None = None  # delivery hook: the background delivery, if any
        self._last_sweep = float("-inf")  # the first maintenance (at start-up) sweeps inflight/
        self._log = {"worker_id": self.worker_id, "stage": "watch"}

    # -- running ------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Watch until SIGTERM/SIGINT (or :attr:`stop`); returns the exit code, 0 on a clean stop.

        Raises
        ------
        InvalidInputError
            When the drop folder does not exist.
        """
        if not self.incoming.is_dir():
            raise InvalidInputError(
                f"the drop folder {self.incoming} does not exist (or is not a folder): create it, or point "
                "`xraybatch watch` at the folder the DICOM receiver writes to"
            )
        self.install_signal_handlers()
        try:
            return self._run()
        finally:
            self.mark_exited()

    def _run(self) -> int:
        for folder in (self.inflight, self.archive, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
        if not self._open(self.migrate):
            return 0
        if self.cfg.metrics_port:
            self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_address)
        logger.info("watching %s as %s (models %s, batch %d, lease %g s)", self.incoming, self.worker_id,
                    self.model_set, self.settings.pipeline.batch_size, self.cfg.lease_seconds, extra=self._log)
        self.delivery = start_background(  # delivery hook: a background thread, never waited on
            self.processor.sessions, self.settings.delivery, self.metrics)  # type: ignore[union-attr]
        try:
            with self.beating():
                recovered = False
                while not recovered and not self.stop.is_set():
                    with self._transient("recovering after a restart"):
                        self._maintain()
                        recovered = True
                with FolderWatcher(self.incoming, self.cfg) as watcher:
                    self._watcher = watcher
                    while not self.stop.is_set():
                        self.step(watcher)
                        self.stop.wait(watcher.next_wait())
        finally:
            if self.delivery is not None:  # delivery hook: stop the background delivery
                self.delivery.stop(self.cfg.grace_seconds)
            self.processor.close()  # type: ignore[union-attr]
            self.metrics.close()
            with self._transient("signing off"):
                self._sign_off()
        logger.info("stopped", extra=self._log)
        return 0

    def step(self, watcher: FolderWatcher) -> None:
        """One round: take settled files in, keep the worker alive, process what the queue holds."""
        if self._fault is not None and self._db_fault:
            with self._transient("reconnecting to the results DB"):
                pass  # leaving the block without a fault releases this worker's rows: a DB round trip
            if self._fault is not None:
                return  # still down: leave the files where they are
        with self._transient("taking files in"):
            self._take_in_all(watcher, watcher.ready())
        if self._maintenance_due():
            with self._transient("maintenance"):
                self._maintain()
        more = True
        while more and not self.stop.is_set() and self._fault is None:
            more = False
            with self._transient("processing"):
                more = self.process_one_batch()

    def _before_claim(self) -> None:
        """Let a batch fill while files are still settling (one wait per batch)."""
        from xraybatch.db import queue

        watcher = self._watcher
        if watcher is None:
            return
        with self.processor.sessions() as s:  # type: ignore[union-attr]
            depth = queue.depth(s)
        self.metrics.queue_depth.set(depth)
        if 0 < depth < self.settings.pipeline.batch_size and watcher.pending():
            self.stop.wait(self.cfg.batch_wait_seconds)
            if not self.stop.is_set():
                self._take_in_all(watcher, watcher.ready())

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
        """Move a settled file out of the drop folder and queue it (or reject it: its header cannot be read).

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
            if not isinstance(read, Outcome):
                queue.enqueue(s, read, str(received), str(dest), self.model_set, WATCH_SOURCE)
                return  # queued: judged and processed in a batch (a copy waits for an earlier copy to end)
            instance_id = repo.record_unclaimed(s, read, self.model_set, file_path=path_to_db(dest))
        self._log_outcome(read)
        self.metrics.record(read)
        self._file_away(instance_id, dest, read, WATCH_SOURCE)

    def _log_outcome(self, outcome: Outcome) -> None:
        uid = outcome.header.sop_instance_uid if outcome.header else ""
        logger.info("%s %s: %s", outcome.state, uid or file_ref(outcome.path), outcome.reason,
                    extra={**self._log, "sop_instance_uid": uid, "state": str(outcome.state)})

    # -- keeping the queue and inflight/ healthy ------------------------------------------------------------

    def _maintain(self) -> None:
        """The rescuer (see :meth:`QueueWorker._maintain`); every ``orphan_seconds`` also sweep ``inflight/``."""
        super()._maintain()
        if time.monotonic() - self._last_sweep >= self.cfg.orphan_seconds:
            self._sweep_inflight()

    def _sweep_inflight(self) -> None:
        """Finish interrupted file moves and return orphans (queries that scan ``instances``: not too often)."""
        self._finish_moves()
        self._return_orphans()
        self._last_sweep = time.monotonic()

    def _finish_moves(self) -> None:
        """File away inputs whose row is final but whose file is still in ``inflight/`` (crash, fault)."""
        from xraybatch.db import queue

        before = datetime.now(UTC) - timedelta(seconds=max(self.cfg.lease_seconds, self.cfg.orphan_seconds))
        with self.processor.sessions() as s:  # type: ignore[union-attr]
            unfinished = queue.finished_under(s, str(self.inflight), self.worker_id, before)
        for instance_id, state, file_path in unfinished:
            path = Path(file_path)
            self._file_away(instance_id, path, Outcome(path, State(state), "moved after a restart"), WATCH_SOURCE)

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


def run_workers(argv: Sequence[str], workers: int, settings: Settings) -> int:
    """Start ``workers`` processes running ``argv`` (``xraybatch watch ... --workers 1``); forward signals.

    The results DB is migrated here, once, before any worker starts (workers racing to create the tables of a
    fresh SQLite file was a fault). Each worker leads its own process group and dies with this process, however
    it ends (:mod:`xraybatch.lifetime`). With metrics on, worker ``i`` serves them on ``metrics_port + i``. The
    workers share the host's cores (:func:`xraybatch.settings.for_worker`): each gets its share of torch
    threads and decodes in its own process.

    A worker that exits before a stop signal (killed for memory, a crash) is replaced after
    :data:`RESTART_DELAY` seconds; the new one takes back the dead one's claimed rows at once. When the workers
    exit more than :data:`RESTART_LIMIT_PER_WORKER` times per worker within :data:`RESTART_WINDOW` seconds
    (a setting or a bundle that no worker can start with, say), the others are stopped and the supervisor
    exits 1, for the service manager to report. SIGTERM/SIGINT go to every worker; the supervisor exits
    with the highest of their exit codes.
    """
    import subprocess
    import sys
    from collections import deque

    from xraybatch.db import session
    from xraybatch.lifetime import kill_group

    if settings.db.auto_upgrade:
        if settings.db_url.startswith("sqlite"):
            settings.workdir.mkdir(parents=True, exist_ok=True)
        session.upgrade(settings.db_url)
    each = for_worker(settings, workers)

    def start(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "xraybatch", *argv], process_group=0,
                                env=worker_environ(os.environ, settings.watch.metrics_port, i, each))

    children = [start(i) for i in range(workers)]
    stopping: list[int] = []  # the signal that stops the workers, once one came

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    exits: deque[float] = deque()  # when workers exited unplanned, within the window
    due: dict[int, float] = {}  # worker index -> when its replacement starts
    gave_up = False
    try:
        while not (stopping or gave_up) or any(child.poll() is None for child in children):
            now = time.monotonic()
            for i, child in enumerate(children):
                if stopping or gave_up or child.poll() is None:
                    continue
                if i not in due:
                    kill_group(child.pid)  # its leftovers (decode processes) go with it
                    exits.append(now)
                    while exits and exits[0] < now - RESTART_WINDOW:
                        exits.popleft()
                    if len(exits) > RESTART_LIMIT_PER_WORKER * workers:
                        logger.error(
                            "watch workers exited %d times in %.0f s (the last with code %s): giving up; the "
                            "workers' own log lines above say why", len(exits), RESTART_WINDOW, child.returncode,
                            extra={"stage": "supervisor"})
                        gave_up = True
                        forward(signal.SIGTERM, None)
                        break
                    logger.warning("watch worker %d (pid %d) exited with code %s: a new one starts in %.0f s",
                                   i, child.pid, child.returncode, RESTART_DELAY, extra={"stage": "supervisor"})
                    due[i] = now + RESTART_DELAY
                elif now >= due[i]:
                    del due[i]
                    children[i] = start(i)
                    if stopping:  # the signal came while it started: it missed the forwarding
                        children[i].send_signal(stopping[0])
                    logger.info("watch worker %d restarted as pid %d", i, children[i].pid,
                                extra={"stage": "supervisor"})
            time.sleep(0.2)
    finally:
        for child in children:
            kill_group(child.pid)  # a worker's leftovers (decode processes) go with it
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [child.returncode for child in children]
    return 1 if gave_up else max(c if c is not None else 1 for c in codes)


def worker_environ(
    environ: Mapping[str, str], metrics_port: int, index: int, each: Settings | None = None
) -> dict[str, str]:
    """The environment of worker ``index`` of ``--workers N``: no migration, the supervisor's pid, its metrics port.

    ``each`` (:func:`xraybatch.settings.for_worker`) gives every worker its share of the cores: torch threads and
    decode processes.
    """
    out = dict(environ)
    if each is not None:
        out["XRAYBATCH_MODEL_THREADS"] = str(each.model.threads)
        out["XRAYBATCH_PIPELINE_DECODE_PROCESSES"] = str(each.pipeline.decode_processes)
    out["XRAYBATCH_DB_AUTO_UPGRADE"] = "false"  # migrated once by the supervisor
    out[PARENT_PID_VARIABLE] = str(os.getpid())
    if metrics_port:
        out["XRAYBATCH_WATCH_METRICS_PORT"] = str(metrics_port + index)
    return out
