"""Delivering what is pending: one pass (:func:`deliver_pending`) and the background thread of ``watch``
(:class:`DeliveryWorker`).

Per destination, up to ``[delivery] concurrency`` senders run at once; each claims a batch of
``[delivery] batch_size`` rows, sends it over one association (or one STOW-RS request), records the answers,
and claims the next, until nothing is left or the destination stops answering. A destination that cannot be
reached stops its senders at once: its rows stay ``pending`` and the pass moves on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from xraybatch.db.tables import utcnow
from xraybatch.delivery import store
from xraybatch.delivery.common import FAILED, PENDING, SENT, BatchResult, Item, ItemResult
from xraybatch.delivery.destinations import Destination, parse_destinations
from xraybatch.errors import XrayBatchError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from xraybatch.delivery.dimse import CommitmentListener
    from xraybatch.settings import DeliveryConfig

logger = logging.getLogger(__name__)


@dataclass
class DeliveryReport:
    """What one pass did, and what is left over the destinations it served."""

    sent: int = 0
    failed: int = 0
    warnings: int = 0
    retried_later: int = 0  # answers that left the row pending (no answer, out of resources)
    pending: int = 0  # rows left pending after the pass
    failed_total: int = 0  # rows left failed after the pass (refused by the PACS)
    faults: dict[str, str] = field(default_factory=dict)  # destination -> why it could not be reached
    answered: set[str] = field(default_factory=set)  # destinations that gave a definite answer (sent or failed)
    seconds: float = 0.0

    @property
    def unsent(self) -> int:
        """Rows not sent after the pass (pending plus failed)."""
        return self.pending + self.failed_total


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def deliver_pending(
    sessions: sessionmaker[Session],
    destinations: Sequence[str | Destination],
    cfg: DeliveryConfig,
    *,
    since: datetime | None = None,
    retry_failed: bool = False,
    connect_timeout: float | None = None,
    respect_backoff: bool = False,
    backoff: float | None = None,
    on_result: Callable[[Destination, ItemResult], None] | None = None,
    listener: CommitmentListener | None = None,
    worker_id: str | None = None,
) -> DeliveryReport:
    """Queue every output without a row for each destination, then send what is pending, once.

    Parameters
    ----------
    sessions
        Session factory of the results DB.
    destinations
        Destination URLs (``dicom://AE@HOST:PORT``, ``dicoms://...``, ``http(s)://HOST:PORT/PATH``).
    cfg
        ``[delivery]``.
    since
        Queue only outputs created at or after this (``run-folder``: its own outputs); rows already pending
        are sent whatever their age.
    retry_failed
        Send rows the PACS refused again (``deliver --retry-failed``).
    connect_timeout
        Seconds to open a connection; ``cfg.connect_timeout`` when omitted (``run-folder``: ``cfg.try_timeout``).
    respect_backoff
        Skip rows whose retry time lies in the future (the background delivery).
    backoff
        Seconds before a row left pending is due again; ``cfg.poll_seconds`` when omitted.
    on_result
        Called for every answer (progress bar, metrics).
    listener
        A running Storage Commitment listener; one is started for the pass when ``verify = "commitment"``
        and ``commitment_port`` is set.
    worker_id
        Who claims the rows; a new id when omitted.

    Raises
    ------
    ConfigError
        For a destination URL of none of the accepted forms.
    PersistError
        When the database cannot be reached.
    """
    start = time.perf_counter()
    dests = parse_destinations([str(d) for d in destinations])
    report = DeliveryReport()
    if not dests:
        return report
    worker_id = worker_id or _worker_id()
    pass_start = utcnow()
    timeout = connect_timeout if connect_timeout is not None else cfg.connect_timeout
    with sessions() as s:
        store.enqueue(s, [d.url for d in dests], since)
    own_listener = None
    if (listener is None and cfg.verify == "commitment" and cfg.commitment_port
            and any(d.kind == "dimse" for d in dests)):
        from xraybatch.delivery.dimse import CommitmentListener

        own_listener = listener = CommitmentListener(cfg.ae_title, cfg.commitment_address, cfg.commitment_port)
        listener.start()
    lock = threading.Lock()
    stop_dest: dict[str, threading.Event] = {d.url: threading.Event() for d in dests}
    lease = timeout + cfg.batch_size * cfg.timeout + cfg.commitment_timeout + 60

    def sender(dest: Destination) -> None:
        while not stop_dest[dest.url].is_set():
            with sessions() as s:
                items = store.claim(s, dest.url, cfg.batch_size, worker_id, lease, retry_failed=retry_failed,
                                    respect_backoff=respect_backoff, not_tried_since=pass_start)
            if not items:
                return
            try:
                batch = _send(dest, items, cfg, timeout, listener)
            except Exception as err:
                logger.exception("delivery to %s failed unexpectedly", dest, extra={"stage": "deliver"})
                with sessions() as s:
                    store.release(s, [i.delivery_id for i in items], worker_id, f"internal error: {err}")
                batch = BatchResult((), fault=f"internal error: {type(err).__name__}: {err}")
                with lock:
                    report.faults[dest.url] = batch.fault
                stop_dest[dest.url].set()
                return
            if batch.results:
                with sessions() as s:
                    store.record(s, batch.results, worker_id, backoff if backoff is not None else cfg.poll_seconds)
            with lock:
                for r in batch.results:
                    report.sent += r.state == SENT
                    report.failed += r.state == FAILED
                    report.warnings += r.warning
                    report.retried_later += r.state == PENDING
                    if r.state != PENDING:
                        report.answered.add(dest.url)
                if batch.fault:
                    report.faults[dest.url] = batch.fault
            for r in batch.results:
                if on_result is not None:
                    on_result(dest, r)
            if batch.fault or any(r.state == PENDING for r in batch.results):
                stop_dest[dest.url].set()  # the destination is down or full: come back later

    try:
        jobs = [d for d in dests for _ in range(cfg.concurrency)]
        with ThreadPoolExecutor(len(jobs), thread_name_prefix="xraybatch-deliver") as pool:
            for future in [pool.submit(sender, d) for d in jobs]:
                future.result()
    finally:
        if own_listener is not None:
            own_listener.stop()
    with sessions() as s:
        left = store.unsent(s, [d.url for d in dests])
    report.pending, report.failed_total = left.get(PENDING, 0), left.get(FAILED, 0)
    report.seconds = time.perf_counter() - start
    return report


def _send(dest: Destination, items: list[Item], cfg: DeliveryConfig, timeout: float,
          listener: CommitmentListener | None) -> BatchResult:
    if dest.kind == "dimse":
        from xraybatch.delivery.dimse import send_dimse

        return send_dimse(dest, items, cfg, timeout, listener)
    from xraybatch.delivery.stow import send_stow

    return send_stow(dest, items, cfg, timeout)


class DeliveryWorker:
    """``watch``'s background delivery: a thread with its own stop event, so processing never waits for a PACS.

    Every ``[delivery] poll_seconds`` it runs :func:`deliver_pending` (rows in backoff are skipped). While a
    destination is unreachable it waits longer each time, up to ``retry_max_seconds``, and logs the fault
    once when it starts and once when it ends, not once per file.

    Example::

        worker = DeliveryWorker(sessions, settings.delivery.destinations, settings.delivery)
        worker.start()
        ...
        worker.stop()
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        destinations: Sequence[str],
        cfg: DeliveryConfig,
        on_result: Callable[[Destination, ItemResult], None] | None = None,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        self.destinations = [d.url for d in parse_destinations(list(destinations))]
        self._on_fault = on_fault
        self._sessions = sessions
        self._cfg = cfg
        self._on_result = on_result
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker_id = _worker_id()
        self.faults: dict[str, str] = {}  # destinations in a fault episode now
        self.passes = 0
        self.last_report: DeliveryReport | None = None

    def start(self) -> None:
        """Start the thread (no-op without destinations)."""
        if not self.destinations or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="xraybatch-delivery", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a pass now (e.g. after a batch wrote new outputs)."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop and wait for it; a batch in flight finishes first (bounded by its timeouts)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        cfg = self._cfg
        delay = cfg.poll_seconds
        listener: Any = None
        if cfg.verify == "commitment" and cfg.commitment_port:
            from xraybatch.delivery.dimse import CommitmentListener

            listener = CommitmentListener(cfg.ae_title, cfg.commitment_address, cfg.commitment_port)
            listener.start()
        try:
            while not self._stop.is_set():
                try:
                    report = deliver_pending(
                        self._sessions, self.destinations, cfg, respect_backoff=True, backoff=delay,
                        on_result=self._on_result, listener=listener, worker_id=self._worker_id,
                    )
                    self.last_report = report
                    self._episodes(report.faults, report.answered)
                    delay = min(cfg.retry_max_seconds, delay * 2) if self.faults else cfg.poll_seconds
                except XrayBatchError as err:  # the results DB is unreachable: one episode, then quiet
                    self._episodes({**self.faults, "results database": str(err)}, set())
                    delay = min(cfg.retry_max_seconds, delay * 2)
                self.passes += 1
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            if listener is not None:
                listener.stop()

    def _episodes(self, faults: dict[str, str], answered: set[str]) -> None:
        """Log a fault when it starts and when the destination answers again; stay quiet in between."""
        ongoing = {d: why for d, why in self.faults.items() if d not in answered and d != "results database"}
        faults = {**ongoing, **faults}
        for dest, why in faults.items():
            if dest not in self.faults:
                if self._on_fault is not None:
                    self._on_fault(dest)
                logger.warning("delivery to %s is failing: %s; outputs wait and are retried with backoff", dest,
                               why, extra={"stage": "deliver", "destination": dest})
        for dest in list(self.faults):
            if dest not in faults:
                logger.warning("delivery to %s works again", dest, extra={"stage": "deliver", "destination": dest})
        self.faults = dict(faults)


def start_background(sessions: sessionmaker[Session], cfg: DeliveryConfig, metrics: Any = None) -> DeliveryWorker | None:
    """``watch``'s hook: a started :class:`DeliveryWorker` for ``cfg.destinations``, or ``None`` without any.

    ``metrics`` (a :class:`~xraybatch.metrics.WorkerMetrics`) counts the answers and the fault episodes.
    """
    if not cfg.destinations:
        return None
    worker = DeliveryWorker(
        sessions, cfg.destinations, cfg,
        on_result=(lambda dest, r: metrics.delivered(dest.url, r.state)) if metrics is not None else None,
        on_fault=metrics.delivery_fault if metrics is not None else None,
    )
    worker.start()
    logger.info("delivering in the background to %s", ", ".join(worker.destinations), extra={"stage": "deliver"})
    return worker
