"""The work queue of every source (``watch``, ``run-folder``), kept in the ``instances`` table.

A file taken from a drop folder, or found by ``run-folder``, becomes a ``queued`` row (:func:`enqueue`) that
names its source (``instances.source``: what happens to the file afterwards). Workers on any host take batches
of queued rows of their source (:func:`claim_batch`) and hold them under a lease. A worker that dies leaves
``processing`` rows whose lease runs out; :func:`reclaim_expired` puts them back in the queue (or fails them
after too many attempts), and :func:`release_dead_local` does so at once for dead processes on this host.

Copies of one instance: queued copies of a SOP Instance UID wait side by side; a claim takes the oldest copy
only while no other copy is ``processing``, so one copy at a time is worked on, and a copy whose first copy
ended ``rejected`` or ``failed`` is processed next. Claims take turns (a PostgreSQL advisory lock; SQLite's
write lock), so that rule holds across workers and hosts. The writers commit; the readers do not.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Result, delete, exists, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from xraybatch.db.repo import _header_columns, _insert_for
from xraybatch.db.session import guard
from xraybatch.db.tables import LIVE_STATES, WATCH_SOURCE, Instance, Worker, utcnow
from xraybatch.domain import InstanceHeader, Outcome, State, path_from_db
from xraybatch.lifetime import process_alive

logger = logging.getLogger(__name__)

CLAIM_LOCK_KEY = 0x78726163  # PostgreSQL advisory lock held by a claim ("xrac"): claims take turns


@dataclass(frozen=True)
class Claimed:
    """A queued row taken by this worker: its id, where the file was received and where it is now, its source."""

    instance_id: int
    received_path: str
    file_path: str
    attempts: int
    source: str = WATCH_SOURCE


def new_worker_id() -> str:
    """``host:pid:random``: unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def enqueue(
    session: Session,
    header: InstanceHeader,
    received_path: str,
    file_path: str,
    model_set: str,
    source: str = WATCH_SOURCE,
) -> int:
    """Insert a ``queued`` row for a file now at ``file_path``; commits.

    Every copy is queued, also of an instance already done: whether a copy is a duplicate is decided by the
    worker after it has judged the file (a damaged copy is ``rejected``, whatever the other copies did).
    """
    row = Instance(
        **_header_columns(header), path=received_path, file_path=file_path, state=State.QUEUED.value,
        attempts=0, model_set=model_set, source=source,
    )
    with guard(session, "queue the instance"):
        session.add(row)
        session.flush()
        row_id = row.id
        session.commit()
    return row_id


