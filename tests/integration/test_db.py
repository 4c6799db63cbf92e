"""The results database: engines, claims, results, exports; on SQLite files and on the real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from tests.integration import throwaway_postgres_database
from xraybatch.db import check_connection, downgrade, make_engine, make_sessionmaker, repo, upgrade
from xraybatch.db.export import ResultFilter, iter_rows, write_export
from xraybatch.db.tables import Instance, ModelVersion, OutputRow, PredictionRow
from xraybatch.domain import InstanceHeader, Outcome, OutputRecord, Prediction, State
from xraybatch.errors import PersistError
from xraybatch.models.registry import BundleSpec, InputSpec

MODEL_SET = "pneumonia@1.0.0,findings@2.0.0"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "results-db.md"
PREDICTION_CONTRACT = [
    "sop_instance_uid",
    "study_instance_uid",
    "accession_number",
    "model",
    "model_version",
    "target",
    "probability",
    "threshold",
    "positive",
    "state",
    "finished_at",
]
INSTANCE_CONTRACT = [
    "path",
    "sop_instance_uid",
    "state",
    "reason",
    "study_instance_uid",
    "accession_number",
    "modality",
    "body_part",
    "view_position",
    "attempts",
    "received_at",
    "finished_at",
]


# -- fixtures and builders ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with throwaway_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An upgraded, empty results database; PostgreSQL is downgraded to empty again afterwards."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'results' / 'xraybatch.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    if request.param == "postgresql":
        downgrade(engine, "base")
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


def header(uid: str = "1.2.3.4", **changes: str) -> InstanceHeader:
    values = {
        "path": Path(f"/incoming/{uid}.dcm"),
        "sop_instance_uid": uid,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
        "study_instance_uid": f"{uid}.100",
        "series_instance_uid": f"{uid}.200",
        "accession_number": f"ACC{uid.replace('.', '')}",
        "patient_id": f"SECRET-PID-{uid}",
        "modality": "CR",
        "body_part": "CHEST",
        "view_position": "PA",
        "photometric_interpretation": "MONOCHROME2",
        "rows": 2048,
        "columns": 2500,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
    }
    values.update(changes)
    return InstanceHeader(**values)  # type: ignore[arg-type]


def prediction_pneumonia(probability: float) -> Prediction:
    return Prediction("pneumonia", "1.0.0", ("Pneumonia",), (probability,), (0.5,))


def prediction_findings(effusion: float, pneumothorax: float) -> Prediction:
    return Prediction("findings", "2.0.0", ("Effusion", "Pneumothorax"), (effusion, pneumothorax), (0.4, 0.3))


def done(h: InstanceHeader, *predictions: Prediction, outputs: tuple[OutputRecord, ...] = ()) -> Outcome:
    return Outcome(
        path=h.path,
        state=State.DONE,
        reason="processed",
        header=h,
        predictions=predictions,
        outputs=outputs,
        notes=("VOI LUT applied",),
        timings={"ingest": 0.01, "infer": 0.2},
    )


def ended(h: InstanceHeader, state: State, reason: str = "") -> Outcome:
    return Outcome(path=h.path, state=state, reason=reason or state.value, header=h)


def process(factory: sessionmaker[Session], outcome: Outcome, received_at: datetime | None = None) -> int:
    """Claim and finish, as the pipeline does."""
    assert outcome.header is not None
    with factory() as session:
        instance_id = repo.claim(session, outcome.header, "worker-1", MODEL_SET, received_at=received_at)
        assert instance_id is not None
        repo.finish(session, instance_id, outcome)
    return instance_id


def bundle(
    name: str, version: str, targets: tuple[str, ...], sha256: str, path: str = "/bundles/x"
) -> BundleSpec:
    return BundleSpec(
        path=Path(path),
        name=name,
        version=version,
        task="binary" if len(targets) == 1 else "multilabel",
        architecture="separable_cnn",
        architecture_args={},
        targets=targets,
        thresholds=tuple(0.5 for _ in targets),
        temperature=tuple(1.0 for _ in targets),
        input=InputSpec(size=(224, 224), channels=1, mean=(0.0,), std=(1.0,)),
        weights_file=Path(path) / "weights.safetensors",
        sha256=sha256,
    )


# -- engines and errors ------------------------------------------------------------------------------------------


def test_sqlite_engine_creates_folder_and_sets_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'results.sqlite'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
    engine.dispose()
    assert (tmp_path / "a" / "b" / "results.sqlite").is_file()


@pytest.mark.parametrize("url", ["postgresql://u@db.example/x", "postgres://u@db.example/x"])
def test_postgres_urls_use_psycopg_without_connecting(url: str) -> None:
    engine = make_engine(url)
    assert engine.url.drivername == "postgresql+psycopg"
    assert engine.dialect.name == "postgresql"


def test_unreachable_postgres_raises_persist_error_saying_how_to_fix() -> None:
    url = "postgresql://xraybatch:hunter2@127.0.0.1:1/x?connect_timeout=2"
    with pytest.raises(PersistError, match=r"127\.0\.0\.1:1.*XRAYBATCH_DB_URL.*server is up") as info:
        upgrade(url)
    assert "hunter2" not in str(info.value)
    engine = make_engine(url)
    with pytest.raises(PersistError, match=r"\[db\] url / XRAYBATCH_DB_URL"):
        check_connection(engine)
    with make_sessionmaker(engine)() as session, pytest.raises(PersistError, match="could not claim"):
        repo.claim(session, header(), "w", MODEL_SET)


def test_bad_urls_raise_persist_error(tmp_path: Path) -> None:
    with pytest.raises(PersistError, match="not valid"):
        make_engine("no database here")
    with pytest.raises(PersistError, match="supports sqlite"):
        make_engine("oracle+nodriver://u@h/x")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PersistError, match="cannot create the folder"):
        make_engine(f"sqlite:///{tmp_path / 'file' / 'results.sqlite'}")


# -- claims and idempotency --------------------------------------------------------------------------------------


def test_second_live_claim_of_a_uid_returns_none(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        first = repo.claim(session, header("1.2.3"), "worker-1", MODEL_SET)
        assert first is not None
        assert repo.claim(session, header("1.2.3", path="/incoming/copy.dcm"), "worker-2", MODEL_SET) is None
        # The session is still usable after the refused claim.
        assert repo.claim(session, header("1.2.4"), "worker-1", MODEL_SET) is not None
        live = repo.live_instance(session, "1.2.3", MODEL_SET)
        assert live is not None and live.id == first
        assert (live.state, live.attempts, live.worker_id, live.path) == (
            "processing",
            1,
            "worker-1",
            "/incoming/1.2.3.dcm",
        )
        assert live.started_at is not None and live.started_at.tzinfo is not None
        assert repo.live_instance(session, "9.9.9", MODEL_SET) is None


@pytest.mark.parametrize(
    ("final", "claimable_again"),
    [(State.REJECTED, True), (State.FAILED, True), (State.DONE, False), (State.NOT_APPLICABLE, False)],
)
def test_claim_after_the_first_row_ends(
    factory: sessionmaker[Session], final: State, claimable_again: bool
) -> None:
    h = header("1.2.5")
    with factory() as session:
        first = repo.claim(session, h, "worker-1", MODEL_SET)
        assert first is not None
        repo.finish(session, first, ended(h, final))
        second = repo.claim(session, h, "worker-1", MODEL_SET)
        assert (second is not None) is claimable_again
        live = repo.live_instance(session, h.sop_instance_uid, MODEL_SET)
        assert live is not None and live.id == (second if claimable_again else first)


def test_duplicate_and_rejected_rows_repeat(factory: sessionmaker[Session]) -> None:
    h = header("1.2.6")
    process(factory, done(h, prediction_pneumonia(0.7)))
    unreadable = Outcome(path=Path("/incoming/junk.bin"), state=State.REJECTED, reason="not DICOM")
    with factory() as session:
        ids = [
            repo.record_unclaimed(session, ended(h, State.DUPLICATE, "already done"), MODEL_SET)
            for _ in range(2)
        ]
        ids += [repo.record_unclaimed(session, unreadable, MODEL_SET) for _ in range(2)]
        assert len(set(ids)) == 4
        counts = repo.counts_by_state(session)
        assert counts == {**{s.value: 0 for s in State}, "done": 1, "duplicate": 2, "rejected": 2}
        junk = session.get(Instance, ids[-1])
        assert junk is not None and junk.sop_instance_uid is None and junk.reason == "not DICOM"
        assert junk.finished_at is not None and junk.attempts == 0


def test_record_unclaimed_refuses_a_live_state(factory: sessionmaker[Session]) -> None:
    with factory() as session, pytest.raises(ValueError, match=r"claim\(\) then finish\(\)"):
        repo.record_unclaimed(session, ended(header(), State.NOT_APPLICABLE), MODEL_SET)


def race(factory: sessionmaker[Session], uid: str, workers: int = 2) -> list[int | None]:
    """Let ``workers`` threads claim ``uid`` at the same moment; their results."""
    barrier = threading.Barrier(workers)
    results: list[int | None] = []

    def claim(name: str) -> None:
        with factory() as session:
            barrier.wait()
            results.append(repo.claim(session, header(uid), name, MODEL_SET))

    threads = [threading.Thread(target=claim, args=(f"worker-{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_concurrent_claims_of_one_uid_have_one_winner(factory: sessionmaker[Session]) -> None:
    for round_ in range(5):
        uid = f"1.2.7.{round_}"
        results = race(factory, uid)
        assert len(results) == 2 and sum(r is not None for r in results) == 1, results
        with factory() as session:
            assert session.scalar(select(func.count()).where(Instance.sop_instance_uid == uid)) == 1


# -- results -----------------------------------------------------------------------------------------------------


def test_finish_stores_predictions_and_outputs_once(factory: sessionmaker[Session]) -> None:
    h = header("1.2.8")
    outputs = (
        OutputRecord("sr", "1.2.8.900.1", "1.2.8.900", Path("/outbox/sr.dcm")),
        OutputRecord("sc", "1.2.8.901.1", "1.2.8.901", Path("/outbox/sc.dcm")),
    )
    outcome = done(h, prediction_pneumonia(0.8), prediction_findings(0.1, 0.35), outputs=outputs)
    instance_id = process(factory, outcome)
    with factory() as session:
        repo.finish(session, instance_id, outcome)  # a re-run of the same results
        row = session.get(Instance, instance_id)
        assert row is not None
        assert (row.state, row.reason, row.notes, row.timings) == (
            "done",
            "processed",
            ["VOI LUT applied"],
            outcome.timings,
        )
        assert row.finished_at is not None and row.finished_at.utcoffset() == timedelta(0)
        preds = session.scalars(select(PredictionRow).order_by(PredictionRow.target)).all()
        assert [(p.model_name, p.target, p.probability, p.threshold, p.positive) for p in preds] == [
            ("findings", "Effusion", 0.1, 0.4, False),
            ("pneumonia", "Pneumonia", 0.8, 0.5, True),
            ("findings", "Pneumothorax", 0.35, 0.3, True),
        ]
        outs = session.scalars(select(OutputRow).order_by(OutputRow.kind)).all()
        assert [(o.kind, o.sop_instance_uid, o.path, o.sent_state) for o in outs] == [
            ("sc", "1.2.8.901.1", "/outbox/sc.dcm", "not_sent"),
            ("sr", "1.2.8.900.1", "/outbox/sr.dcm", "not_sent"),
        ]


def test_finish_rejects_a_state_that_is_not_final(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        instance_id = repo.claim(session, header(), "worker-1", MODEL_SET)
        assert instance_id is not None
        with pytest.raises(ValueError, match="must be final"):
            repo.finish(session, instance_id, ended(header(), State.PROCESSING))
        with pytest.raises(ValueError, match="no instances row"):
            repo.finish(session, instance_id + 1000, ended(header(), State.DONE))


def test_deleting_an_instance_cascades(factory: sessionmaker[Session]) -> None:
    output = OutputRecord("sr", "1.2.9.900.1", "1.2.9.900", Path("/outbox/sr.dcm"))
    instance_id = process(factory, done(header("1.2.9"), prediction_pneumonia(0.3), outputs=(output,)))
    with factory() as session:
        session.execute(text("DELETE FROM instances WHERE id = :id"), {"id": instance_id})
        session.commit()
        assert session.scalar(select(func.count()).select_from(PredictionRow)) == 0
        assert session.scalar(select(func.count()).select_from(OutputRow)) == 0


def test_register_models_upserts(factory: sessionmaker[Session]) -> None:
    specs = [
        bundle("pneumonia", "1.0.0", ("Pneumonia",), "a" * 64),
        bundle("findings", "2.0.0", ("Effusion",), "b" * 64),
    ]
    with factory() as session:
        repo.register_models(session, specs)
        repo.register_models(session, [bundle("pneumonia", "1.0.0", ("Pneumonia",), "a" * 64, path="/moved")])
        repo.register_models(session, [bundle("pneumonia", "1.0.0", ("Pneumonia",), "c" * 64)])  # retrained
        rows = session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.sha256)).all()
        assert [(r.name, r.sha256[0], r.path) for r in rows] == [
            ("findings", "b", "/bundles/x"),
            ("pneumonia", "a", "/moved"),
            ("pneumonia", "c", "/bundles/x"),
        ]
        assert rows[0].targets == ["Effusion"] and rows[0].thresholds == {"Effusion": 0.5}


def test_datetimes_round_trip_as_aware_utc(factory: sessionmaker[Session]) -> None:
    seen = datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    instance_id = process(factory, done(header("1.2.10")), received_at=seen)
    with factory() as session:
        row = session.get(Instance, instance_id)
        assert row is not None
        assert row.received_at == seen and row.received_at.tzinfo == UTC
        assert row.received_at.hour == 10


# -- exports -----------------------------------------------------------------------------------------------------


@pytest.fixture
def results(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Four inputs over four days: two processed, one not applicable, one unreadable."""
    day = datetime(2024, 1, 1, 10, tzinfo=UTC)
    a = process(factory, done(header("1.1"), prediction_pneumonia(0.9), prediction_findings(0.6, 0.1)), day)
    b = process(factory, done(header("1.2"), prediction_pneumonia(0.2)), day + timedelta(days=1))
    process(
        factory,
        ended(header("1.3", view_position="LL"), State.NOT_APPLICABLE, "lateral"),
        day + timedelta(days=2),
    )
    junk = Outcome(path=Path("/incoming/junk.bin"), state=State.REJECTED, reason="not DICOM")
    with factory() as session:
        repo.record_unclaimed(session, junk, MODEL_SET, received_at=day + timedelta(days=3))
        for instance_id, finished in ((a, day), (b, day + timedelta(days=1))):
            session.execute(update(Instance).where(Instance.id == instance_id).values(finished_at=finished))
        session.commit()
    return factory


