"""Export results as CSV or JSON (``xraybatch results``), streamed from the database.

Two row kinds, whose column names tools outside xraybatch depend on (keep them):

``predictions``: one row per instance, model and target
    :data:`PREDICTION_COLUMNS`; ``positive`` is a boolean (``true``/``false`` in CSV too).
``instances``: one row per input file seen
    :data:`INSTANCE_COLUMNS`.
``outputs``: one row per output (SR, SC) and destination
    :data:`OUTPUT_COLUMNS`; ``sent_state`` is ``pending``, ``sent`` or ``failed`` (``not_sent`` and an empty
    ``destination`` for an output no destination was configured for), ``status`` the last DIMSE status or
    HTTP status, ``reason`` the PACS's failure reason.

Datetimes are ISO 8601 strings in UTC. ``patient_id`` is never exported. CSV cells that a spreadsheet would
run as a formula get a leading ``'`` (:func:`neutralise_formula`).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TextIO

from sqlalchemy import ColumnElement, Select, and_, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from xraybatch.db.session import guard
from xraybatch.db.tables import Delivery, Instance, OutputRow, PredictionRow

logger = logging.getLogger(__name__)

What = Literal["predictions", "instances", "outputs"]
Format = Literal["csv", "json"]

PREDICTION_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "sop_instance_uid": Instance.sop_instance_uid,
    "study_instance_uid": Instance.study_instance_uid,
    "series_instance_uid": Instance.series_instance_uid,
    "accession_number": Instance.accession_number,
    "model": PredictionRow.model_name,
    "model_version": PredictionRow.model_version,
    "target": PredictionRow.target,
    "probability": PredictionRow.probability,
    "threshold": PredictionRow.threshold,
    "positive": PredictionRow.positive,
    "state": Instance.state,
    "finished_at": Instance.finished_at,
}
INSTANCE_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "path": Instance.path,
    "sop_instance_uid": Instance.sop_instance_uid,
    "state": Instance.state,
    "reason": Instance.reason,
    "study_instance_uid": Instance.study_instance_uid,
    "series_instance_uid": Instance.series_instance_uid,
    "accession_number": Instance.accession_number,
    "modality": Instance.modality,
    "body_part": Instance.body_part,
    "view_position": Instance.view_position,
    "attempts": Instance.attempts,
    "model_set": Instance.model_set,
    "received_at": Instance.received_at,
    "finished_at": Instance.finished_at,
}
OUTPUT_COLUMNS: dict[str, Any] = {
    "sop_instance_uid": OutputRow.sop_instance_uid,
    "source_sop_instance_uid": Instance.sop_instance_uid,
    "study_instance_uid": Instance.study_instance_uid,
    "accession_number": Instance.accession_number,
    "kind": OutputRow.kind,
    "destination": func.coalesce(Delivery.destination, ""),
    "sent_state": func.coalesce(Delivery.state, OutputRow.sent_state),
    "status": Delivery.status,
    "reason": func.coalesce(Delivery.reason, ""),
    "verified": func.coalesce(Delivery.verified, ""),
    "attempts": func.coalesce(Delivery.attempts, 0),
    "created_at": OutputRow.created_at,
    "sent_at": Delivery.sent_at,
}
YIELD_PER = 1000


@dataclass(frozen=True)
class ResultFilter:
    """Which rows to export; ``None`` fields do not filter, and set fields must all hold.

    ``target``, ``min_probability`` (inclusive), ``positive``, ``model`` and ``model_version`` select
    predictions; for the instances export they keep the instances with at least one such prediction (e.g.
    ``positive=True``: the flagged instances). ``since`` (inclusive) and ``until`` (exclusive) apply to
    ``finished_at`` for predictions and to ``received_at`` for instances; naive datetimes are taken as UTC.
    """

    target: str | None = None
    min_probability: float | None = None
    positive: bool | None = None
    state: str | None = None
    model: str | None = None
    model_version: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    accession: str | None = None

    def prediction_conditions(self) -> list[ColumnElement[bool]]:
        """Conditions on ``predictions`` columns."""
        conditions = []
        if self.target is not None:
            conditions.append(PredictionRow.target == self.target)
        if self.min_probability is not None:
            conditions.append(PredictionRow.probability >= self.min_probability)
        if self.positive is not None:
            conditions.append(PredictionRow.positive.is_(self.positive))
        if self.model is not None:
            conditions.append(PredictionRow.model_name == self.model)
        if self.model_version is not None:
            conditions.append(PredictionRow.model_version == self.model_version)
        return conditions

    def instance_conditions(self, when: InstrumentedAttribute[Any]) -> list[ColumnElement[bool]]:
        """Conditions on ``instances`` columns; ``when`` is the column that ``since`` and ``until`` bound."""
        conditions = []
        if self.state is not None:
            conditions.append(Instance.state == self.state)
        if self.accession is not None:
            conditions.append(Instance.accession_number == self.accession)
        if self.since is not None:
            conditions.append(when >= self.since)
        if self.until is not None:
            conditions.append(when < self.until)
        return conditions


def iter_rows(session: Session, what: What, flt: ResultFilter) -> Iterator[dict[str, object]]:
    """Yield the rows of one export kind, oldest first, fetched ``YIELD_PER`` at a time.

    Parameters
    ----------
    session
        An open session; the rows stream inside its transaction.
    what
        ``"predictions"`` (one row per instance, model and target) or ``"instances"`` (one per input file).
    flt
        Which rows to keep.

    Raises
    ------
    ValueError
        For an unknown ``what``.
    PersistError
        When the database cannot be read.
    """
    stmt = _statement(what, flt).execution_options(yield_per=YIELD_PER)
    with guard(session, f"export the {what}"):
        for row in session.execute(stmt).mappings():
            yield {
                key: value.isoformat() if isinstance(value, datetime) else value for key, value in row.items()
            }


def write_export(session: Session, what: What, fmt: Format, out: TextIO, flt: ResultFilter) -> int:
    """Write the rows of :func:`iter_rows` to ``out`` as CSV (with a header) or a JSON array of objects.

    Returns
    -------
    int
        The number of rows written.

    Raises
    ------
    ValueError
        For an unknown ``what`` or ``fmt``.
    PersistError
        When the database cannot be read.
    """
    columns = list(_columns(what))
    rows = iter_rows(session, what, flt)
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
            count += 1
    elif fmt == "json":
        out.write("[")
        for row in rows:
            out.write(("," if count else "") + "\n  " + json.dumps(row, ensure_ascii=False))
            count += 1
        out.write("\n]\n" if count else "]\n")
    else:
        raise ValueError(f"fmt must be 'csv' or 'json', got {fmt!r}")
    logger.info("exported %d %s rows as %s", count, what, fmt)
    return count


def _columns(what: str) -> dict[str, Any]:
    if what == "predictions":
        return PREDICTION_COLUMNS
    if what == "instances":
        return INSTANCE_COLUMNS
    if what == "outputs":
        return OUTPUT_COLUMNS
    raise ValueError(f"what must be 'predictions', 'instances' or 'outputs', got {what!r}")


def _statement(what: str, flt: ResultFilter) -> Select[Any]:
    columns = [column.label(name) for name, column in _columns(what).items()]
    if what == "predictions":
        conditions = flt.prediction_conditions() + flt.instance_conditions(Instance.finished_at)
        stmt = select(*columns).join_from(PredictionRow, Instance, PredictionRow.instance_id == Instance.id)
        return stmt.where(*conditions).order_by(Instance.id, PredictionRow.id)
    if what == "outputs":
        conditions = flt.instance_conditions(OutputRow.created_at)
        if flt.prediction_conditions():
            matching = and_(PredictionRow.instance_id == Instance.id, *flt.prediction_conditions())
            conditions.append(exists().where(matching))
        stmt = (
            select(*columns)
            .join_from(OutputRow, Instance, OutputRow.instance_id == Instance.id)
            .outerjoin(Delivery, Delivery.output_id == OutputRow.id)
        )
        return stmt.where(*conditions).order_by(OutputRow.id, Delivery.id)
    conditions = flt.instance_conditions(Instance.received_at)
    if flt.prediction_conditions():
        matching = and_(PredictionRow.instance_id == Instance.id, *flt.prediction_conditions())
        conditions.append(exists().where(matching))
    return select(*columns).where(*conditions).order_by(Instance.id)


# Cells a spreadsheet reads as a formula (OWASP "CSV Injection"): a leading = + - @ tab or carriage return.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formula(text: str) -> str:
    """``text`` with a ``'`` in front when a spreadsheet would run it as a formula, e.g. ``=HYPERLINK(...)``.

    Every value in the DB arrived in a DICOM file or a file name, so any of them can carry a formula; the
    ``'`` makes Excel, LibreOffice and Google Sheets show the cell as text. JSON exports are left as they are.
    """
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv_value(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return neutralise_formula(value)
    return "" if value is None else value
