"""The one worker loop behind ``watch`` and ``run-folder``: claim a batch, run it, record it, file it away.

Parts, each small (the shape of the PostgreSQL job queues, see STYLE.md "The worker loop"):

- *source*: puts files into the queue (``xraybatch.daemon`` for a drop folder, :class:`FolderRun` here for a
  folder left in place) and names the row's ``source``, which chooses the *file policy*;
- *claim*: :func:`xraybatch.db.queue.claim_batch`, sized to the batch, only rows of the worker's sources;
- *executor*: :meth:`xraybatch.pipeline.Processor.process_claimed`, one batch through every stage with one
  per-file catch boundary; it finishes a row only while this worker still holds it;
- *retry policy*: :func:`retry`: a transient fault of a file (outbox unwritable) is retried up to
  ``max_attempts``; a bad file never is;
- *heartbeat*: a thread that records the worker alive and renews its leases every ``heartbeat_seconds``,
  whether or not a batch runs;
- *rescuer*: :meth:`QueueWorker._maintain`: rows of dead local workers back to the queue at once, rows of
  silent workers elsewhere when their lease runs out (given up after ``max_attempts``);
- *supervisor*: one stop event per worker; SIGTERM/SIGINT set it (no ``KeyboardInterrupt`` raised at an
  arbitrary point, such as inside a garbage-collection callback), the current batch gets ``grace_seconds``,
  what is left returns to the queue; a second signal stops at once.

File policies: a ``watch`` row's file moves to ``archive/`` (or is deleted) or to ``quarantine/`` with a JSON
sidecar; a ``run-folder:`` row's file is never moved, renamed or deleted, by any worker.

Drain mode (``run-folder``): the loop ends when the source has put every file in and no row of the source is
queued or processing any more; without it (``watch``) the loop runs until stopped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from xraybatch.db.tables import WATCH_SOURCE
from xraybatch.domain import Outcome, State, file_ref, path_to_db
from xraybatch.errors import PersistError
from xraybatch.files import fsync_dir
from xraybatch.lifetime import install_stop_handlers
from xraybatch.metrics import WorkerMetrics
from xraybatch.pipeline import Processor
from xraybatch.settings import Settings

logger = logging.getLogger(__name__)

_TO_ARCHIVE = (State.DONE, State.DUPLICATE)


class RetryLater(Exception):
    """Some files of a batch met a transient fault and went back to the queue: back off, then go on."""


def retry(attempts: int, outcome: Outcome, max_attempts: int) -> bool:
    """The retry policy: try a file again only after a transient fault, and at most ``max_attempts`` claims."""
    return outcome.retryable and attempts < max_attempts


def atomic_json(path: Path, data: dict[str, object]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def warm_up() -> None:
    """Import now what the first batch would import (Grad-CAM, highdicom: seconds), not on the first file; then
    take what is loaded out of the garbage collector's reach (:func:`freeze_survivors`)."""
    import importlib

    for module in ("xraybatch.explain", "xraybatch.writeback", "pytorch_grad_cam"):
        importlib.import_module(module)
    freeze_survivors()


def freeze_survivors() -> None:
    """Collect, then move every object still alive to a generation the garbage collector never walks.

    The models, torch and the libraries are some 800,000 objects that live as long as the worker, and the
    caches the libraries fill on the first image some 150,000 more. Python's cyclic collector walks all of them
    on each full collection, which an image's outputs (the SR's content items, above all) start about every 30
    images: 0.3 s each on a worker with both shipped models. A worker calls this after loading its models and
    again after its first batch (``gc.freeze``); its later full collections walk a few thousand objects (3 ms).
    What it makes later is collected as before, and frozen objects are still freed when nothing refers to them.
    """
    import gc

    gc.collect()
    gc.freeze()


