"""Crash-contained pixel decoding: native decoders run in a slim child process, never in the worker.

A damaged JPEG or JPEG 2000 header can make a native decoder end the whole process: GDCM aborts (SIGABRT,
exit 134) on a JPEG 2000 SIZ marker or a JPEG-LS frame header with an impossible precision, and segfaults on
a JPEG frame header with a 99-bit precision; libjpeg (pylibjpeg-libjpeg) spins for minutes on a frame header
that declares 65535 x 65535 pixels. Python cannot catch either, so :class:`DecodeChild` runs the decoders in a
child interpreter started with ``python -m xraybatch.isolation``, which imports only pydicom, numpy and the
decoder plugins (never torch), whatever the worker had imported when it started the child. One child serves
one worker process for its whole life; the worker sends a path and a decoder name, the child answers with the
stored values or the decoder's error. When the child dies while decoding, that one file is rejected ("the
pixel data could not be decoded: the decoder crashed") and the next request starts a new child; when it does
not answer within the timeout it is killed, and the file is rejected the same way. The worker and the other
files of its batch carry on.

The child ignores SIGINT and SIGTERM (a Ctrl-C or a stop request is the worker's to handle: the decode in
progress is allowed to finish) and dies with its parent (``PR_SET_PDEATHSIG`` on Linux, and end of input on
its pipe everywhere), so no child outlives its worker.

Only encapsulated transfer syntaxes with native decoders go through the child (:func:`needs_isolation`):
uncompressed, deflated and RLE data are decoded by pydicom's own Python code, which raises on damaged data.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0  # longest decode of one file before the child is killed and the file rejected
_START_TIMEOUT_S = 120.0  # the child's interpreter start and imports, on a loaded machine
_HEADER = struct.Struct("!Q")

# Transfer syntaxes pydicom decodes in Python (no native code runs): no child needed.
_PYTHON_DECODED = frozenset({
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless (pydicom's own decoder)
})

# Plugin order: decoders that raise on damaged data first, GDCM (which aborts on some damaged headers) last.
# pylibjpeg-openjpeg raised on every damaged JPEG 2000 codestream we made; Pillow raises on a truncated JPEG
# where pylibjpeg-libjpeg silently returns a part-black image; pyjpegls (CharLS) raises on damaged JPEG-LS.
_JPEG = ("pillow", "pylibjpeg", "gdcm")
_JPEG_LOSSLESS = ("pylibjpeg", "gdcm")
_JPEG_LS = ("pyjpegls", "pylibjpeg", "gdcm")
_J2K = ("pylibjpeg", "pillow", "gdcm")
PLUGIN_ORDER: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": _JPEG,  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _JPEG,  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.57": _JPEG_LOSSLESS,  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": _JPEG_LOSSLESS,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _JPEG_LS,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _JPEG_LS,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _J2K,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _J2K,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _J2K,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _J2K,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _J2K,  # HTJ2K
}


class DecodeError(Exception):
    """Every decoder raised: the pixel data is damaged or unsupported (``errors``: one line per decoder)."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("; ".join(errors) or "no decoder plugin is available")
        self.errors = tuple(errors)


class DecoderCrashed(Exception):
    """The decoder child died (a native abort or segfault) or hung past its timeout while decoding."""

    def __init__(self, how: str, plugin: str, errors: Sequence[str] = ()) -> None:
        super().__init__(f"{plugin} {how}")
        self.how = how  # "killed by SIGABRT", "did not answer within 120 s", ...
        self.plugin = plugin
        self.errors = tuple(errors)  # what the decoders tried before the crash said


class DecoderUnavailable(Exception):
    """The decoder child could not be started: a fault of this host (not of the file), retried later."""


def needs_isolation(transfer_syntax_uid: str) -> bool:
    """Whether decoding data of this transfer syntax runs native code (and so goes through the child)."""
    return bool(transfer_syntax_uid) and transfer_syntax_uid not in _PYTHON_DECODED


