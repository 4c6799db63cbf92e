"""Every query the application runs on the results database.

Each function takes a :class:`~sqlalchemy.orm.Session` and keeps its transaction short. The writers
(:func:`register_models`, :func:`claim`, :func:`finish`, :func:`record_unclaimed`) commit themselves, or roll
back and raise; the readers (:func:`live_instance`, :func:`counts_by_state`) do not commit, so use a short-lived
session for them (``with factory() as session: ...``).

Idempotency rests on two rules. Only one copy of a SOP Instance UID is ``processing`` at a time: claims take
turns (:func:`claim` here, :func:`xraybatch.db.queue.claim_batch` for the queue) and check that no other copy is
processing or ended ``done``/``not_applicable``. And the partial unique index ``uq_instances_live_sop_model``
refuses a second ``done``/``not_applicable`` row for the same UID and model set, also across workers and hosts:
:func:`finish_claimed` stores a copy that loses that race as a ``duplicate``.
A database that cannot be reached raises :class:`~xraybatch.errors.PersistError`, a transient condition:
retry later, never mark the input file rejected for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from xraybatch.db.session import guard
from xraybatch.db.tables import (
    LIVE_STATES,
    WATCH_SOURCE,
    Instance,
    ModelVersion,
    OutputRow,
    PredictionRow,
    utcnow,
)
from xraybatch.domain import InstanceHeader, Outcome, State, path_text
from xraybatch.errors import PersistError
from xraybatch.models.registry import BundleSpec

logger = logging.getLogger(__name__)


def register_models(session: Session, specs: Sequence[BundleSpec]) -> None:
    """Record the model bundles in force in ``model_versions`` (insert, or refresh the row); commits.

    A row is keyed by (name, version, sha256): retrained weights under the same version get their own row.

    Raises
    ------
    PersistError
        When the database cannot be reached.
    """
    insert = _insert_for(session)
    with guard(session, "register the model versions"):
        for spec in specs:
            values = {
                "name": spec.name,
                "version": spec.version,
                "task": spec.task,
                "architecture": spec.architecture,
                "sha256": spec.sha256,
                "targets": list(spec.targets),
                "thresholds": dict(zip(spec.targets, spec.thresholds)),
                "path": str(spec.path),
                "registered_at": utcnow(),
            }
            refreshed = {k: values[k] for k in ("task", "architecture", "targets", "thresholds", "path")}
            session.execute(
                insert(ModelVersion)
                .values(**values)
                .on_conflict_do_update(index_elements=["name", "version", "sha256"], set_=refreshed)
            )
        session.commit()


def claim(
    session: Session,
    header: InstanceHeader,
    worker_id: str,
    model_set: str,
    *,
    received_at: datetime | None = None,
) -> int | None:
    """Insert a ``processing`` row for ``header`` unless its SOP Instance UID already has a live row; commits.

    Parameters
    ----------
    session
        A session with no pending changes (it is rolled back when the claim loses).
    header
        The instance to claim; its ``sop_instance_uid`` is the idempotency key.
    worker_id
        Who processes it (host and process id), stored for the operators.
    model_set
        ``"name@version,..."`` of the models in force.
    received_at
        When the file was seen; now when omitted.

    Returns
    -------
    int | None
        The new row's id, or ``None`` when another copy of the UID is processing or ended done or not
        applicable: see :func:`live_instance` and :func:`record_unclaimed`.

    Raises
    ------
    PersistError
        When the database cannot be reached.
    """
    from xraybatch.db.queue import CLAIM_LOCK_KEY

    now = utcnow()
    row = Instance(
        **_header_columns(header),
        path=path_text(header.path),
        state=State.PROCESSING.value,
        attempts=1,
        worker_id=worker_id,
        model_set=model_set,
        received_at=received_at or now,
        started_at=now,
    )
    with guard(session, "claim the instance"):
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})
        else:  # take SQLite's write lock before reading, so the check and the insert are one step
            session.execute(update(Instance).where(Instance.id == -1).values(state=Instance.state))
        if live_instance(session, header.sop_instance_uid, model_set) is not None:
            session.rollback()
            logger.info(
                "already claimed", extra={"sop_instance_uid": header.sop_instance_uid, "stage": "persist"}
            )
            return None
        session.add(row)
        session.flush()
        row_id = row.id
        session.commit()
    return row_id


_WORKED_ON = (State.PROCESSING.value, *LIVE_STATES)


def live_instance(session: Session, sop_instance_uid: str, model_set: str) -> Instance | None:
    """The row that holds ``sop_instance_uid`` (done or not applicable) or works on it (processing), if any.

    Does not commit. Use it to explain a duplicate, e.g. ``f"already {row.state} as {row.path}"``.
    """
    stmt = select(Instance).where(
        Instance.sop_instance_uid == sop_instance_uid,
        Instance.model_set == model_set,
        Instance.state.in_(_WORKED_ON),
    ).order_by(Instance.state.in_(LIVE_STATES).desc(), Instance.id).limit(1)
    with guard(session, "read the instance"):
        return session.scalars(stmt).first()


def holder(session: Session, sop_instance_uid: str, model_set: str, other_than: int) -> Instance | None:
    """The row other than ``other_than`` that ended ``done`` or ``not_applicable`` for the UID; no commit."""
    stmt = select(Instance).where(
        Instance.sop_instance_uid == sop_instance_uid, Instance.model_set == model_set,
        Instance.state.in_(LIVE_STATES), Instance.id != other_than,
    ).limit(1)
    with guard(session, "read the instance"):
        return session.scalars(stmt).first()


def duplicate_of(outcome: Outcome, first: Instance | None) -> Outcome:
    """``outcome`` turned into a ``duplicate`` of the copy ``first`` (which ended done or not applicable)."""
    where = f" (instance {first.id}, state {first.state})" if first is not None else ""
    return Outcome(
        outcome.path, State.DUPLICATE, f"SOP Instance UID already received{where}", outcome.header,
        timings=outcome.timings,
    )


def finish_claimed(session: Session, instance_id: int, outcome: Outcome, worker_id: str) -> Outcome | None:
    """:func:`finish` a claimed row; the Outcome stored, or ``None`` when ``worker_id`` lost its claim.

    A ``done`` or ``not_applicable`` outcome whose SOP Instance UID another copy ended so meanwhile (a race the
    unique index settles) is stored as a ``duplicate`` of that copy, without predictions or outputs.
    """
    try:
        return outcome if finish(session, instance_id, outcome, worker_id=worker_id) else None
    except IntegrityError:
        session.rollback()
    header = outcome.header
    first = holder(session, header.sop_instance_uid, outcome_model_set(session, instance_id), instance_id) \
        if header is not None else None
    duplicate = duplicate_of(outcome, first)
    return duplicate if finish(session, instance_id, duplicate, worker_id=worker_id) else None


def outcome_model_set(session: Session, instance_id: int) -> str:
    """The model set of row ``instance_id``; no commit."""
    with guard(session, "read the instance"):
        return str(session.scalar(select(Instance.model_set).where(Instance.id == instance_id)) or "")


def finish(session: Session, instance_id: int, outcome: Outcome, *, worker_id: str | None = None) -> bool:
    """Store the final ``outcome`` of a claimed instance, its predictions and outputs; one transaction, commits.

    The row gets state, reason, notes, timings and ``finished_at``; its predictions are replaced by those of
    ``outcome``, and outputs are upserted by SOP Instance UID, so finishing twice never duplicates a row.

    Parameters
    ----------
    worker_id
        When given, the row must still be ``processing`` under this worker: a worker whose lease ran out (a
        long pause, a network split) and whose row another worker took since must not overwrite that
        worker's result. The check and the update are one ``UPDATE ... WHERE``, atomic on both databases.

    Returns
    -------
    bool
        ``False`` when ``worker_id`` no longer holds the row: nothing was stored.

    Raises
    ------
    ValueError
        When ``outcome.state`` is not final, or no row has ``instance_id``.
    PersistError
        When the database cannot be reached.
    """
    if not outcome.state.is_final:
        raise ValueError(f"outcome.state must be final, got {outcome.state!r}")
    insert = _insert_for(session)
    now = utcnow()
    held = Instance.id == instance_id
    if worker_id is not None:
        held = held & (Instance.state == State.PROCESSING.value) & (Instance.worker_id == worker_id)
    with guard(session, "store the results"):
        stored = session.execute(
            update(Instance).where(held).values(
                state=outcome.state.value, reason=outcome.reason, notes=list(outcome.notes),
                timings=dict(outcome.timings), finished_at=now, lease_expires_at=None, updated_at=now,
            ).execution_options(synchronize_session=False)
        )
        if not getattr(stored, "rowcount", 0):
            session.rollback()
            if session.get(Instance, instance_id) is None:
                raise ValueError(f"no instances row with id {instance_id}")
            logger.warning(
                "instance %d: its lease was lost to another worker; this result is dropped", instance_id,
                extra={"stage": "persist", "worker_id": worker_id},
            )
            return False
        session.execute(delete(PredictionRow).where(PredictionRow.instance_id == instance_id))
        # One statement for the predictions and one for the outputs, on the tables (Core), instead of an ORM
        # object or a statement per row: about half the CPU time of storing the result of an image.
        predictions = [
            {
                "instance_id": instance_id,
                "model_name": p.model_name,
                "model_version": p.model_version,
                "target": target,
                "probability": float(prob),
                "threshold": float(threshold),
                "positive": bool(positive),
                "created_at": now,
            }
            for p in outcome.predictions
            for target, prob, threshold, positive in zip(p.targets, p.probabilities, p.thresholds, p.positive)
        ]
        if predictions:
            session.execute(insert(PredictionRow.__table__), predictions)
        if outcome.outputs:
            outputs = insert(OutputRow.__table__).values([
                {
                    "instance_id": instance_id,
                    "kind": out.kind,
                    "sop_instance_uid": out.sop_instance_uid,
                    "series_instance_uid": out.series_instance_uid,
                    "path": str(out.path),
                    "sent_state": "not_sent",
                    "created_at": now,
                }
                for out in outcome.outputs
            ])
            replaced = ("instance_id", "kind", "series_instance_uid", "path")  # a re-processed output keeps its row
            session.execute(outputs.on_conflict_do_update(
                index_elements=["sop_instance_uid"], set_={c: outputs.excluded[c] for c in replaced},
            ))
        session.commit()
    return True


def record_unclaimed(
    session: Session,
    outcome: Outcome,
    model_set: str,
    *,
    received_at: datetime | None = None,
    file_path: str | None = None,
    source: str = WATCH_SOURCE,
) -> int:
    """Insert a row for an outcome that never claimed: a duplicate, or a file rejected or failed before; commits.

    ``outcome.header`` supplies the UIDs when the file was readable; ``received_at`` defaults to now;
    ``file_path`` is where the file lies now (``xraybatch watch``), recorded in the same insert.

    Returns
    -------
    int
        The new row's id.

    Raises
    ------
    ValueError
        When ``outcome.state`` would hold the UID (queued, processing, done, not applicable): use
        :func:`claim` then :func:`finish` for those.
    PersistError
        When the database cannot be reached.
    """
    if outcome.state in LIVE_STATES or not outcome.state.is_final:
        raise ValueError(
            f"outcome.state {outcome.state!r} needs claim() then finish(), not record_unclaimed()"
        )
    now = utcnow()
    row = Instance(
        **(_header_columns(outcome.header) if outcome.header else {}),
        path=path_text(outcome.path),
        state=outcome.state.value,
        reason=outcome.reason,
        notes=list(outcome.notes),
        timings=dict(outcome.timings),
        attempts=0,
        model_set=model_set,
        received_at=received_at or now,
        finished_at=now,
        file_path=file_path,
        source=source,
    )
    with guard(session, "record the outcome"):
        session.add(row)
        session.flush()
        row_id = row.id
        session.commit()
    return row_id


def counts_by_state(session: Session) -> dict[str, int]:
    """Number of ``instances`` rows per state, every :class:`~xraybatch.domain.State` included; no commit."""
    counts = {str(s): 0 for s in State}
    with guard(session, "count the instances"):
        rows = session.execute(select(Instance.state, func.count()).group_by(Instance.state))
        counts.update({state: n for state, n in rows})
    return counts


def _header_columns(header: InstanceHeader) -> dict[str, Any]:
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "study_instance_uid": header.study_instance_uid,
        "series_instance_uid": header.series_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "accession_number": header.accession_number,
        "patient_id": header.patient_id,
        "modality": header.modality,
        "body_part": header.body_part,
        "view_position": header.view_position,
    }


def _insert_for(session: Session) -> Any:
    """The dialect's ``insert`` (with ``on_conflict_do_update``) for the session's database."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise PersistError(f"unsupported database {dialect!r}; use SQLite or PostgreSQL")