class QueueWorker:
    """One worker: claims batches of its sources from the shared queue and takes them through the pipeline.

    Subclasses are the sources: :class:`xraybatch.daemon.Daemon` (a drop folder) and :class:`FolderRun`.
    """

    #: the rows this worker claims (``instances.source``)
    sources: tuple[str, ...] = (WATCH_SOURCE,)
    #: a signal ends the process with 128 + the signal's number (an interrupted run), not 0 (a daemon asked to stop)
    nonzero_when_stopped = False

    def __init__(self, settings: Settings, label: str) -> None:
        from xraybatch.db.queue import new_worker_id

        self.settings = settings
        self.cfg = settings.watch
        self.label = label  # the folder the worker serves, for the workers table
        work = settings.workdir.resolve()
        self.inflight, self.archive, self.quarantine = work / "inflight", work / "archive", work / "quarantine"
        self.worker_id = new_worker_id()
        self.stop = threading.Event()
        self.signal_received: int | None = None
        self._exited = threading.Event()
        self.processor: Processor | None = None
        self.metrics = WorkerMetrics(self.worker_id)
        self._fault: str | None = None  # the transient fault in progress, logged once
        self._db_fault = False  # the fault is the results DB: probe it before touching files again
        self._backoff = min(1.0, self.cfg.retry_max_seconds)
        self._last_maintenance = float("-inf")
        self.ready_at: float | None = None  # time.perf_counter() once the models are loaded
        self._log = {"worker_id": self.worker_id, "stage": "worker"}
        self._first_batch_done = False  # then the libraries' caches are filled: freeze_survivors again

    # -- supervisor: signals and the stop event --------------------------------------------------------------

    def install_signal_handlers(self) -> Callable[[], None]:
        """Handle SIGTERM/SIGINT with :meth:`_on_signal`; returns a function that restores the old handlers."""
        return install_stop_handlers(self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler must not take locks the interrupted main thread may hold (logging's, the stop
        # Event's): a thread does the work.
        if self.signal_received is not None:
            threading.Thread(target=self._stop_now, args=(signum,), name="stop-now", daemon=True).start()
            return
        self.signal_received = signum
        threading.Thread(target=self._shut_down, args=(signum,), name="shutdown", daemon=True).start()

    def _shut_down(self, signum: int) -> None:
        logger.info("%s: finishing the current batch, then stopping (a second signal stops at once)",
                    signal.Signals(signum).name, extra=self._log)
        self.stop.set()
        if not self._exited.wait(self.cfg.grace_seconds):
            logger.warning("grace time of %g s is over: stopping; unfinished instances return to the queue",
                           self.cfg.grace_seconds, extra=self._log)
            self._exit_now()

    def _stop_now(self, signum: int) -> None:
        logger.warning("%s again: stopping at once; unfinished instances return to the queue",
                       signal.Signals(signum).name, extra=self._log)
        self._exit_now()

    def _exit_now(self) -> None:
        try:
            self._release_own()
        except Exception as err:  # noqa: BLE001 - leaving anyway: the rescuer of the next worker takes the rows back
            logger.warning("could not return the claimed instances to the queue: %s", err, extra=self._log)
        logging.shutdown()  # decode processes die with this process (xraybatch.lifetime): no waiting for them
        os._exit(128 + (self.signal_received or signal.SIGINT) if self.nonzero_when_stopped else 0)

    def mark_exited(self) -> None:
        self._exited.set()

    # -- transient faults -----------------------------------------------------------------------------------

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
        except (PersistError, OSError, RetryLater) as err:
            if self._fault is None:
                logger.error("%s failed: %s; retrying with backoff until it works", what, err, extra=self._log)
                self.metrics.transient_faults.inc()
            self._fault = f"{what}: {err}"
            self._db_fault = isinstance(err, PersistError)
            self.stop.wait(self._backoff)
            self._backoff = min(self._backoff * 2, self.cfg.retry_max_seconds)

    def _open(self, migrate: bool) -> bool:
        """Load the models and open the results DB, retrying transient faults; ``False`` when stopped first.

        The garbage collector is off meanwhile: importing torch and the libraries would otherwise start seven
        full collections over a growing heap (1.3 s of a worker's start-up), and it all stays alive anyway.
        """
        import gc

        collecting = gc.isenabled()
        gc.disable()
        try:
            while self.processor is None and not self.stop.is_set():
                with self._transient("opening the models and the results DB"):
                    self.processor = Processor.open(self.settings, self.worker_id, migrate=migrate)
            if self.processor is None:
                return False
            self.metrics.models_loaded(self.model_set)
            warm_up()
        finally:
            if collecting:
                gc.enable()
        self.ready_at = time.perf_counter()
        return True

    @property
    def model_set(self) -> str:
        return self.processor.model_set  # type: ignore[union-attr]

    # -- claim, execute, record, file away --------------------------------------------------------------------

    def process_one_batch(self) -> bool:
        """Claim and process one batch; ``False`` when there was nothing to claim."""
        from xraybatch.db import queue

        sessions = self.processor.sessions  # type: ignore[union-attr]
        self._before_claim()
        if self.stop.is_set():
            return False
        with sessions() as s:
            claimed = queue.claim_batch(s, self.worker_id, self.settings.pipeline.batch_size,
                                        self.cfg.lease_seconds, self.sources)
        if not claimed:
            return False
        outcomes = self.processor.process_claimed(claimed)  # type: ignore[union-attr]
        if not self._first_batch_done:
            self._first_batch_done = True
            freeze_survivors()
        retry_reason = ""
        for item, outcome in zip(claimed, outcomes):
            if not outcome.recorded:
                continue  # the lease was lost (see repo.finish): the worker that holds the row now files it away
            if retry(item.attempts, outcome, self.cfg.max_attempts):
                with sessions() as s:
                    queue.requeue(s, item.instance_id, outcome.reason)
                retry_reason = outcome.reason
                continue
            self.metrics.record(outcome)
            self._file_away(item.instance_id, Path(item.file_path), outcome, item.source)
            self._on_outcome(outcome)
        if retry_reason:
            raise RetryLater(retry_reason)
        return True

    def _before_claim(self) -> None:
        """Hook: what a source does before each claim (the drop folder lets a batch fill)."""

    def _on_outcome(self, outcome: Outcome) -> None:
        """Hook: called for each final outcome this worker recorded."""

    def _file_away(self, instance_id: int, src: Path, outcome: Outcome, source: str) -> None:
        """Apply the file policy of the row's source: ``watch`` files are archived or quarantined; others stay."""
        if source != WATCH_SOURCE:
            return  # run-folder: its inputs are never moved, renamed or deleted
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
                atomic_json(dest.with_name(dest.name + ".json"), {
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
            queue.set_file_path(s, instance_id, path_to_db(dest) if dest else None)

    def _filed(self, name: str) -> Path | None:
        """Where a file named ``name`` was archived or quarantined, if it was."""
        for folder in (self.archive, self.quarantine):
            if not folder.is_dir():
                continue
            for day in sorted(folder.iterdir(), reverse=True):
                if (day / name).is_file():
                    return day / name
        return None

    # -- heartbeat and rescuer ----------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        from xraybatch.db import queue

        with self.processor.sessions() as s:  # type: ignore[union-attr]
            queue.heartbeat(s, self.worker_id, self.label, self.model_set, lease_seconds=self.cfg.lease_seconds)

    @contextmanager
    def beating(self) -> Iterator[None]:
        """Keep the heartbeat (the workers row, and the leases of claimed rows) going while the worker lives."""
        done = threading.Event()
        failing = False

        def beat() -> None:
            nonlocal failing
            while not done.wait(self.cfg.heartbeat_seconds):
                try:
                    self.heartbeat()
                    failing = False
                except PersistError as err:
                    if not failing:  # the main loop meets the same fault when it next uses the DB, and reports it
                        logger.debug("heartbeat failed: %s", err, extra=self._log)
                    failing = True

        keeper = threading.Thread(target=beat, name="heartbeat", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()

    def _maintain(self) -> None:
        """Heartbeat, take back rows of dead local workers and expired leases, fail rows tried too often."""
        from xraybatch.db import queue

        self._last_maintenance = time.monotonic()
        self.heartbeat()
        with self.processor.sessions() as s:  # type: ignore[union-attr]
            released = queue.release_dead_local(s, self.worker_id)
            requeued, given_up = queue.reclaim_expired(s, self.cfg.max_attempts)
        if released or requeued:
            logger.warning("%d instances returned to the queue: their worker stopped", released + requeued,
                           extra=self._log)
        for item in given_up:
            outcome = Outcome(Path(item.received_path), State.FAILED, f"gave up after {item.attempts} attempts")
            logger.info("%s %s: %s", outcome.state, file_ref(outcome.path), outcome.reason,
                        extra={**self._log, "state": str(outcome.state)})
            self.metrics.record(outcome)
            self._file_away(item.instance_id, Path(item.file_path), outcome, item.source)

    def _maintenance_due(self) -> bool:
        return time.monotonic() - self._last_maintenance >= self.cfg.heartbeat_seconds

    def _release_own(self) -> None:
        """Return this worker's claimed rows to the queue (after a fault interrupted their batch)."""
        from xraybatch.db import queue

        if self.processor is None:
            return
        with self.processor.sessions() as s:
            queue.release_worker(s, self.worker_id)

    def _sign_off(self) -> None:
        from xraybatch.db import queue

        with self.processor.sessions() as s:  # type: ignore[union-attr]
            queue.release_worker(s, self.worker_id)
            queue.heartbeat(s, self.worker_id, self.label, self.model_set, stopped=True)


class FolderRun(QueueWorker):
    """``run-folder``'s worker in drain mode: claims the rows of one folder until none is left.

    With ``intake`` set, this worker also puts the folder's files into the queue (in a thread, while the models
    load); with ``--workers N`` the supervisor does that and passes the event it sets when every file is in.
    """

    nonzero_when_stopped = True

    def __init__(
        self,
        root: Path,
        settings: Settings,
        intake_done: threading.Event | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        from xraybatch.pipeline import folder_source

        super().__init__(settings, str(root))
        self.root = root
        self.sources = (folder_source(root),)
        self.intake_done = intake_done
        self.callback = on_outcome
        self._log = {"worker_id": self.worker_id, "stage": "run-folder"}

    def _on_outcome(self, outcome: Outcome) -> None:
        if self.callback is not None:
            self.callback(outcome)

    def run(self, migrate: bool = True) -> bool:
        """Drain the folder's rows; ``True`` when nothing is left, ``False`` when stopped before."""
        from xraybatch.db import queue

        try:
            if not self._open(migrate):
                return False
            try:
                with self.beating():
                    while not self.stop.is_set():
                        if self._maintenance_due():
                            with self._transient("maintenance"):
                                self._maintain()
                        more = False
                        with self._transient("processing"):
                            more = self.process_one_batch()
                        if more or self._fault is not None:
                            continue
                        with self.processor.sessions() as s:  # type: ignore[union-attr]
                            left = queue.pending(s, self.sources[0])
                        if left == 0 and (self.intake_done is None or self.intake_done.is_set()):
                            return True
                        self.stop.wait(self.cfg.poll_seconds)  # copies wait for their first copy; intake goes on
            finally:
                # once the heartbeat thread has stopped (as the daemon does): a beat after the sign-off would
                # mark the worker alive again
                with self._transient("signing off"):
                    self._sign_off()
            return False
        finally:
            if self.processor is not None:
                self.processor.close()
            self.metrics.close()
            self.mark_exited()


def process_worker(root: Path, settings: Settings, intake_done: threading.Event, parent_pid: int) -> None:
    """Entry point of a ``run-folder --workers N`` worker process (spawned): drain the folder's rows.

    The worker leads its own process group (its decode processes follow it), ignores SIGINT (the supervisor
    turns Ctrl-C into SIGTERM for every worker), stops on SIGTERM after its batch, and dies with its parent.
    """
    from xraybatch.cli import configure_logging_from_environment
    from xraybatch.lifetime import exit_when_parent_dies, set_parent_death_signal

    os.setpgrp()
    configure_logging_from_environment()
    set_parent_death_signal(signal.SIGTERM)
    exit_when_parent_dies(parent_pid, signal.SIGTERM)
    worker = FolderRun(root, settings, intake_done)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, worker._on_signal)
    worker.run(migrate=False)
    logging.shutdown()


def run_processes(
    root: Path,
    settings: Settings,
    workers: int,
    intake: Callable[[], None],
    stop: threading.Event,
    poll: Callable[[], None],
) -> None:
    """Run ``workers`` :func:`process_worker` processes while ``intake`` fills the queue here; wait for them.

    ``stop`` (set by the supervisor's signal handler) makes every worker stop after its batch (SIGTERM); the
    workers still running after the grace time are killed with their process group. ``poll`` is called while
    waiting (the progress bar).
    """
    import multiprocessing

    from xraybatch.lifetime import kill_group

    ctx = multiprocessing.get_context("spawn")
    intake_done = ctx.Event()
    procs = [
        ctx.Process(target=process_worker, args=(root, settings, intake_done, os.getpid()), name=f"worker-{i}")
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    try:
        intake()
        intake_done.set()
        signalled_at: float | None = None
        polled = float("-inf")
        while any(p.is_alive() for p in procs):
            if time.monotonic() - polled >= 1.0:
                poll()
                polled = time.monotonic()
            if stop.is_set() and signalled_at is None:
                signalled_at = time.monotonic()
                for proc in procs:
                    if proc.is_alive() and proc.pid:
                        os.kill(proc.pid, signal.SIGTERM)
            if signalled_at is not None and time.monotonic() - signalled_at > settings.watch.grace_seconds:
                break
            for proc in procs:
                proc.join(timeout=0.2 / workers)
        poll()
    finally:
        for proc in procs:
            if proc.pid:
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)
                    proc.join(timeout=5)
                kill_group(proc.pid)  # the worker and its decode processes
            proc.join(timeout=5)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None, -signal.SIGTERM, -signal.SIGKILL)]
    if failed and not stop.is_set():
        raise PersistError(f"{len(failed)} of {workers} worker processes ended with an error (exit codes "
                           f"{failed}); see the log above; run the same command again to resume")