def claim_batch(
    session: Session,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    sources: tuple[str, ...] = (WATCH_SOURCE,),
) -> list[Claimed]:
    """Take up to ``limit`` queued rows of ``sources``, oldest first, for ``worker_id`` under a lease; commits.

    A row is taken only if it is the oldest queued copy of its SOP Instance UID (and model set) and no copy is
    ``processing``: a later copy waits for the first to end. Claims take turns: on PostgreSQL a transaction
    advisory lock (:data:`CLAIM_LOCK_KEY`) is taken first, so the ``UPDATE``, whose snapshot starts after the
    lock, sees every earlier claim; the candidate rows are also locked with ``FOR UPDATE SKIP LOCKED`` in a
    materialised CTE. (Not ``id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)``: the planner may rescan that
    subquery, and each rescan skips the rows just updated and locks the next ``n``, so one claim took the whole
    queue.) On SQLite the single ``UPDATE`` is serialised by the database lock and its ``IN`` subquery runs once.

    As the queue drains, a claim takes no more than this worker's share (:func:`fair_share`): the last batches
    are split among the workers instead of one worker taking a full batch while the others go idle.
    """
    now = utcnow()
    other = aliased(Instance)
    busy_or_earlier = exists().where(
        other.sop_instance_uid == Instance.sop_instance_uid,
        other.model_set == Instance.model_set,
        (other.state == State.PROCESSING.value) | ((other.state == State.QUEUED.value) & (other.id < Instance.id)),
    )
    candidates = (
        select(Instance.id)
        .where(Instance.state == State.QUEUED.value, Instance.source.in_(sources), ~busy_or_earlier)
        .order_by(Instance.id)
    )
    postgres = session.get_bind().dialect.name == "postgresql"
    with guard(session, "claim queued instances"):
        if postgres:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})
        candidates = candidates.limit(fair_share(session, worker_id, limit, sources))
        if postgres:
            picked = candidates.with_for_update(skip_locked=True, of=Instance).cte("picked").prefix_with("MATERIALIZED")
            chosen = Instance.id == picked.c.id
        else:
            chosen = Instance.id.in_(candidates.scalar_subquery())
        stmt = (
            update(Instance)
            .where(chosen, Instance.state == State.QUEUED.value)
            .values(
                state=State.PROCESSING.value, worker_id=worker_id, attempts=Instance.attempts + 1, started_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now,
            )
            .returning(Instance.id, Instance.path, Instance.file_path, Instance.attempts, Instance.source)
            .execution_options(synchronize_session=False)
        )
        rows = session.execute(stmt).all()
        session.commit()
    return sorted(
        (Claimed(r.id, r.path, path_from_db(r.file_path or r.path), r.attempts, r.source) for r in rows), key=lambda c: c.instance_id
    )