def export(
    factory: sessionmaker[Session], what: str, fmt: str, flt: ResultFilter | None = None
) -> tuple[int, str]:
    out = io.StringIO()
    with factory() as session:
        count = write_export(session, what, fmt, out, flt or ResultFilter())  # type: ignore[arg-type]
    return count, out.getvalue()


def test_predictions_export_csv(results: sessionmaker[Session]) -> None:
    count, text_ = export(results, "predictions", "csv")
    rows = list(csv.DictReader(io.StringIO(text_)))
    assert count == len(rows) == 4
    assert set(PREDICTION_CONTRACT) <= set(rows[0])
    assert [(r["sop_instance_uid"], r["model"], r["target"], r["positive"]) for r in rows] == [
        ("1.1", "pneumonia", "Pneumonia", "true"),
        ("1.1", "findings", "Effusion", "true"),
        ("1.1", "findings", "Pneumothorax", "false"),
        ("1.2", "pneumonia", "Pneumonia", "false"),
    ]
    first = rows[0]
    assert (first["accession_number"], first["model_version"], first["state"]) == ("ACC11", "1.0.0", "done")
    assert (float(first["probability"]), float(first["threshold"])) == (0.9, 0.5)
    assert datetime.fromisoformat(first["finished_at"]) == datetime(2024, 1, 1, 10, tzinfo=UTC)


