"""Delivery to real PACS nodes: Orthanc (C-STORE, STOW-RS, Storage Commitment, QIDO-RS) and DCMTK storescp.

Each PACS runs in a network namespace of its own with only loopback (tests/pacs.py); the sender enters it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests import pacs
from tests.synth import write_dicom
from xraybatch.cli import main
from xraybatch.db import session as db_session
from xraybatch.db.export import ResultFilter, iter_rows
from xraybatch.db.tables import Delivery, OutputRow
from xraybatch.delivery import DeliveryWorker, deliver_pending
from xraybatch.pipeline import run_folder
from xraybatch.settings import Settings, load_settings

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage


@pytest.fixture
def ns() -> Iterator[str]:
    with pacs.netns() as name:
        yield name


def _settings(tmp_path: Path, bundle: Path, maps: bool = False, **delivery: object) -> Settings:
    """Settings for a delivery test: an SR and an SC per image, and the parametric maps only with ``maps``."""
    return load_settings(None, {
        "workdir": tmp_path / "work", "model": {"bundles": [str(bundle)]}, "pipeline": {"decode_processes": 1},
        "output": {"parametric_map": maps}, "delivery": {"connect_timeout": 3.0, "timeout": 30.0, **delivery},
    }, environ={})


def _process(tmp_path: Path, settings: Settings, n: int = 2) -> tuple[list[Path], object]:
    """Process ``n`` synthetic CR files (one study each); returns the inputs and a session factory."""
    files = [write_dicom(tmp_path / "in" / f"cr{i}.dcm", seed=i) for i in range(n)]
    summary = run_folder(tmp_path / "in", settings)
    assert summary.counts == {"done": n}
    return files, db_session.make_sessionmaker(db_session.make_engine(settings.db_url))


def _outputs(sessions: object) -> dict[str, str]:
    with sessions() as s:  # type: ignore[operator]
        return {o.sop_instance_uid: o.kind for o in s.query(OutputRow)}


def _deliveries(sessions: object) -> list[Delivery]:
    with sessions() as s:  # type: ignore[operator]
        rows = list(s.query(Delivery).order_by(Delivery.id))
        s.expunge_all()
    return rows


def _source_studies(files: list[Path]) -> set[str]:
    from pydicom import dcmread

    return {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}


def _assert_in_source_studies(orthanc: pacs.Orthanc, files: list[Path], outputs: dict[str, str]) -> None:
    stored = orthanc.instances()
    assert set(stored) == set(outputs)
    assert {tags["StudyInstanceUID"] for tags in stored.values()} == _source_studies(files)
    assert {"SR", "OT"} <= {tags["Modality"] for tags in stored.values()}
    for tags in stored.values():
        assert "AI generated" in tags.get("SeriesDescription", "")


def test_cstore_into_the_source_study_once(tmp_path: Path, tiny_bundle: Path, ns: str) -> None:
    settings = _settings(tmp_path, tiny_bundle, maps=True)
    files, sessions = _process(tmp_path, settings)
    outputs = _outputs(sessions)
    assert "pm" in outputs.values()  # parametric maps (JPEG-LS) and the SC (JPEG) go too
    orthanc = pacs.Orthanc(ns, tmp_path / "orthanc").start()
    try:
        with pacs.in_netns(ns):
            report = deliver_pending(sessions, [orthanc.dicom_url], settings.delivery)
            assert (report.sent, report.failed, report.unsent, report.faults) == (len(outputs), 0, 0, {})
            again = deliver_pending(sessions, [orthanc.dicom_url], settings.delivery, retry_failed=True)
        assert (again.sent, again.unsent) == (0, 0)  # already sent: never sent again
        _assert_in_source_studies(orthanc, files, outputs)
        assert Counter(orthanc.received()) == Counter(set(outputs))  # each object received exactly once
        rows = _deliveries(sessions)
        assert {(r.state, r.status, r.attempts) for r in rows} == {("sent", 0, 1)}
        assert all(r.sent_at is not None for r in rows)
    finally:
        orthanc.stop()


def test_stow_rs_into_the_source_study_with_qido_read_back(tmp_path: Path, tiny_bundle: Path, ns: str) -> None:
    settings = _settings(tmp_path, tiny_bundle, verify="qido")
    files, sessions = _process(tmp_path, settings)
    outputs = _outputs(sessions)
    orthanc = pacs.Orthanc(ns, tmp_path / "orthanc").start()
    try:
        with pacs.in_netns(ns):
            report = deliver_pending(sessions, [orthanc.dicomweb_url], settings.delivery)
        assert (report.sent, report.unsent) == (4, 0)
        _assert_in_source_studies(orthanc, files, outputs)
        rows = _deliveries(sessions)
        assert {(r.state, r.status, r.verified) for r in rows} == {("sent", 200, "found")}
        assert Counter(orthanc.received()) == Counter(set(outputs))
    finally:
        orthanc.stop()


def test_pacs_down_run_folder_then_deliver_sends_each_once(tmp_path: Path, tiny_bundle: Path, ns: str) -> None:
    """run-folder (CLI, in the namespace) with the PACS stopped: exit 0, outputs pending; deliver sends them once."""
    orthanc = pacs.Orthanc(ns, tmp_path / "orthanc")
    inbox = tmp_path / "in"
    for i in range(2):
        write_dicom(inbox / f"cr{i}.dcm", seed=i)
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XRAYBATCH_PIPELINE_DECODE_PROCESSES": "1",
           "XRAYBATCH_OUTPUT_PARAMETRIC_MAP": "false",
           "XRAYBATCH_DELIVERY_TRY_TIMEOUT": "2"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "xraybatch", *args],
                              capture_output=True, text=True, env=env, timeout=300, check=False)

    run = cli("run-folder", str(inbox), "--workdir", str(work), "--bundle", str(tiny_bundle), "--no-progress",
              "--send", orthanc.dicom_url, "--send", orthanc.dicomweb_url)
    assert run.returncode == 0, run.stderr
    assert "4 outputs wait for delivery" in run.stdout or "8 outputs wait for delivery" in run.stdout
    sessions = db_session.make_sessionmaker(db_session.make_engine(f"sqlite:///{work / 'xraybatch.sqlite'}"))
    rows = _deliveries(sessions)
    assert len(rows) == 8 and {(r.state, r.attempts) for r in rows} == {("pending", 1)}
    assert all(r.reason for r in rows)

    down = cli("deliver", "--workdir", str(work), "--no-progress", "--send", orthanc.dicom_url)
    assert down.returncode == 1 and "4 pending" in down.stdout  # still down: exit 1, nothing lost

    orthanc.start()
    try:
        sent = cli("deliver", "--workdir", str(work), "--no-progress",
                   "--send", orthanc.dicom_url, "--send", orthanc.dicomweb_url)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "8 sent" in sent.stdout and "0 pending, 0 failed" in sent.stdout
        again = cli("deliver", "--workdir", str(work), "--no-progress",
                    "--send", orthanc.dicom_url, "--send", orthanc.dicomweb_url)
        assert again.returncode == 0 and "0 sent" in again.stdout
        outputs = _outputs(sessions)
        assert set(orthanc.instances()) == set(outputs)
        received = Counter(orthanc.received())
        # one C-STORE and one STOW-RS per object, no more: Orthanc stored each object once
        assert received == Counter({uid: 2 for uid in outputs})
        assert int(orthanc.rest("/statistics")["CountInstances"]) == len(outputs)
    finally:
        orthanc.stop()
    status = CliRunner().invoke(main, ["status", "--workdir", str(work)])
    assert status.exit_code == 0 and f"{orthanc.dicom_url}: sent 4, pending 0, failed 0" in status.output


def test_rejected_object_is_failed_with_the_reason_and_not_resent(tmp_path: Path, tiny_bundle: Path,
                                                                   ns: str) -> None:
    settings = _settings(tmp_path, tiny_bundle)
    _, sessions = _process(tmp_path, settings, n=1)
    outputs = _outputs(sessions)
    sr = next(uid for uid, kind in outputs.items() if kind == "sr")
    orthanc = pacs.Orthanc(ns, tmp_path / "orthanc", reject_modality="SR").start()
    try:
        with pacs.in_netns(ns):
            report = deliver_pending(sessions, [orthanc.dicom_url], settings.delivery)
            assert (report.sent, report.failed, report.failed_total) == (1, 1, 1)
            again = deliver_pending(sessions, [orthanc.dicom_url], settings.delivery)
            assert (again.sent, again.failed, again.failed_total) == (0, 0, 1)  # not retried blindly
        assert orthanc.received().count(sr) == 1
        by_uid = {OutputRowUid: r for OutputRowUid, r in _rows_by_uid(sessions).items()}
        failed = by_uid[sr]
        assert failed["sent_state"] == "failed" and failed["status"] == 0xA700
        assert "Refused: Out of Resources" in str(failed["reason"])
        assert set(orthanc.instances()) == set(outputs) - {sr}
        out = CliRunner().invoke(main, ["results", "export", "--workdir", str(settings.workdir), "--what", "outputs",
                                        "--format", "csv"])
        rows = list(csv.DictReader(io.StringIO(out.output)))
        assert {r["sent_state"] for r in rows} == {"sent", "failed"}
        assert {"sop_instance_uid", "source_sop_instance_uid", "kind", "destination", "sent_state", "status",
                "attempts", "sent_at"} <= set(rows[0])
        with pacs.in_netns(ns):
            retried = deliver_pending(sessions, [orthanc.dicom_url], settings.delivery, retry_failed=True)
        assert (retried.sent, retried.failed) == (0, 1)  # --retry-failed sends it again; still refused
        assert orthanc.received().count(sr) == 2
    finally:
        orthanc.stop()


def _rows_by_uid(sessions: object) -> dict[str, dict[str, object]]:
    with sessions() as s:  # type: ignore[operator]
        return {str(r["sop_instance_uid"]): r for r in iter_rows(s, "outputs", ResultFilter())}


def test_storage_commitment_confirms_what_was_stored(tmp_path: Path, tiny_bundle: Path, ns: str) -> None:
    """Orthanc answers C-STORE Success for an object its filter drops; Storage Commitment tells the truth."""
    port = pacs.free_port()
    settings = _settings(tmp_path, tiny_bundle, verify="commitment", commitment_port=port, commitment_timeout=60.0)
    _, sessions = _process(tmp_path, settings, n=1)
    outputs = _outputs(sessions)
    orthanc = pacs.Orthanc(ns, tmp_path / "orthanc", discard_modality="SR",
                           modalities={"xraybatch": ["XRAYBATCH", "127.0.0.1", port]}).start()
    try:
        with pacs.in_netns(ns):
            report = deliver_pending(sessions, [orthanc.dicom_url], settings.delivery)
        assert report.sent == 2
        verdicts = {uid: row["verified"] for uid, row in _rows_by_uid(sessions).items()}
        assert verdicts == {uid: "not_committed" if kind == "sr" else "committed" for uid, kind in outputs.items()}
    finally:
        orthanc.stop()


def test_cstore_to_dcmtk_storescp(tmp_path: Path, tiny_bundle: Path, ns: str) -> None:
    settings = _settings(tmp_path, tiny_bundle, batch_size=3)
    _, sessions = _process(tmp_path, settings, n=2)
    scp = pacs.StoreSCP(ns, tmp_path / "storescp").start()
    try:
        with pacs.in_netns(ns):
            report = deliver_pending(sessions, [scp.url], settings.delivery)
        assert (report.sent, report.unsent) == (4, 0)
        assert {name.split(".", 1)[1] for name in scp.stored()} == set(_outputs(sessions))
    finally:
        scp.stop()


def test_background_delivery_logs_one_fault_episode_and_delivers_when_back(
    tmp_path: Path, tiny_bundle: Path, ns: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, tiny_bundle, poll_seconds=0.2, retry_max_seconds=0.4, connect_timeout=1.0)
    _, sessions = _process(tmp_path, settings, n=1)
    scp = pacs.StoreSCP(ns, tmp_path / "storescp")
    caplog.set_level(logging.INFO, logger="xraybatch.delivery")
    with pacs.in_netns(ns):
        worker = DeliveryWorker(sessions, [scp.url], settings.delivery)  # type: ignore[arg-type]
        worker.start()
    try:
        deadline = time.monotonic() + 60
        while worker.passes < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.passes >= 4 and worker.faults
        scp.start()
        while time.monotonic() < deadline and len(scp.stored()) < 2:
            time.sleep(0.2)
        assert len(scp.stored()) == 2
    finally:
        worker.stop(30)
        scp.stop()
    episodes = [r for r in caplog.records if "is failing" in r.getMessage()]
    assert len(episodes) == 1, [r.getMessage() for r in caplog.records]
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert {r.state for r in _deliveries(sessions)} == {"sent"}


def test_end_to_end_receive_watch_send_turns_a_cstore_into_sr_and_sc_in_the_pacs(
    tmp_path: Path, tiny_bundle: Path, ns: str
) -> None:
    """storescu -> xraybatch receive -> drop folder -> xraybatch watch --send -> Orthanc has the SR and the SC."""
    from pydicom import dcmread

    orthanc = pacs.Orthanc(ns, tmp_path / "orthanc").start()
    incoming, work, port = tmp_path / "incoming", tmp_path / "work", pacs.free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "XRAYBATCH_PIPELINE_DECODE_PROCESSES": "1",
           "XRAYBATCH_OUTPUT_PARAMETRIC_MAP": "false",
           "XRAYBATCH_WATCH_SETTLE_SECONDS": "0.3", "XRAYBATCH_WATCH_POLL_SECONDS": "0.2",
           "XRAYBATCH_WATCH_BATCH_WAIT_SECONDS": "0.1", "XRAYBATCH_DELIVERY_POLL_SECONDS": "0.3",
           "XRAYBATCH_RECEIVE_MIN_FREE_BYTES": "0"}

    def start(*args: str) -> subprocess.Popen[str]:
        # Logs go to a file: a pipe nobody reads fills up and blocks the process on its next log line.
        log = open(tmp_path / f"{args[0]}.log", "w")  # noqa: SIM115 - closed with the test's tmp_path
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "xraybatch", "-v", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)

    # the drop folder exists before either starts, as on a host: `watch` refuses a folder that does not exist,
    # and `receive` (which would create it) may not have got that far when `watch` looks
    incoming.mkdir()
    receive = start("receive", str(incoming), "--port", str(port))
    watch = start("watch", str(incoming), "--workdir", str(work), "--bundle", str(tiny_bundle),
                  "--send", orthanc.dicom_url, "--workers", "1")
    try:
        pacs.wait_port(ns, port, proc=receive)  # type: ignore[arg-type]
        # the first file is taken once watch has loaded its models; time the second, sent to a warm worker
        latencies = []
        for i in range(2):
            source = write_dicom(tmp_path / "send" / f"cr{i}.dcm", seed=10 + i)
            study = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
            sent_at = time.monotonic()
            store = subprocess.run(["ip", "netns", "exec", ns, pacs.dcmtk("storescu"), "-aec", "XRAYBATCH",
                                    "127.0.0.1", str(port), str(source)], capture_output=True, text=True,
                                   timeout=60, check=False)
            assert store.returncode == 0, store.stdout + store.stderr
            deadline = time.monotonic() + 240
            found: set[str] = set()
            while time.monotonic() < deadline and found != {"SR", "OT"}:
                assert watch.poll() is None, "watch ended early:\n" + (tmp_path / "watch.log").read_text()[-4000:]
                found = {tags["Modality"] for tags in orthanc.instances().values()
                         if tags["StudyInstanceUID"] == study}
                time.sleep(0.1)
            latencies.append(time.monotonic() - sent_at)
            assert found == {"SR", "OT"}, (f"Orthanc has {found} in the source's study; watch log:\n"
                                           + (tmp_path / "watch.log").read_text()[-4000:])
        print(f"C-STORE into receive -> SR and SC in Orthanc: first {latencies[0]:.1f} s (models loading), "
              f"then {latencies[1]:.1f} s")
    finally:
        for proc in (watch, receive):
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in (watch, receive)]
        orthanc.stop()
    assert codes == [0, 0], (tmp_path / "watch.log").read_text()[-4000:]


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 signed by it (openssl): (ca.pem, server.pem, server.key)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=xraybatch test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed: no test certificates")
def test_dicoms_verifies_the_pacs_certificate_and_delivers_over_tls(tmp_path: Path, tiny_bundle: Path) -> None:
    """dicoms:// to a TLS Storage SCP (pynetdicom): refused without the CA that signed it, delivered with it."""
    import ssl

    from pynetdicom import AE, StoragePresentationContexts, evt

    ca, cert, key = _tls_files(tmp_path / "tls")
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(str(cert), str(key))
    scp = AE("SECUREPACS")
    scp.supported_contexts = StoragePresentationContexts
    scp.add_supported_context(PARAMETRIC_MAP)  # not among pynetdicom's 128 default storage contexts
    server = scp.start_server(("127.0.0.1", 0), block=False, ssl_context=server_tls,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = f"dicoms://SECUREPACS@127.0.0.1:{server.server_address[1]}"
        untrusted = _settings(tmp_path, tiny_bundle, maps=True)  # system CAs only: our test CA is unknown
        _, sessions = _process(tmp_path, untrusted)
        outputs = _outputs(sessions)
        assert {"sc", "sr", "pm"} == set(outputs.values())  # JPEG, uncompressed and JPEG-LS objects
        refused = deliver_pending(sessions, [dest], untrusted.delivery)
        assert (refused.sent, refused.pending) == (0, len(outputs)) and refused.faults and received == []
        trusted = _settings(tmp_path, tiny_bundle, maps=True, tls_ca_file=str(ca))
        report = deliver_pending(sessions, [dest], trusted.delivery)
        assert (report.sent, report.unsent) == (len(outputs), 0), [(r.state, r.reason) for r in _deliveries(sessions)]
        assert Counter(received) == Counter(set(outputs))  # each output once, under its own SOP Instance UID
    finally:
        server.shutdown()
