"""Delivery without a PACS: destination URLs, settings, the deliveries table's claims and states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.pacs import free_port
from tests.synth import write_dicom
from xraybatch.db import session as db_session
from xraybatch.db.export import ResultFilter, iter_rows
from xraybatch.db.tables import Delivery, Instance, OutputRow
from xraybatch.delivery import deliver_pending, parse_destination, store
from xraybatch.delivery.common import FAILED, PENDING, SENT, ItemResult
from xraybatch.errors import ConfigError
from xraybatch.settings import DeliveryConfig, load_settings


@pytest.mark.parametrize(("url", "kind", "host", "port", "tls", "ae", "base"), [
    ("dicom://ORTHANC@pacs.example:4242", "dimse", "pacs.example", 4242, False, "ORTHANC", ""),
    ("dicoms://PACS_1@10.1.2.3:2762", "dimse", "10.1.2.3", 2762, True, "PACS_1", ""),
    ("dicom://A@[::1]:104", "dimse", "::1", 104, False, "A", ""),
    ("http://127.0.0.1:8042/dicom-web/", "dicomweb", "127.0.0.1", 8042, False, "", "http://127.0.0.1:8042/dicom-web"),
    ("https://pacs/wado", "dicomweb", "pacs", 443, True, "", "https://pacs/wado"),
])
def test_destination_forms(url: str, kind: str, host: str, port: int, tls: bool, ae: str, base: str) -> None:
    dest = parse_destination(url)
    assert (dest.kind, dest.host, dest.port, dest.tls, dest.called_ae, dest.base_url) == (kind, host, port, tls, ae, base)


@pytest.mark.parametrize("url", [
    "dicom://pacs:4242", "dicom://THIS_AE_TITLE_IS_TOO_LONG@h:1", "dicom://A@h:70000", "ftp://h/x",
    "http://user:pw@h/dicom-web", "http://h/dicom-web?x=1", "dicom://A@h",
])
def test_bad_destinations_name_the_accepted_forms(url: str) -> None:
    with pytest.raises(ConfigError, match="dicom://CALLED_AE@HOST:PORT|DICOMweb base URL|port"):
        parse_destination(url)


def test_destinations_from_the_environment_are_validated_at_start_up() -> None:
    env = {"XRAYBATCH_DELIVERY_DESTINATIONS": "dicom://A@h:104, http://h:8042/dicom-web"}
    assert load_settings(None, environ=env).delivery.destinations == ("dicom://A@h:104", "http://h:8042/dicom-web")
    with pytest.raises(ConfigError, match="accepted forms"):
        load_settings(None, environ={"XRAYBATCH_DELIVERY_DESTINATIONS": "pacs:104"})
    with pytest.raises(ConfigError, match="verify"):
        load_settings(None, environ={"XRAYBATCH_DELIVERY_VERIFY": "maybe"})


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    db_session.upgrade(url)
    factory = db_session.make_sessionmaker(db_session.make_engine(url))
    with factory() as s:
        inst = Instance(path="/in/a", sop_instance_uid="1.2.3", study_instance_uid="1.2", state="done")
        s.add(inst)
        s.flush()
        for i, kind in enumerate(("sc", "sr", "sc")):
            write_dicom(tmp_path / f"{i}.dcm", pixels=np.zeros((8, 8), np.uint16), sop_instance_uid=f"1.2.3.{i}")
            s.add(OutputRow(instance_id=inst.id, kind=kind, sop_instance_uid=f"1.2.3.{i}",
                            series_instance_uid="1.2.9", path=str(tmp_path / f"{i}.dcm")))
        s.commit()
    return factory


def test_one_row_per_output_and_destination_and_disjoint_claims(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        assert store.enqueue(s, ["dicom://A@h:1", "http://h/dw"]) == 6
        assert store.enqueue(s, ["dicom://A@h:1", "http://h/dw"]) == 0
        first = store.claim(s, "dicom://A@h:1", 2, "w1", 60)
        second = store.claim(s, "dicom://A@h:1", 2, "w2", 60)
        third = store.claim(s, "dicom://A@h:1", 2, "w3", 60)
    assert len(first) == 2 and len(second) == 1 and third == []
    assert {i.delivery_id for i in first}.isdisjoint(i.delivery_id for i in second)
    assert first[0].study_instance_uid == "1.2"


def test_sent_is_final_failed_waits_for_retry_failed(sessions: sessionmaker[Session]) -> None:
    dest = "dicom://A@h:1"
    with sessions() as s:
        store.enqueue(s, [dest])
        items = store.claim(s, dest, 10, "w", 60)
        store.record(s, [ItemResult(items[0].delivery_id, SENT, 0),
                         ItemResult(items[1].delivery_id, FAILED, 0xA900, "0xA900 refused"),
                         ItemResult(items[2].delivery_id, PENDING, None, "no answer")], "w", backoff=3600)
        assert [i.delivery_id for i in store.claim(s, dest, 10, "w", 60, respect_backoff=True)] == []
        again = store.claim(s, dest, 10, "w", 60)
        assert [i.delivery_id for i in again] == [items[2].delivery_id]
        store.release(s, [items[2].delivery_id], "w", "released")
        retry = store.claim(s, dest, 10, "w", 60, retry_failed=True)
        assert {i.delivery_id for i in retry} == {items[1].delivery_id, items[2].delivery_id}
        store.record(s, [ItemResult(items[0].delivery_id, FAILED, 1, "late")], "w", backoff=0)
        assert store.counts(s) == {dest: {"sent": 1, "failed": 1, "pending": 1}}
        rows = {r.id: r for r in s.query(Delivery)}
        assert rows[items[0].delivery_id].state == "sent"  # a sent row is never changed again
        assert rows[items[1].delivery_id].reason == "0xA900 refused"
        assert {o.sent_state for o in s.query(OutputRow)} == {"sent", "failed", "pending"}


def test_unreachable_destination_leaves_everything_pending(sessions: sessionmaker[Session]) -> None:
    dest = f"dicom://NOBODY@127.0.0.1:{free_port()}"
    cfg = DeliveryConfig(connect_timeout=1.0, concurrency=2, batch_size=2)
    report = deliver_pending(sessions, [dest], cfg)
    assert (report.sent, report.failed, report.pending) == (0, 0, 3)
    assert dest in report.faults
    with sessions() as s:
        rows = list(s.query(Delivery))
        # the first batch met the fault; the destination was not tried again in this pass
        assert sorted(r.attempts for r in rows) == [0, 1, 1] or sorted(r.attempts for r in rows) == [1, 1, 1]
        assert {r.state for r in rows} == {"pending"}
        exported = list(iter_rows(s, "outputs", ResultFilter()))
    assert len(exported) == 3 and {r["sent_state"] for r in exported} == {"pending"}
    assert {r["destination"] for r in exported} == {dest}


def test_outputs_export_without_destinations(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        rows = list(iter_rows(s, "outputs", ResultFilter()))
    assert [(r["kind"], r["destination"], r["sent_state"], r["source_sop_instance_uid"]) for r in rows] == [
        ("sc", "", "not_sent", "1.2.3"), ("sr", "", "not_sent", "1.2.3"), ("sc", "", "not_sent", "1.2.3")
    ]


def test_cli_deliver_needs_a_valid_destination(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from xraybatch.cli import main

    runner = CliRunner()
    none = runner.invoke(main, ["deliver", "--workdir", str(tmp_path), "--no-progress"], env={})
    assert none.exit_code == 2 and "no destination" in none.output
    bad = runner.invoke(main, ["deliver", "--workdir", str(tmp_path), "--send", "pacs:104"], env={})
    assert bad.exit_code == 1 and "Error: destination 'pacs:104' is not one of the accepted forms" in bad.output
    for command in ("deliver", "receive", "run-folder", "watch"):
        helped = runner.invoke(main, [command, "--help"])
        assert helped.exit_code == 0 and "Example:" in helped.output
    assert "--send" in runner.invoke(main, ["run-folder", "--help"]).output
