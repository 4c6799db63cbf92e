"""The decoder child: decodes like pydicom, survives native crashes and hangs, and dies with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from tests.hostile import _builders
from xraybatch import ingest, isolation
from xraybatch.errors import DecoderCrashedError
from xraybatch.isolation import DecodeChild, DecodeError, DecoderCrashed
from xraybatch.settings import IngestConfig

ROOT = Path(__file__).resolve().parents[2]
J2K = "1.2.840.10008.1.2.4.91"


def _case(tmp_path: Path, name: str) -> Path:
    for case, build in _builders():
        if case.name == name:
            path = tmp_path / case.path_name
            path.write_bytes(build())
            return path
    raise KeyError(name)


@pytest.fixture
def child() -> Iterator[DecodeChild]:
    decoder = DecodeChild(timeout_s=60)
    yield decoder
    decoder.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def test_only_native_decoders_are_isolated() -> None:
    assert not isolation.needs_isolation("1.2.840.10008.1.2.1")  # Explicit VR Little Endian
    assert not isolation.needs_isolation("1.2.840.10008.1.2.5")  # RLE: pydicom's Python decoder
    assert not isolation.needs_isolation("1.2.840.10008.1.2.1.99")  # Deflated
    assert isolation.needs_isolation(J2K) and isolation.needs_isolation("1.2.840.10008.1.2.4.50")


@pytest.mark.parametrize("syntax", sorted(isolation.PLUGIN_ORDER))
def test_gdcm_is_tried_last(syntax: str) -> None:
    order = isolation.plugin_order(syntax)
    assert order, syntax
    if "gdcm" in order:
        assert order[-1] == "gdcm"


def test_decodes_exactly_like_pydicom(child: DecodeChild) -> None:
    path = Path(get_testdata_file("RG1_J2KI.dcm"))
    pixels = child.decode(path, isolation.plugin_order(J2K))
    expected = pixel_array(dcmread(path), decoding_plugin="pylibjpeg")
    assert pixels.dtype == expected.dtype and pixels.shape == (1955, 1841)
    np.testing.assert_array_equal(pixels, expected)
    assert pixels.flags.writeable


def test_a_gdcm_abort_ends_one_decode_and_the_next_one_works(tmp_path: Path, child: DecodeChild) -> None:
    bad = _case(tmp_path, "j2k-siz-precision-aborts-gdcm")
    good = _case(tmp_path, "j2k-good")
    child.decode(good, ("gdcm",))
    first_pid = child.pid
    with pytest.raises(DecoderCrashed, match="killed by SIGABRT") as info:
        child.decode(bad, ("pylibjpeg", "gdcm"))
    assert info.value.plugin == "gdcm" and info.value.errors and info.value.errors[0].startswith("pylibjpeg:")
    assert first_pid is not None and not _alive(first_pid)
    assert child.decode(good, ("gdcm",)).shape == (160, 144)  # a new child
    assert child.starts == 2


def test_a_segfault_is_contained(tmp_path: Path, child: DecodeChild) -> None:
    with pytest.raises(DecoderCrashed, match="killed by SIGSEGV"):
        child.decode(_case(tmp_path, "jpeg-sof-precision-crashes-gdcm"), ("gdcm",))


def test_every_decoder_raising_is_a_decode_error_naming_each(tmp_path: Path, child: DecodeChild) -> None:
    path = _case(tmp_path, "j2k-garbage-after-header")
    with pytest.raises(DecodeError) as info:
        child.decode(path, ("pylibjpeg", "pillow"))
    assert [e.split(":")[0] for e in info.value.errors] == ["pylibjpeg", "pillow"]
    assert child.starts == 1  # no crash, same child


def test_a_hung_decoder_is_killed_after_the_timeout(tmp_path: Path) -> None:
    decoder = DecodeChild(timeout_s=2)
    try:
        good = _case(tmp_path, "j2k-good")
        decoder.start()
        pid = decoder.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # a decoder stuck in native code answers nothing
        start = time.monotonic()
        with pytest.raises(DecoderCrashed, match="did not answer within 2 s"):
            decoder.decode(good, ("pylibjpeg",))
        assert time.monotonic() - start < 60
        assert not _alive(pid)
        assert decoder.decode(good, ("pylibjpeg",)).shape == (160, 144)
    finally:
        decoder.close()


def test_the_child_ignores_sigint_and_sigterm(tmp_path: Path, child: DecodeChild) -> None:
    good = _case(tmp_path, "j2k-good")
    child.start()
    pid = child.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert child.decode(good, ("pylibjpeg",)).shape == (160, 144)
    assert child.pid == pid and child.starts == 1


def test_any_file_name_reaches_the_child(tmp_path: Path, child: DecodeChild) -> None:
    good = _case(tmp_path, "j2k-good")
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9 \n.dcm"))
    good.rename(odd)
    assert child.decode(odd, ("pylibjpeg",)).shape == (160, 144)


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from xraybatch.isolation import DecodeChild\n"
        "c = DecodeChild(); c.start(); print(c.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == -signal.SIGKILL
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_ingest_read_turns_a_crash_into_a_rejection(tmp_path: Path) -> None:
    cfg = IngestConfig()
    bad = _case(tmp_path, "jpegls-precision-aborts-gdcm")
    header, ds = ingest.read_header(bad, cfg)
    ingest.check_image(header, ds, cfg)  # the structure is sound: only a decoder can tell
    with pytest.raises(DecoderCrashedError, match=r"^the pixel data could not be decoded: the decoder crashed"):
        ingest.read(header)
    good = _case(tmp_path, "jpegls-good")
    assert ingest.read(ingest.read_header(good, cfg)[0]).pixels.shape == (160, 144)


def test_a_child_that_cannot_start_is_the_hosts_fault_not_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No decoder child (e.g. no processes left): the file is not rejected; the pipeline records a failure."""
    from xraybatch.isolation import DecoderUnavailable

    monkeypatch.setattr(isolation.sys, "executable", str(tmp_path / "no-such-python"))
    monkeypatch.setattr(isolation, "_default", DecodeChild())
    cfg = IngestConfig()
    header, _ = ingest.read_header(_case(tmp_path, "j2k-good"), cfg)
    with pytest.raises(DecoderUnavailable, match="could not be started"):
        ingest.read(header)
