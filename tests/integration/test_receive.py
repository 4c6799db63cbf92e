"""``xraybatch receive`` against DCMTK storescu: concurrency, compressed syntaxes, a hung sender, the disk
watermark, the allow-lists, SIGTERM. The receiver binds 127.0.0.1 only."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.pacs import dcmtk, free_port
from tests.synth import write_dicom
from xraybatch.receive import Receiver, valid_uid
from xraybatch.settings import ReceiveConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

if shutil.which("storescu", path="/usr/local/bin:/usr/bin:/bin") is None:
    pytest.skip("DCMTK storescu is not installed (apt-get install dcmtk)", allow_module_level=True)


@pytest.fixture
def receiver(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    overrides = getattr(request, "param", {})
    settings = {"port": free_port(), "network_timeout": 3.0, "acse_timeout": 3.0, "dimse_timeout": 10.0,
                "min_free_bytes": 0, **overrides}
    cfg = ReceiveConfig(**settings)
    rx = Receiver(tmp_path / "incoming", cfg)
    rx.start()
    yield rx
    rx.stop(grace=2.0)


def storescu(port: int, *files: Path, aet: str = "SENDER", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", aet, "-aec", "XRAYBATCH", *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_uid_validation() -> None:
    assert valid_uid("1.2.840.10008.5.1.4.1.1.1")
    for bad in ("", "1", "1..2", "1.02", "../../etc", "1.2.a", "1." + "2" * 70):
        assert not valid_uid(bad)


def test_several_associations_at_once_each_object_written_by_uid(tmp_path: Path, receiver: Receiver) -> None:
    files = [write_dicom(tmp_path / "send" / f"f{i}.dcm", seed=i, modality="CR" if i % 2 else "DX") for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda pair: storescu(receiver.port, *pair), [files[i::4] for i in range(4)]))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    written = sorted(p.name for p in receiver.incoming.iterdir())
    expected = sorted(f"{dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm" for f in files)
    assert written == expected  # no *.part left, names from the UIDs only
    for f in files:
        uid = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        got = receiver.incoming / f"{uid}.dcm"
        assert dcmread(got).PixelData == dcmread(f).PixelData
        assert got.stat().st_mode & 0o007 == 0  # not world-readable
    assert receiver.received == 8


def _compressed(src: Path, out: Path, kind: str) -> Path:
    if kind == "j2k":
        from pydicom.uid import JPEG2000Lossless

        ds = dcmread(src)
        ds.compress(JPEG2000Lossless)
        ds.save_as(out, enforce_file_format=True)
    else:
        tool = {"jpeg": [dcmtk("dcmcjpeg"), "--encode-lossless-sv1"],
                "jpegls": [dcmtk("dcmcjpls"), "--encode-lossless"], "rle": [dcmtk("dcmcrle")]}[kind]
        subprocess.run([*tool, str(src), str(out)], check=True, capture_output=True, timeout=60)
    return out


@pytest.mark.parametrize(("kind", "flag", "syntax"), [
    ("jpeg", "-xs", "1.2.840.10008.1.2.4.70"),
    ("jpegls", "-xt", "1.2.840.10008.1.2.4.80"),
    ("j2k", "-xv", "1.2.840.10008.1.2.4.90"),
    ("rle", "-xr", "1.2.840.10008.1.2.5"),
])
def test_compressed_transfer_syntaxes_are_kept_as_sent(tmp_path: Path, receiver: Receiver, kind: str, flag: str,
                                                       syntax: str) -> None:
    src = write_dicom(tmp_path / "src.dcm", seed=3)
    try:
        sent = _compressed(src, tmp_path / f"{kind}.dcm", kind)
    except (subprocess.CalledProcessError, RuntimeError, NotImplementedError) as err:
        pytest.skip(f"no {kind} encoder here: {err}")
    assert str(dcmread(sent).file_meta.TransferSyntaxUID) == syntax
    result = storescu(receiver.port, sent, extra=(flag,))
    assert result.returncode == 0, result.stderr
    got = dcmread(receiver.incoming / f"{dcmread(sent).SOPInstanceUID}.dcm")
    assert str(got.file_meta.TransferSyntaxUID) == syntax
    assert (got.pixel_array == dcmread(src).pixel_array).all()  # lossless, decodable


def test_a_hung_sender_blocks_nobody_and_is_cut_off(tmp_path: Path, receiver: Receiver) -> None:
    hung = socket.create_connection(("127.0.0.1", receiver.port), timeout=30)
    hung.sendall(b"\x01\x00\x00\x00")  # the start of an A-ASSOCIATE-RQ, then silence
    try:
        start = time.monotonic()
        result = storescu(receiver.port, write_dicom(tmp_path / "ok.dcm", seed=5))
        assert result.returncode == 0, result.stderr
        assert receiver.received == 1
        assert hung.recv(1024) == b""  # the receiver closed the silent connection (network_timeout 3 s)
        assert time.monotonic() - start < 60
    finally:
        hung.close()


@pytest.mark.parametrize("receiver", [{"min_free_bytes": 10**18}], indirect=True)
def test_below_the_disk_watermark_answers_out_of_resources(tmp_path: Path, receiver: Receiver) -> None:
    result = storescu(receiver.port, write_dicom(tmp_path / "x.dcm", seed=6), extra=("-v",))
    said = (result.stdout + result.stderr).lower()
    assert result.returncode != 0 and ("0xa700" in said or "outofresources" in said), said
    assert list(receiver.incoming.iterdir()) == []
    assert (receiver.received, receiver.refused) == (0, 1)


@pytest.mark.parametrize("receiver", [{"allowed_ae_titles": ("MODALITY1",)}], indirect=True)
def test_unknown_calling_ae_title_is_rejected(tmp_path: Path, receiver: Receiver) -> None:
    f = write_dicom(tmp_path / "x.dcm", seed=7)
    refused = storescu(receiver.port, f, aet="INTRUDER")
    assert refused.returncode != 0 and "reject" in (refused.stdout + refused.stderr).lower()
    assert storescu(receiver.port, f, aet="MODALITY1").returncode == 0
    assert len(list(receiver.incoming.iterdir())) == 1


@pytest.mark.parametrize("receiver", [{"allowed_hosts": ("192.0.2.1",)}], indirect=True)
def test_host_not_allowed_is_disconnected(tmp_path: Path, receiver: Receiver) -> None:
    refused = storescu(receiver.port, write_dicom(tmp_path / "x.dcm", seed=8))
    assert refused.returncode != 0
    assert list(receiver.incoming.iterdir()) == []


def test_echo_and_sigterm_stop_the_command_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xraybatch", "receive", str(tmp_path / "in"), "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            echo = subprocess.run([dcmtk("echoscu"), "-aec", "XRAYBATCH", "127.0.0.1", str(port)], capture_output=True,
                                  timeout=30, check=False)
            if echo.returncode == 0:
                break
            time.sleep(0.3)
        assert echo.returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
