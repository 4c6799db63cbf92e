"""The results database schema (SQLAlchemy 2.0 declarative); ``xraybatch/migrations/versions`` must match it.

Five tables: ``instances`` (one row per input file seen), ``predictions`` (one row per instance, model and
target), ``outputs`` (DICOM objects written back), ``model_versions`` (the bundles that produced them) and
``workers`` (the ``xraybatch watch`` processes and their heartbeats).
``docs/results-db.md`` documents the columns and the queries users run.

Idempotency: the partial unique index ``uq_instances_live_sop_model`` allows at most one row per SOP Instance
UID and model set that ended ``done`` or ``not_applicable`` (:data:`LIVE_STATES`); ``queued``, ``duplicate``,
``rejected`` and ``failed`` rows may repeat, so a second copy waits while the first is under way, a copy whose
first copy was rejected or failed is processed, and new models can process an instance again.

Datetimes are timezone-aware UTC in Python. SQLite stores them as text ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC,
PostgreSQL as ``timestamptz``. Strings have no length limit (``VARCHAR``), so an out-of-spec DICOM value never
fails an insert.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from xraybatch.domain import State

logger = logging.getLogger(__name__)

#: States that hold the SOP Instance UID: a later copy of an instance that ended so is a duplicate. Queued copies
#: do not hold it (they wait for the first one to end); that one copy at a time is ``processing`` is the claim's
#: job (:func:`xraybatch.db.queue.claim_batch`).
LIVE_STATES: tuple[str, ...] = tuple(s.value for s in (State.DONE, State.NOT_APPLICABLE))

#: ``instances.source`` of a file taken from a drop folder; a ``run-folder`` row has ``run-folder:<folder>``.
WATCH_SOURCE = "watch"
FOLDER_SOURCE_PREFIX = "run-folder:"
LIVE_WHERE = "state IN (" + ", ".join(f"'{s}'" for s in LIVE_STATES) + ")"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always returns aware UTC datetimes (naive input is taken as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; constraint names follow :data:`NAMING_CONVENTION` so migrations can name them."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class Instance(Base):
    """One input file seen, whatever became of it."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # the path the file was received at
    sop_instance_uid: Mapped[str | None] = mapped_column(index=True)  # None: unreadable file
    study_instance_uid: Mapped[str | None] = mapped_column(index=True)
    series_instance_uid: Mapped[str | None]
    sop_class_uid: Mapped[str | None]
    accession_number: Mapped[str | None] = mapped_column(index=True)
    patient_id: Mapped[str | None]  # stored here only: never logged or exported
    modality: Mapped[str | None]
    body_part: Mapped[str | None]
    view_position: Mapped[str | None]
    state: Mapped[str] = mapped_column(index=True)  # a domain.State value
    reason: Mapped[str] = mapped_column(Text, default="")  # human readable: why this state
    notes: Mapped[list[Any]] = mapped_column(default=list)  # data-quality facts
    attempts: Mapped[int] = mapped_column(default=0)
    worker_id: Mapped[str | None]
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)  # processing row reclaimable after
    file_path: Mapped[str | None] = mapped_column(Text)  # where the file is now (watch: in-flight/archive/quarantine)
    source: Mapped[str] = mapped_column(Text, default=WATCH_SOURCE, server_default=WATCH_SOURCE)  # file policy
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # stage -> seconds
    model_set: Mapped[str] = mapped_column(Text, default="")  # "name@version,..." of the models in force
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None] = mapped_column(index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        Index(
            "uq_instances_live_sop_model",
            "sop_instance_uid",
            "model_set",
            unique=True,
            sqlite_where=text(LIVE_WHERE),
            postgresql_where=text(LIVE_WHERE),
        ),
        Index("ix_instances_source_state", "source", "state"),
    )


class PredictionRow(Base):
    """One model's probability for one target of one instance."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str]
    model_version: Mapped[str]
    target: Mapped[str]
    probability: Mapped[float]
    threshold: Mapped[float]
    positive: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    __table_args__ = (
        Index("ix_predictions_target_positive", "target", "positive"),
        Index("ix_predictions_model_name_model_version", "model_name", "model_version"),
    )


class OutputRow(Base):
    """A DICOM object (SR or SC) written to the outbox for an instance."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str]  # "sr" or "sc"
    sop_instance_uid: Mapped[str] = mapped_column(unique=True)
    series_instance_uid: Mapped[str]
    path: Mapped[str] = mapped_column(Text)
    sent_state: Mapped[str] = mapped_column(default="not_sent")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """A model bundle that was loaded to produce results."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    version: Mapped[str]
    task: Mapped[str]
    architecture: Mapped[str]
    sha256: Mapped[str]
    targets: Mapped[list[Any]]
    thresholds: Mapped[dict[str, Any]]  # target -> operating threshold
    path: Mapped[str] = mapped_column(Text)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("name", "version", "sha256"),)


class Worker(Base):
    """A worker process (``xraybatch watch`` or ``run-folder``) and its heartbeat."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(primary_key=True)  # host:pid:random
    host: Mapped[str]
    pid: Mapped[int]
    incoming: Mapped[str] = mapped_column(Text)  # the drop folder it watches, or the folder run-folder reads
    model_set: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None]


class Delivery(Base):
    """One output's delivery to one destination (``xraybatch deliver``, ``--send``); see docs/delivery.md.

    ``state``: ``pending`` (to send, or to send again after a transient fault), ``sent`` (the PACS answered
    success; never sent again) or ``failed`` (the PACS refused it; sent again only by ``deliver --retry-failed``).
    """

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(Text)  # the destination URL, e.g. dicom://ORTHANC@pacs:4242
    state: Mapped[str] = mapped_column(default="pending")  # pending, sent, failed
    status: Mapped[int | None]  # last DIMSE status (e.g. 0 = Success, 0xA700) or HTTP status; None: no answer
    reason: Mapped[str] = mapped_column(Text, default="")  # the PACS's failure reason, or why it is still pending
    verified: Mapped[str] = mapped_column(default="")  # "", "committed", "not_committed", "found", "not_found"
    attempts: Mapped[int] = mapped_column(default=0)
    claimed_by: Mapped[str | None]  # the process sending it now
    claim_expires_at: Mapped[datetime | None]  # an abandoned claim is free again after this
    next_attempt_at: Mapped[datetime | None]  # a transient fault: not before this (watch's backoff)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("output_id", "destination"),
        Index("ix_deliveries_destination_state", "destination", "state"),
    )
