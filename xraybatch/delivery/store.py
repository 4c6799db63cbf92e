"""The ``deliveries`` table: one row per output and destination; claims, results and counts.

A row is claimed (``claimed_by``, ``claim_expires_at``) by one conditional UPDATE before its object is sent,
so several processes delivering from one database never send the same row at once; a claim whose process
died runs out and the row is sent again, with the same SOP Instance UID (a PACS keeps one copy of a UID).
A ``sent`` row is never claimed again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, exists, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from xraybatch.db.session import guard
from xraybatch.db.tables import Delivery, Instance, OutputRow, utcnow
from xraybatch.delivery.common import FAILED, PENDING, SENT, Item, ItemResult

logger = logging.getLogger(__name__)


def enqueue(session: Session, destinations: Iterable[str], since: datetime | None = None) -> int:
    """Add a ``pending`` row for every output (created at or after ``since``) that has none for a destination.

    Returns the number of rows added; commits. A concurrent enqueue of the same rows by another process is
    harmless (the unique constraint keeps one, this call retries).

    Raises
    ------
    PersistError
        When the database cannot be reached.
    """
    added = 0
    now = utcnow()
    with guard(session, "queue the deliveries"):
        for destination in destinations:
            for _ in range(3):
                missing = ~exists().where(
                    and_(Delivery.output_id == OutputRow.id, Delivery.destination == destination)
                )
                source = select(
                    OutputRow.id, literal(destination), literal(PENDING), literal(""), literal(""), literal(0),
                    literal(now, Delivery.created_at.type),
                ).where(missing)
                if since is not None:
                    source = source.where(OutputRow.created_at >= since)
                stmt = insert(Delivery).from_select(
                    ["output_id", "destination", "state", "reason", "verified", "attempts", "created_at"], source,
                )
                try:
                    result = session.execute(stmt)
                    session.commit()
                except IntegrityError:
                    session.rollback()
                    continue
                added += max(result.rowcount or 0, 0)  # type: ignore[attr-defined]
                break
    return added


def claim(
    session: Session,
    destination: str,
    limit: int,
    worker_id: str,
    lease_seconds: float,
    *,
    retry_failed: bool = False,
    respect_backoff: bool = False,
    not_tried_since: datetime | None = None,
) -> list[Item]:
    """Claim up to ``limit`` rows of ``destination`` to send now (pending, and failed with ``retry_failed``); commits.

    ``respect_backoff`` skips rows whose ``next_attempt_at`` lies in the future (the background delivery of
    ``watch``); ``deliver`` and ``run-folder`` try them at once. ``not_tried_since`` skips rows attempted at
    or after that time, so one pass tries each row at most once.
    """
    now = utcnow()
    states = [PENDING, FAILED] if retry_failed else [PENDING]
    free = [
        Delivery.destination == destination,
        Delivery.state.in_(states),
        or_(Delivery.claim_expires_at.is_(None), Delivery.claim_expires_at < now),
    ]
    if respect_backoff:
        free.append(or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now))
    if not_tried_since is not None:
        free.append(or_(Delivery.last_attempt_at.is_(None), Delivery.last_attempt_at < not_tried_since))
    with guard(session, "claim deliveries"):
        ids = list(session.scalars(select(Delivery.id).where(*free).order_by(Delivery.id).limit(limit)))
        if not ids:
            session.rollback()
            return []
        won = list(session.scalars(
            update(Delivery)
            .where(Delivery.id.in_(ids), *free)
            .values(claimed_by=worker_id, claim_expires_at=now + timedelta(seconds=lease_seconds))
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        ))
        session.commit()
        if not won:
            return []
        rows = session.execute(
            select(Delivery.id, OutputRow.sop_instance_uid, Instance.study_instance_uid, OutputRow.path)
            .join(OutputRow, OutputRow.id == Delivery.output_id)
            .join(Instance, Instance.id == OutputRow.instance_id)
            .where(Delivery.id.in_(won))
            .order_by(Delivery.id)
        ).all()
        session.rollback()
    return [Item(r[0], r[1], r[2] or "", Path(r[3])) for r in rows]


def record(
    session: Session,
    results: Sequence[ItemResult],
    worker_id: str,
    backoff: float,
) -> None:
    """Store the results of one batch on the rows ``worker_id`` claimed; commits.

    ``pending`` results get ``next_attempt_at`` = now + ``backoff`` seconds. A row already ``sent`` is left
    alone. ``outputs.sent_state`` becomes ``sent`` once every destination has the output, ``failed`` when one
    refused it, ``pending`` otherwise.
    """
    now = utcnow()
    with guard(session, "record the deliveries"):
        for r in results:
            values: dict[str, object] = {
                "state": r.state, "status": r.status, "reason": r.reason, "attempts": Delivery.attempts + 1,
                "last_attempt_at": now, "claimed_by": None, "claim_expires_at": None,
                "next_attempt_at": now + timedelta(seconds=backoff) if r.state == PENDING else None,
            }
            if r.verified:
                values["verified"] = r.verified
            if r.state == SENT:
                values["sent_at"] = now
            session.execute(
                update(Delivery)
                .where(Delivery.id == r.delivery_id, Delivery.claimed_by == worker_id, Delivery.state != SENT)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        output_ids = select(Delivery.output_id).where(Delivery.id.in_([r.delivery_id for r in results]))
        for output_id, states in _states_by_output(session, output_ids).items():
            summary = SENT if states == {SENT} else FAILED if FAILED in states else PENDING
            session.execute(
                update(OutputRow).where(OutputRow.id == output_id).values(sent_state=summary)
                .execution_options(synchronize_session=False)
            )
        session.commit()


def release(session: Session, delivery_ids: Sequence[int], worker_id: str, reason: str) -> None:
    """Give claimed rows back unsent (an unexpected error while sending them); commits."""
    with guard(session, "release deliveries"):
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(list(delivery_ids)), Delivery.claimed_by == worker_id)
            .values(claimed_by=None, claim_expires_at=None, reason=reason)
            .execution_options(synchronize_session=False)
        )
        session.commit()


def _states_by_output(session: Session, output_ids: object) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for output_id, state in session.execute(
        select(Delivery.output_id, Delivery.state).where(Delivery.output_id.in_(output_ids))  # type: ignore[arg-type]
    ):
        out.setdefault(output_id, set()).add(state)
    return out


def counts(session: Session) -> dict[str, dict[str, int]]:
    """Rows per destination and state, e.g. ``{"dicom://PACS@h:104": {"sent": 10, "pending": 2}}``; no commit."""
    out: dict[str, dict[str, int]] = {}
    with guard(session, "count the deliveries"):
        for destination, state, n in session.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)
        ):
            out.setdefault(destination, {})[state] = n
    return out


def unsent(session: Session, destinations: Iterable[str]) -> dict[str, int]:
    """``pending`` and ``failed`` row counts over ``destinations``; no commit."""
    names = list(destinations)
    with guard(session, "count the deliveries"):
        rows = session.execute(
            select(Delivery.state, func.count())
            .where(Delivery.destination.in_(names), Delivery.state != SENT)
            .group_by(Delivery.state)
        ).all()
    return {state: n for state, n in rows}