def plugin_order(transfer_syntax_uid: str) -> tuple[str, ...]:
    """The installed pydicom decoding plugins tried for a transfer syntax, in order; ``()``: pydicom's order."""
    from pydicom.pixels import get_decoder

    try:
        available = set(get_decoder(transfer_syntax_uid).available_plugins)
    except NotImplementedError:
        return ()
    return tuple(p for p in PLUGIN_ORDER.get(transfer_syntax_uid, ()) if p in available)


@dataclass(frozen=True)
class _Request:
    path: bytes  # os.fsencode of the path: any file name, UTF-8 or not
    plugin: str  # "" = pydicom's default order


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class DecodeChild:
    """One decoder child process, started on first use and restarted after a crash or a timeout.

    Thread-safe: requests from several threads are served one at a time. After a ``fork`` the child belongs to
    the parent only; the forked process starts its own.

    Parameters
    ----------
    timeout_s
        Longest decode of one file; the child is then killed and the file counted as a crashed decode.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = 0
        self._lock = threading.Lock()
        self.starts = 0  # how many children were started (1 + crashes and timeouts, for tests and logs)

    @property
    def pid(self) -> int | None:
        """The running child's process id, if one runs for this process."""
        proc = self._proc
        return proc.pid if proc is not None and self._owner == os.getpid() and proc.poll() is None else None

    def start(self) -> None:
        """Start the child now (a worker can call this before its heavy imports); a no-op when it runs."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._owner == os.getpid() and self._proc.poll() is None:
            return self._proc
        if self._proc is not None and self._owner == os.getpid():
            self._reap()
        env = dict(os.environ)
        env["XRB_DECODE_PARENT"] = str(os.getpid())
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "xraybatch.isolation"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True,
            )
        except OSError as err:
            self._proc = None
            raise DecoderUnavailable(f"the decoder child could not be started: {err}") from err
        self._owner = os.getpid()
        self.starts += 1
        try:
            reply = self._receive(self._proc, _START_TIMEOUT_S)
        except _Timeout:
            reply = None
        if reply != ("ready",):
            how = self._kill_and_describe(timed_out=reply is None and self._proc.poll() is None)
            raise DecoderUnavailable(f"the decoder child did not start ({how})")
        logger.debug("decoder child %d started", self._proc.pid, extra={"stage": "decode"})
        return self._proc

    def _reap(self) -> None:
        proc = self._proc
        self._proc = None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def _kill_and_describe(self, timed_out: bool = False) -> str:
        """Stop the child; how it ended. After end of input it is dying already: wait for its status."""
        proc = self._proc
        if proc is None:
            return "not running"
        if not timed_out:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                timed_out = True
        self._reap()
        return f"did not answer within {self.timeout_s:g} s" if timed_out else _signal_name(proc.returncode)

    def close(self) -> None:
        """Stop the child (it also stops by itself when this process ends)."""
        with self._lock:
            if self._proc is not None and self._owner == os.getpid():
                self._reap()
            self._proc = None

    def decode(self, path: Path, plugins: Sequence[str]) -> np.ndarray:
        """Decode the pixel data of ``path`` in the child, trying ``plugins`` in order (``()``: pydicom's order).

        Raises
        ------
        DecodeError
            Every plugin raised (damaged or unsupported data); ``errors`` holds one line per plugin.
        DecoderCrashed
            The child died or hung while decoding; it is replaced on the next call.
        DecoderUnavailable
            No child could be started (a fault of the host; the file is not to blame).
        """
        errors: list[str] = []
        with self._lock:
            for plugin in plugins or ("",):
                proc = self._ensure()
                deadline = time.monotonic() + self.timeout_s
                timed_out = False
                try:
                    self._send(proc, _Request(os.fsencode(path), plugin))
                    reply = self._receive(proc, max(0.0, deadline - time.monotonic()))
                except _Timeout:
                    reply, timed_out = None, True
                except (OSError, EOFError, pickle.UnpicklingError):
                    reply = None
                if reply is None:
                    how = self._kill_and_describe(timed_out)
                    logger.warning(
                        "decoder child %s while decoding %s (plugin %s); starting a new one", how,
                        _file_ref(path), plugin or "default", extra={"stage": "decode"},
                    )
                    raise DecoderCrashed(how, plugin or "pydicom", errors)
                if reply[0] == "ok":
                    _, dtype, shape, nbytes = reply
                    try:
                        data = _read_exactly(proc.stdout, nbytes, deadline) if proc.stdout is not None else None
                    except _Timeout:
                        data, timed_out = None, True
                    if data is None:
                        how = self._kill_and_describe(timed_out)
                        raise DecoderCrashed(how, plugin or "pydicom", errors)
                    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
                errors.append(f"{plugin or 'pydicom'}: {reply[1]}")
        raise DecodeError(errors)

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], request: _Request) -> None:
        assert proc.stdin is not None
        _write_message(proc.stdin, (request.path, request.plugin))

    @staticmethod
    def _receive(proc: subprocess.Popen[bytes], timeout_s: float) -> Any:
        """One message from the child, or ``None`` when it ended; ``_Timeout`` when it did not answer in time."""
        assert proc.stdout is not None
        stream = proc.stdout
        deadline = time.monotonic() + timeout_s
        header = _read_exactly(stream, _HEADER.size, deadline)
        if header is None:
            return None
        payload = _read_exactly(stream, _HEADER.unpack(header)[0], deadline)
        return None if payload is None else pickle.loads(payload)


class _Timeout(Exception):
    """The child did not answer before the deadline."""


def _read_exactly(stream: IO[bytes], size: int, deadline: float) -> bytearray | None:
    """``size`` bytes from the pipe (a writable buffer), or ``None`` at end of input; ``_Timeout`` past ``deadline``."""
    fd = stream.fileno()
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            raise _Timeout
        got = os.readv(fd, [view[done:]])
        if not got:
            return None
        done += got
    return buffer


def _write_message(stream: IO[bytes], message: object, *, flush: bool = True) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    if flush:
        stream.flush()


def _file_ref(path: Path) -> str:
    from xraybatch.domain import file_ref

    return file_ref(path)


_default: DecodeChild | None = None
_default_lock = threading.Lock()


def default_child() -> DecodeChild:
    """This process's decoder child (created on first use, started on the first decode)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = DecodeChild()
        return _default


def decode(path: Path, transfer_syntax_uid: str) -> np.ndarray:
    """Decode the stored values of ``path`` in this process's decoder child, with the plugin order above.

    Raises
    ------
    DecodeError, DecoderCrashed
        As :meth:`DecodeChild.decode`.
    """
    return default_child().decode(path, plugin_order(transfer_syntax_uid))


# -- the child ----------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    parent = int(os.environ.get("XRB_DECODE_PARENT", "0") or 0)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _decode_one(path: bytes, plugin: str) -> tuple[Any, ...]:
    from pydicom import dcmread
    from pydicom.pixels import pixel_array

    try:
        ds = dcmread(os.fsdecode(path))
        if "PixelData" not in ds:
            return ("error", "the file has no Pixel Data (7FE0,0010)")
        arr = pixel_array(ds, decoding_plugin=plugin) if plugin else ds.pixel_array
    except Exception as err:  # noqa: BLE001 - the child reports every decoder error to its parent
        return ("error", _short(err))
    return ("ok", np.ascontiguousarray(arr))


def _short(err: BaseException) -> str:
    """A decoder error in one line, without pydicom's "raised by all available plugins" preamble."""
    text = " ".join(str(err).split())
    marker = "plugins:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    for prefix in ("pylibjpeg: ", "gdcm: ", "pillow: ", "pyjpegls: "):
        text = text.removeprefix(prefix)
    return f"{type(err).__name__}: {text}"[:300]


def _serve() -> None:
    """The child's loop: read a request from stdin, write the answer to stdout, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    import pydicom.pixels  # noqa: F401 - import the decoders before saying ready

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _write_message(stdout, ("ready",))
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        payload = stdin.read(_HEADER.unpack(header)[0])
        path, plugin = pickle.loads(payload)
        reply = _decode_one(path, plugin)
        if reply[0] == "ok":
            arr = reply[1]
            _write_message(stdout, ("ok", arr.dtype.str, arr.shape, arr.nbytes), flush=False)
            stdout.write(memoryview(arr).cast("B"))
            stdout.flush()
        else:
            _write_message(stdout, reply)


if __name__ == "__main__":
    _serve()