def test_instances_export_json(results: sessionmaker[Session]) -> None:
    count, text_ = export(results, "instances", "json")
    rows = json.loads(text_)
    assert count == len(rows) == 4
    assert set(INSTANCE_CONTRACT) <= set(rows[0])
    assert [(r["sop_instance_uid"], r["state"], r["reason"]) for r in rows] == [
        ("1.1", "done", "processed"),
        ("1.2", "done", "processed"),
        ("1.3", "not_applicable", "lateral"),
        (None, "rejected", "not DICOM"),
    ]
    assert rows[2]["view_position"] == "LL" and rows[3]["path"] == "/incoming/junk.bin"
    assert datetime.fromisoformat(rows[1]["received_at"]) == datetime(2024, 1, 2, 10, tzinfo=UTC)


def test_predictions_export_json_positive_is_boolean(results: sessionmaker[Session]) -> None:
    rows = json.loads(export(results, "predictions", "json")[1])
    assert [r["positive"] for r in rows] == [True, True, False, False]
    assert set(PREDICTION_CONTRACT) <= set(rows[0])


@pytest.mark.parametrize(
    ("what", "flt", "expected"),
    [
        ("predictions", ResultFilter(target="Pneumonia"), ["1.1 Pneumonia", "1.2 Pneumonia"]),
        ("predictions", ResultFilter(min_probability=0.6), ["1.1 Pneumonia", "1.1 Effusion"]),
        ("predictions", ResultFilter(positive=False), ["1.1 Pneumothorax", "1.2 Pneumonia"]),
        (
            "predictions",
            ResultFilter(model="findings", model_version="2.0.0"),
            ["1.1 Effusion", "1.1 Pneumothorax"],
        ),
        ("predictions", ResultFilter(since=datetime(2024, 1, 2, tzinfo=UTC)), ["1.2 Pneumonia"]),
        (
            "predictions",
            ResultFilter(until=datetime(2024, 1, 2, 10, tzinfo=UTC), target="Pneumonia"),
            ["1.1 Pneumonia"],
        ),
        ("predictions", ResultFilter(accession="ACC12"), ["1.2 Pneumonia"]),
        ("predictions", ResultFilter(state="rejected"), []),
        ("instances", ResultFilter(state="done"), ["1.1", "1.2"]),
        ("instances", ResultFilter(positive=True), ["1.1"]),
        ("instances", ResultFilter(target="Pneumonia", min_probability=0.1), ["1.1", "1.2"]),
        ("instances", ResultFilter(since=datetime(2024, 1, 2), until=datetime(2024, 1, 4)), ["1.2", "1.3"]),
    ],
)
def test_export_filters(
    results: sessionmaker[Session], what: str, flt: ResultFilter, expected: list[str]
) -> None:
    with results() as session:
        rows = list(iter_rows(session, what, flt))  # type: ignore[arg-type]
    got = [
        f"{r['sop_instance_uid']} {r['target']}" if what == "predictions" else r["sop_instance_uid"]
        for r in rows
    ]
    assert got == expected


