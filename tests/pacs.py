"""Real PACS nodes for the delivery and receiver tests: Orthanc (with DICOMweb) and DCMTK storescp.

Orthanc and storescp listen on every interface and have no bind-address option, so they run inside a network
namespace of their own that has only loopback (``ip netns``). The test reaches them by entering that
namespace: :func:`in_netns` switches the calling thread (and the threads it starts, which inherit it) with
``setns(2)``; a subprocess runs under ``ip netns exec``. Skipped, with the reason, when the test is not root or
``ip netns`` is unavailable.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def dcmtk(tool: str) -> str:
    """The path of a DCMTK tool (pynetdicom installs apps of the same names into the venv: skip those)."""
    path = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin")
    if path is None:
        pytest.skip(f"DCMTK {tool} is not installed (apt-get install dcmtk)")
    return path


def netns_unavailable() -> str | None:
    """Why no network namespace can be made here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"xb-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)
    return None


@contextlib.contextmanager
def netns() -> Iterator[str]:
    """A new network namespace with only loopback, up; deleted afterwards. Skips the test when impossible."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"xb-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the calling thread in the namespace ``name``; threads it starts meanwhile stay in it for good."""
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def call_in_netns(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh thread inside ``name`` (the caller's thread is left alone)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with in_netns(name):
                box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            box["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def free_port() -> int:
    """A TCP port free on this host's loopback (also free in a new namespace, which has none in use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(ns: str, port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port`` inside ``ns``."""

    def probe() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before listening on {port}")
        if call_in_netns(ns, probe):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} in {ns} after {timeout} s")


LUA = """
-- every instance Orthanc receives is logged by SOP Instance UID, also the copies it already has;
-- instances of REJECT_MODALITY are refused (the filter raises: Orthanc answers C-STORE with a failure status);
-- instances of DISCARD_MODALITY are dropped silently (Orthanc 1.10 still answers C-STORE with Success)
function ReceivedInstanceFilter(dicom, origin, info)
  print('XRAYBATCH-RECEIVED ' .. dicom.SOPInstanceUID)
  if REJECT_MODALITY ~= '' and dicom.Modality == REJECT_MODALITY then
    error('refused by the test PACS: ' .. REJECT_MODALITY .. ' objects are not accepted here')
  end
  if DISCARD_MODALITY ~= '' and dicom.Modality == DISCARD_MODALITY then
    return false
  end
  return true
end
"""


class Orthanc:
    """An Orthanc server with the DICOMweb plugin, in a network namespace, its storage and config in ``root``."""

    def __init__(self, ns: str, root: Path, *, aet: str = "ORTHANC", reject_modality: str = "",
                 discard_modality: str = "", modalities: dict[str, list[Any]] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.ns, self.root, self.aet = ns, root, aet
        self.dicom_port, self.http_port = free_port(), free_port()
        self.reject_modality, self.discard_modality = reject_modality, discard_modality
        self.modalities = modalities or {}
        self.extra_config = config or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def dicom_url(self) -> str:
        return f"dicom://{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def log(self) -> Path:
        return self.root / f"orthanc-{self.starts}.log"

    def start(self) -> Orthanc:
        """Start (or restart, with the same storage and ports) the server and wait until it listens."""
        if not Path(ORTHANC).exists() or not Path(DICOMWEB_PLUGIN).exists():
            pytest.skip("Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
        self.starts += 1
        self.root.mkdir(parents=True, exist_ok=True)
        lua = self.root / "filter.lua"
        lua.write_text(f"REJECT_MODALITY = '{self.reject_modality}'\nDISCARD_MODALITY = '{self.discard_modality}'\n" + LUA)
        config = {
            "Name": "xraybatch-test", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": False, "DicomModalities": self.modalities, "DicomModalitiesInDatabase": False,
            "LuaScripts": [str(lua)], "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "StorageCommitmentReportsSize": 100, "HttpTimeout": 60, "ConcurrentJobs": 2,
            "SaveJobs": False, "OverwriteInstances": False, **self.extra_config,
        }
        (self.root / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, ORTHANC, "--verbose", f"--logfile={self.log}",
             str(self.root / "orthanc.json")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.ns, self.http_port, proc=self.proc)
        wait_port(self.ns, self.dicom_port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
            self.proc = None

    def rest(self, path: str) -> Any:
        """GET ``path`` of Orthanc's REST API (from inside the namespace), decoded from JSON."""
        import urllib.request

        def get() -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as resp:
                return json.loads(resp.read())

        return call_in_netns(self.ns, get)

    def instances(self) -> dict[str, dict[str, Any]]:
        """SOP Instance UID -> the instance's main tags, series and study UIDs (Orthanc's expanded view)."""
        out = {}
        for entry in self.rest("/instances?expand"):
            tags = self.rest(f"/instances/{entry['ID']}/simplified-tags")
            out[tags["SOPInstanceUID"]] = tags
        return out

    def received(self) -> list[str]:
        """SOP Instance UIDs in the order Orthanc received them, copies included (from the Lua filter's log)."""
        text = "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("orthanc-*.log")))
        return [line.split("XRAYBATCH-RECEIVED ", 1)[1].strip().split()[0]
                for line in text.splitlines() if "XRAYBATCH-RECEIVED " in line]


class StoreSCP:
    """DCMTK storescp in a network namespace, writing what it receives into ``out``."""

    def __init__(self, ns: str, out: Path, aet: str = "STORESCP") -> None:
        self.ns, self.out, self.aet, self.port = ns, out, aet, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"dicom://{self.aet}@127.0.0.1:{self.port}"

    def start(self) -> StoreSCP:
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, dcmtk("storescp"), "--aetitle", self.aet, "--output-directory", str(self.out),
             str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.ns, self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def stored(self) -> list[str]:
        return sorted(p.name.removesuffix(".dcm") for p in self.out.iterdir() if not p.name.startswith("."))
