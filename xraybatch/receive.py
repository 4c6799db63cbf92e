"""``xraybatch receive``: a C-STORE SCP (PS3.4 Annex B) that writes what it receives into the drop folder.

Each object is written atomically into INCOMING as ``<SOPInstanceUID>.dcm`` (first as ``*.part``, fsync,
rename), where ``xraybatch watch`` takes it. The file name comes from the validated SOP Instance UID only.

Limits, so that one sender cannot hurt the others:

- at most ``[receive] max_associations`` associations at once (more are rejected: "local limit exceeded",
  a transient rejection the sender retries);
- each association runs in its own thread with network, ACSE and DIMSE timeouts: a sender that hangs is
  aborted after ``network_timeout`` seconds of silence and blocks nobody meanwhile;
- an allow-list of calling AE titles (``allowed_ae_titles``) and of sender addresses (``allowed_hosts``);
- back-pressure: while the free disk space of INCOMING is below ``min_free_bytes``, C-STORE answers
  0xA700 "Refused: Out of Resources" and keeps nothing, so the sender keeps the object and retries.

SIGTERM/SIGINT stop taking associations, let running ones finish for a grace time, then abort them.
Logs name the calling AE title and the SOP Instance UID, never patient data.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import socketserver
import threading
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from xraybatch.files import fsync_dir
from xraybatch.settings import ReceiveConfig

logger = logging.getLogger(__name__)

#: Storage SOP Classes of radiographs accepted as SCP.
RADIOGRAPH_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
#: Transfer syntaxes accepted for them, in our order of preference.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit,
    JPEGExtended12Bit, JPEGLosslessP14, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless,
    JPEG2000, RLELossless,
]
VERIFICATION = "1.2.840.10008.1.1"
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def valid_uid(value: str) -> bool:
    """A UID as PS3.5 9.1 defines it: digits and dots, no leading zeros in a component, at most 64 characters."""
    return len(value) <= 64 and bool(_UID.match(value))


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server that first checks the sender's address against the allow-list."""

    allowed_hosts: frozenset[str] = frozenset()

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection whose reads time out: pynetdicom blocks reading the rest of a PDU, so a sender
        that stops mid-PDU would hold its thread and its association slot for ever without this."""
        sock, address = super().get_request()
        sock.settimeout(self.ae.network_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers are not held for delayed ACKs
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if self.allowed_hosts and host not in self.allowed_hosts:
            logger.warning("refused a connection from %s: not in [receive] allowed_hosts", host,
                           extra={"stage": "receive"})
            return False
        return True


class Receiver:
    """The C-STORE SCP of ``xraybatch receive``."""

    def __init__(self, incoming: Path, cfg: ReceiveConfig) -> None:
        self.incoming = incoming
        self.cfg = cfg
        self.received = 0
        self.refused = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.network_timeout = cfg.network_timeout
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        if cfg.allowed_ae_titles:
            ae.require_calling_aet = list(cfg.allowed_ae_titles)
        for uid in RADIOGRAPH_STORAGE:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        self.ae = ae

    @property
    def port(self) -> int:
        """The port listened on (useful with ``port = 0``)."""
        if self._server is None:
            return self.cfg.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Listen in a background thread."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        server = cast(_Server, self.ae.make_server(
            (self.cfg.address, self.cfg.port), server_class=_Server,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                          (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected)],
        ))
        server.allowed_hosts = frozenset(self.cfg.allowed_hosts)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="xraybatch-receive", daemon=True)
        self._thread.start()
        logger.info("receiving as %s on %s:%d into %s", self.cfg.ae_title, self.cfg.address, self.port,
                    self.incoming, extra={"stage": "receive"})

    def stop(self, grace: float = 10.0) -> None:
        """Stop taking associations; running ones get ``grace`` seconds, then are aborted."""
        server = self._server
        if server is None:
            return
        socketserver.TCPServer.shutdown(server)  # no new associations (pynetdicom's shutdown expects start_server)
        server.server_close()
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        for assoc in server.active_associations:
            assoc.abort()
        self._server = None
        if self._thread is not None:
            self._thread.join(10)
        logger.info("receiver stopped: %d objects received, %d refused", self.received, self.refused,
                    extra={"stage": "receive"})

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code (0)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        self.start()
        while not self.stop_event.wait(1.0):
            pass
        self.stop()
        return 0

    # -- handlers ---------------------------------------------------------------------------------------

    def _on_accepted(self, event: Any) -> None:
        logger.info("association from %s (%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address,
                    extra={"stage": "receive", "calling_ae": event.assoc.requestor.ae_title})

    def _on_rejected(self, event: Any) -> None:
        logger.warning("association from %s (%s) rejected", event.assoc.requestor.ae_title,
                       event.assoc.requestor.address,
                       extra={"stage": "receive", "calling_ae": event.assoc.requestor.ae_title})

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> int | Dataset:
        calling = str(event.assoc.requestor.ae_title)
        uid = str(event.request.AffectedSOPInstanceUID or "")
        extra = {"stage": "receive", "calling_ae": calling, "sop_instance_uid": uid}
        if not valid_uid(uid):
            self.refused += 1
            logger.warning("refused an object from %s: its SOP Instance UID is not a valid UID", calling,
                           extra={**extra, "sop_instance_uid": ""})
            return _status(CANNOT_UNDERSTAND, "Affected SOP Instance UID is not a valid UID")
        free = shutil.disk_usage(self.incoming).free
        if free < self.cfg.min_free_bytes:
            self.refused += 1
            logger.warning("refused %s from %s: %d MB free in the drop folder, below [receive] min_free_bytes",
                           uid, calling, free // 1_000_000, extra=extra)
            return _status(OUT_OF_RESOURCES, "receiver disk below its free-space watermark; retry later")
        try:
            data = event.encoded_dataset(include_meta=True)
            self._write(uid, data)
        except OSError as err:
            self.refused += 1
            logger.error("could not keep %s from %s: %s", uid, calling, err, extra=extra)
            return _status(OUT_OF_RESOURCES, "receiver could not write the object; retry later")
        self.received += 1
        logger.info("received %s from %s", uid, calling, extra=extra)
        return 0x0000

    def _write(self, uid: str, data: bytes) -> None:
        final = self.incoming / f"{uid}.dcm"
        part = self.incoming / f".{uid}.{uuid.uuid4().hex[:8]}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        fsync_dir(self.incoming)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status