def fair_share(session: Session, worker_id: str, limit: int, sources: tuple[str, ...]) -> int:
    """How many rows a claim of ``worker_id`` takes: ``limit``, or fewer when the queue is nearly drained.

    The queued rows of ``sources`` are divided among this worker and the other workers that hold rows of them
    (their batch runs; they claim again when it ends), rounded up: with two workers and 8 rows left, each
    takes 4, not one worker 8 while the other waits. At least 1. A full batch per claim otherwise: the
    forward passes run batched.

    On SQLite this read does not hold the claim's lock: a race makes a claim a little larger or smaller, never
    wrong (the claim's ``UPDATE`` decides which rows it gets).
    """
    peers = session.scalar(
        select(func.count(func.distinct(Instance.worker_id))).where(
            Instance.state == State.PROCESSING.value, Instance.source.in_(sources), Instance.worker_id != worker_id,
        )
    ) or 0
    workers = peers + 1
    queued_rows = (
        select(Instance.id)
        .where(Instance.state == State.QUEUED.value, Instance.source.in_(sources))
        .limit(limit * workers)  # enough to tell whether the share is less than a full batch
        .subquery()
    )
    queued = session.scalar(select(func.count()).select_from(queued_rows)) or 0
    return max(1, min(limit, -(-queued // workers)))


def pending(session: Session, source: str) -> int:
    """Rows of ``source`` still ``queued`` or ``processing`` (by any worker); no commit."""
    live = (State.QUEUED.value, State.PROCESSING.value)
    with guard(session, "count the unfinished instances"):
        return int(session.scalar(
            select(func.count()).where(Instance.source == source, Instance.state.in_(live))
        ) or 0)


def requeue(session: Session, instance_id: int, reason: str) -> bool:
    """Put a claimed row back in the queue after a transient fault; commits (``False`` only on a conflict)."""
    with guard(session, "requeue the instance"):
        try:
            session.execute(
                update(Instance).where(Instance.id == instance_id).values(
                    state=State.QUEUED.value, worker_id=None, lease_expires_at=None, reason=reason,
                    finished_at=None, updated_at=utcnow(),
                )
            )
            session.commit()
        except IntegrityError:
            session.rollback()
            return False
    return True


def reclaim_expired(session: Session, max_attempts: int) -> tuple[int, list[Claimed]]:
    """Requeue ``processing`` rows whose lease ran out; fail those already tried ``max_attempts`` times; commits.

    Returns
    -------
    tuple
        The number of rows requeued, and the rows given up (state ``failed``) whose files need quarantining.
    """
    now = utcnow()
    expired = (Instance.state == State.PROCESSING.value) & (Instance.lease_expires_at < now)
    with guard(session, "reclaim expired leases"):
        given_up = session.execute(
            update(Instance).where(expired, Instance.attempts >= max_attempts).values(
                state=State.FAILED.value, lease_expires_at=None, finished_at=now, updated_at=now,
                reason=f"gave up after {max_attempts} attempts: the worker processing it stopped each time",
            ).returning(Instance.id, Instance.path, Instance.file_path, Instance.attempts, Instance.source)
            .execution_options(synchronize_session=False)
        ).all()
        requeued = _rowcount(session.execute(
            update(Instance).where(expired).values(
                state=State.QUEUED.value, worker_id=None, lease_expires_at=None, updated_at=now,
            ).execution_options(synchronize_session=False)
        ))
        session.commit()
    return requeued, [Claimed(r.id, r.path, path_from_db(r.file_path or r.path), r.attempts, r.source) for r in given_up]


def depth(session: Session) -> int:
    """Number of queued rows; no commit."""
    with guard(session, "count the queue"):
        return int(session.scalar(select(func.count()).where(Instance.state == State.QUEUED.value)) or 0)


def release_worker(session: Session, worker_id: str) -> int:
    """Return the ``processing`` rows of ``worker_id`` to the queue; commits."""
    with guard(session, "release claimed instances"):
        count = _rowcount(session.execute(
            update(Instance)
            .where(Instance.state == State.PROCESSING.value, Instance.worker_id == worker_id)
            .values(state=State.QUEUED.value, worker_id=None, lease_expires_at=None, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        ))
        session.commit()
    return count


def _rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE (a ``CursorResult``'s ``rowcount``)."""
    return int(getattr(result, "rowcount", 0) or 0)


def release_dead_local(session: Session, worker_id: str) -> int:
    """Return to the queue the ``processing`` rows of other workers on this host whose process is gone; commits.

    ``worker_id`` is the caller's own (``host:pid:random``). A restart on the same host need not wait for the
    lease to expire; other hosts' rows are left to the lease. A worker with the caller's own pid but another
    id is dead too: its pid was reused (a container's process restarted with the same pid).
    """
    host = worker_id.split(":")[0]
    with guard(session, "find rows of stopped workers"):
        owners = set(session.scalars(
            select(Instance.worker_id).distinct().where(
                Instance.state == State.PROCESSING.value, Instance.worker_id.startswith(host + ":", autoescape=True)
            )
        ))
    dead = [owner for owner in owners if owner is not None and _dead_local(owner, worker_id)]
    return sum([release_worker(session, owner) for owner in dead])


def _dead_local(owner: str | None, worker_id: str) -> bool:
    """Whether ``owner`` is another worker on the caller's host whose process is gone."""
    if not owner or owner == worker_id or owner.split(":")[0] != worker_id.split(":")[0]:
        return False
    try:
        pid = int(owner.split(":")[1])
    except (IndexError, ValueError):
        return False  # not written by a watch worker
    return pid == os.getpid() or not process_alive(pid)


def return_to_incoming(
    session: Session,
    state: str,
    under: Path,
    incoming: Path,
    *,
    copy: bool,
    exclude_model_set: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """Move (or copy) the files of rows in ``state`` kept under ``under`` back into ``incoming``; commits.

    Used by ``xraybatch retry`` (quarantined files, moved; a retried ``not_applicable`` row is deleted so that
    its UID is free again) and ``reprocess`` (archived files, copied, only
    those processed with another model set). Returns the number of files placed in ``incoming``.
    """
    import shutil

    stmt = select(Instance.id, Instance.file_path).where(
        Instance.state == state, Instance.file_path.startswith(_under(str(under)), autoescape=True)
    )
    if exclude_model_set is not None:
        stmt = stmt.where(Instance.model_set != exclude_model_set)
    if since is not None:
        stmt = stmt.where(Instance.finished_at >= since)
    if until is not None:
        stmt = stmt.where(Instance.finished_at < until)
    with guard(session, "list files to return"):
        rows = session.execute(stmt).all()
    incoming.mkdir(parents=True, exist_ok=True)
    count = 0
    for row in rows:
        src = Path(path_from_db(row.file_path))
        if not src.is_file():
            continue
        dest = incoming / f"{'reprocess' if copy else 'retry'}-{row.id}-{src.name}"
        tmp = incoming / f".{dest.name}.part"  # ignored by the watcher until renamed
        if copy:
            shutil.copyfile(src, tmp)
        else:
            shutil.move(src, tmp)
            src.with_name(src.name + ".json").unlink(missing_ok=True)
            if state in LIVE_STATES:  # a not_applicable row holds the UID: drop it, or the retry is a duplicate
                with guard(session, "forget the earlier verdict"):
                    session.execute(delete(Instance).where(Instance.id == row.id))
                    session.commit()
            else:
                set_file_path(session, row.id, None)
        os.replace(tmp, dest)
        count += 1
    return count


def set_file_path(session: Session, instance_id: int, file_path: str | None) -> None:
    """Record where an instance's file is now (``None``: deleted by policy); commits."""
    with guard(session, "record the file location"):
        session.execute(update(Instance).where(Instance.id == instance_id).values(file_path=file_path))
        session.commit()


def known_files(session: Session, folder: str) -> set[str]:
    """``file_path`` of every row, in any state, whose file lies under ``folder``; no commit.

    A file in ``inflight/`` that no row names is an orphan: its worker stopped between taking it and
    recording it.
    """
    stmt = select(Instance.file_path).where(Instance.file_path.startswith(_under(folder), autoescape=True))
    with guard(session, "list the files in flight"):
        return {path_from_db(p) for p in session.scalars(stmt) if p is not None}


def finished_under(
    session: Session, folder: str, worker_id: str, finished_before: datetime
) -> list[tuple[int, str, str]]:
    """(id, state, file_path) of final rows whose file still lies under ``folder``; no commit.

    Only rows whose file move is no longer under way: those of ``worker_id`` (the caller, between its
    batches), of stopped workers on this host, and any finished before ``finished_before``.
    """
    live = (State.QUEUED.value, State.PROCESSING.value)
    stmt = select(Instance.id, Instance.state, Instance.file_path, Instance.worker_id, Instance.finished_at).where(
        Instance.state.not_in(live), Instance.file_path.startswith(_under(folder), autoescape=True)
    ).order_by(Instance.id)
    with guard(session, "list unfinished file moves"):
        rows = session.execute(stmt).all()
    return [
        (r.id, r.state, path_from_db(r.file_path)) for r in rows
        if r.worker_id in (None, worker_id) or r.finished_at is None or r.finished_at < finished_before
        or _dead_local(r.worker_id, worker_id)
    ]


def _under(folder: str) -> str:
    return folder.rstrip("/") + "/"


def heartbeat(
    session: Session,
    worker_id: str,
    incoming: str,
    model_set: str,
    *,
    lease_seconds: float | None = None,
    stopped: bool = False,
) -> None:
    """Insert or refresh this worker's row in ``workers`` and extend its leases; commits.

    Parameters
    ----------
    lease_seconds
        When given, the lease of every ``processing`` row of ``worker_id`` is renewed to run out that long from
        now: a worker that is alive keeps its claims however long a batch takes.
    stopped
        Marks a clean exit.
    """
    now = utcnow()
    host, pid = worker_id.split(":")[0], os.getpid()
    values = {"host": host, "pid": pid, "incoming": incoming, "model_set": model_set, "last_seen": now,
              "stopped_at": now if stopped else None}
    insert = _insert_for(session)
    with guard(session, "record the heartbeat"):
        session.execute(
            insert(Worker).values(worker_id=worker_id, started_at=now, **values)
            .on_conflict_do_update(index_elements=["worker_id"], set_=values)
        )
        if lease_seconds is not None:
            session.execute(
                update(Instance)
                .where(Instance.state == State.PROCESSING.value, Instance.worker_id == worker_id)
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
        session.commit()


@dataclass(frozen=True)
class QueueStatus:
    """What ``xraybatch status`` shows."""

    counts: dict[str, int]
    oldest_queued: datetime | None
    workers_alive: list[tuple[str, datetime]]  # (worker_id, last_seen)


def status(session: Session, alive_within_seconds: float) -> QueueStatus:
    """Counts per state, the oldest queued row and the workers seen recently; no commit."""
    from xraybatch.db.repo import counts_by_state

    since = utcnow() - timedelta(seconds=alive_within_seconds)
    with guard(session, "read the status"):
        oldest = session.scalar(select(func.min(Instance.received_at)).where(Instance.state == State.QUEUED.value))
        workers = session.execute(
            select(Worker.worker_id, Worker.last_seen)
            .where(Worker.last_seen >= since, Worker.stopped_at.is_(None))
            .order_by(Worker.worker_id)
        ).all()
    return QueueStatus(counts_by_state(session), oldest, [(w.worker_id, w.last_seen) for w in workers])


def rows_of_source(session: Session, source: str) -> dict[str, tuple[int, str]]:
    """``path -> (id, state)`` of every row of ``source`` (a run-folder run over one folder); no commit."""
    with guard(session, "list the folder's instances"):
        rows = session.execute(select(Instance.path, Instance.id, Instance.state).where(Instance.source == source))
        return {r.path: (r.id, r.state) for r in rows}


def forget(session: Session, instance_id: int) -> None:
    """Delete a row (a ``failed`` run-folder row about to be judged again; its predictions go with it); commits."""
    with guard(session, "forget the earlier verdict"):
        session.execute(delete(Instance).where(Instance.id == instance_id))
        session.commit()


def finished_counts(session: Session, source: str, since: datetime) -> dict[str, int]:
    """Final state -> rows of ``source`` that ended at or after ``since``; no commit."""
    live = (State.QUEUED.value, State.PROCESSING.value)
    with guard(session, "count the finished instances"):
        rows = session.execute(
            select(Instance.state, func.count()).where(
                Instance.source == source, Instance.state.not_in(live), Instance.finished_at >= since,
            ).group_by(Instance.state)
        )
        return {state: n for state, n in rows}


def first_claim(session: Session, source: str, since: datetime) -> datetime | None:
    """When a worker first claimed a row of ``source`` at or after ``since`` (UTC), or None; no commit."""
    with guard(session, "read the first claim"):
        first = session.scalar(
            select(func.min(Instance.started_at)).where(Instance.source == source, Instance.started_at >= since)
        )
    if first is not None and first.tzinfo is None:  # SQLite returns naive datetimes; they are UTC
        first = first.replace(tzinfo=UTC)
    return first


def finished_since(
    session: Session, source: str, since: datetime, seen: set[int]
) -> list[tuple[int, Outcome]]:
    """Rows of ``source`` that ended at or after ``since`` and are not in ``seen``, as (id, Outcome); no commit."""
    live = (State.QUEUED.value, State.PROCESSING.value)
    with guard(session, "read the finished instances"):
        rows = session.execute(
            select(Instance.id, Instance.path, Instance.state, Instance.reason).where(
                Instance.source == source, Instance.state.not_in(live), Instance.finished_at >= since,
            ).order_by(Instance.id)
        ).all()
    return [(r.id, Outcome(Path(r.path), State(r.state), r.reason)) for r in rows if r.id not in seen]