@pytest.mark.parametrize("what", ["predictions", "instances"])
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_patient_id_is_never_exported(results: sessionmaker[Session], what: str, fmt: str) -> None:
    count, text_ = export(results, what, fmt)
    assert count > 0
    assert "SECRET-PID" not in text_ and "patient" not in text_.lower()


def test_empty_export_and_bad_arguments(factory: sessionmaker[Session]) -> None:
    assert export(factory, "predictions", "json") == (0, "[]\n")
    assert export(factory, "instances", "csv")[1].startswith("path,sop_instance_uid,state,reason,")
    with pytest.raises(ValueError, match="fmt must be"):
        export(factory, "instances", "xml")
    with pytest.raises(ValueError, match="what must be"):
        export(factory, "studies", "csv")


def test_export_of_a_database_never_upgraded_says_how_to_fix(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with pytest.raises(PersistError, match=r"no such table.*xraybatch db upgrade"):
        export(make_sessionmaker(engine), "predictions", "csv")
    engine.dispose()


def test_documented_queries_run(results: sessionmaker[Session]) -> None:
    """Every ```sql block of docs/results-db.md runs on the databases its first line names."""
    blocks = re.findall(r"```sql\n-- ([^\n]+)\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    names = {"SQLite": "sqlite", "PostgreSQL": "postgresql"}
    with results() as session:
        dialect = session.get_bind().dialect.name
        mine = [sql for backends, sql in blocks if dialect in {names[b.strip()] for b in backends.split(",")}]
        assert len(mine) >= 8
        rows = {sql: session.execute(text(sql)).all() for sql in mine}
    (per_day,) = [r for sql, r in rows.items() if "AS positives\nFROM" in sql]
    assert sum(row.positives for row in per_day) == 2
    (per_model,) = [r for sql, r in rows.items() if "mean_probability" in sql]
    assert [(row.model_name, row.target, row.predictions, row.positives) for row in per_model] == [
        ("findings", "Effusion", 1, 1),
        ("findings", "Pneumothorax", 1, 0),
        ("pneumonia", "Pneumonia", 2, 1),
    ]
    (accession,) = [r for sql, r in rows.items() if "'ACC11'" in sql]
    assert len(accession) == 3
