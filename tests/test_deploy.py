"""Deployment files that a hospital installs: systemd units, Kubernetes manifests, the umask, the offline bundle.

The container image and the compose stack run only where an engine runs (`make image-test`, `make
stack-test`, both from .ci/run); these tests cover what runs everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xraybatch.errors import ConfigError
from xraybatch.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
K8S = ROOT / "deploy" / "k8s"
UNIT_NAMES = ["xraybatch.service", "xraybatch-watch@.service", "xraybatch-receive.service"]
MAX_EXPOSURE = 3.0  # `systemd-analyze security`: 3.0 and below is "OK"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed here")


# -- systemd ------------------------------------------------------------------------------------------------


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointed at this environment's xraybatch, so that `verify` finds the binary."""
    exe = Path(sys.executable).with_name("xraybatch")
    if not exe.exists():
        pytest.skip(f"no xraybatch console script beside {sys.executable}")
    out = tmp_path / "units"
    out.mkdir()
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text()
        assert "/opt/xraybatch/venv/bin/xraybatch" in text, f"{name}: ExecStart moved; update this test"
        (out / name).write_text(text.replace("/opt/xraybatch/venv/bin/xraybatch", str(exe)))
    (out / "xraybatch-watch@1.service").symlink_to("xraybatch-watch@.service")
    return out


def _instances() -> list[str]:
    return ["xraybatch.service", "xraybatch-watch@1.service", "xraybatch-receive.service"]


@needs_systemd_analyze
@pytest.mark.parametrize("unit", _instances())
def test_systemd_unit_verifies_without_warnings(unit_dir: Path, unit: str) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(unit_dir / unit)], check=False, capture_output=True, text=True,
                            timeout=60)
    about_ours = [line for line in (result.stdout + result.stderr).splitlines() if "xraybatch" in line]
    assert result.returncode == 0 and not about_ours, result.stdout + result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", _instances())
def test_systemd_unit_security_exposure_is_ok(unit_dir: Path, unit: str) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_dir / unit)],
                            check=False, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, f"{unit}: exposure {match[1]} {match[2]}\n{result.stdout}"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_systemd_unit_keeps_the_essentials(name: str) -> None:
    """What the hardening score cannot see: umask, one writable tree for the drop folder and the work folder
    (files move between them by rename(), which fails across mount points), a stop timeout above the grace time."""
    text = (UNITS / name).read_text()
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    assert keys["UMask"] == ["0027"]
    assert keys["ProtectSystem"] == ["strict"]
    writable = " ".join(keys["ReadWritePaths"]).split()
    assert len(writable) == 1 and "StateDirectory" not in keys, "one writable mount point, or rename() fails"
    drop_folder = keys["ExecStart"][0].split()[4]
    workdir = next(v.split("=", 1)[1] for v in keys["Environment"] if v.startswith("XRAYBATCH_WORKDIR="))
    assert _under(drop_folder, writable[0]) and _under(workdir, writable[0])
    assert keys["CapabilityBoundingSet"] == [""]
    assert keys["User"] == ["xraybatch"]
    grace = load_settings(environ={}).watch.grace_seconds
    assert int(keys["TimeoutStopSec"][0]) > grace
    assert keys["KillSignal"] == ["SIGTERM"]
    command = keys["ExecStart"][0].split()
    if name == "xraybatch-watch@.service":  # each instance is one worker
        assert command[-2:] == ["--workers", "1"]
    if name == "xraybatch.service":  # one unit, one worker per core under its supervisor
        assert "--workers" not in command


def test_compose_workers_share_one_volume_for_drop_and_work_folders() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"db", "migrate", "worker-1", "worker-2", "receive", "pacs"} <= set(services)
    for name in ("worker-1", "worker-2"):
        service = services[name]
        assert service["command"] == ["watch", "/data/incoming", "--send", "dicom://ORTHANC@pacs:4242", "--workers",
                                      "1"]
        targets = [v.split(":")[1] for v in service["volumes"]]
        assert targets == ["/data"], targets  # /data/incoming and /data/work (the image's workdir) on one mount
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["environment"]["XRAYBATCH_DB_AUTO_UPGRADE"] == "false"
        assert "postgresql" in service["environment"]["XRAYBATCH_DB_URL"]
        assert service["restart"] == "unless-stopped"
    assert "XRAYBATCH_WORKDIR=/data/work" in (ROOT / "deploy" / "Dockerfile").read_text()
    receive = services["receive"]
    assert receive["image"].startswith("xraybatch:") and receive["command"][:2] == ["receive", "/data/incoming"]
    assert [v.split(":")[1] for v in receive["volumes"]] == ["/data"]  # writes into the workers' drop folder
    assert receive["environment"]["XRAYBATCH_RECEIVE_ADDRESS"] == "0.0.0.0"  # reachable through the published port


# -- Kubernetes --------------------------------------------------------------------------------------------


def _manifests() -> Iterator[tuple[Path, dict]]:
    yaml = pytest.importorskip("yaml")
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    """Every manifest against the OpenAPI schemas of the newest Kubernetes that kubernetes-validate ships,
    strict: an unknown field is an error too."""
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    version = kv.latest_version()
    docs = list(_manifests())
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                            "PersistentVolumeClaim", "Secret", "ConfigMap", "Job"}
    for path, doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {err.message}")


def test_k8s_schema_check_can_fail() -> None:
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    _, deployment = next((p, d) for p, d in _manifests() if d["metadata"]["name"] == "xraybatch-worker"
                         and d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["terminationGracePeriod"] = 45  # misplaced field
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)


def test_k8s_manifests_fit_together() -> None:
    """Names the workloads refer to exist, the settings in the ConfigMap load, and the pods stop gracefully."""
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _manifests()}
    config = docs[("ConfigMap", "xraybatch-config")]["data"]["xraybatch.toml"]
    settings = load_settings(environ={}, overrides=tomllib.loads(config))
    assert settings.workdir == Path("/data/work") and settings.db.auto_upgrade is False
    workloads = [d for (kind, _), d in docs.items() if kind in ("Deployment", "Job")]
    assert len(workloads) == 3
    for doc in workloads:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in docs
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in docs
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = [m for m in container.get("volumeMounts", []) if m["name"] == "data"]
            if doc["kind"] == "Deployment":  # drop folder and work folder on one mount, or rename() fails
                assert [(m["mountPath"], m.get("subPath")) for m in mounts] == [("/data", None)]
                assert _under(settings.workdir.as_posix(), "/data")
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = docs[("Secret", ref["name"])]
                    assert ref["key"] in secret["stringData"]
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "xraybatch-worker":
            assert pod["terminationGracePeriodSeconds"] > settings.watch.grace_seconds
            # one worker per pod, scaled by replicas: the default (one per core) would count the node's cores
            (worker,) = pod["containers"]
            assert worker["args"][:2] == ["watch", "/data/incoming"] and worker["args"][-2:] == ["--workers", "1"]
    hpa = docs[("HorizontalPodAutoscaler", "xraybatch-worker")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "xraybatch-worker"
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "xraybatch_queue_depth"
    service = docs[("Service", "xraybatch-receive")]
    receive = docs[("Deployment", "xraybatch-receive")]
    assert service["spec"]["selector"] == receive["spec"]["selector"]["matchLabels"]


# -- umask -------------------------------------------------------------------------------------------------


def test_umask_setting_default_environment_and_bad_value() -> None:
    assert load_settings(environ={}).umask_bits == 0o027
    assert load_settings(environ={"XRAYBATCH_UMASK": "0077"}).umask_bits == 0o077
    assert load_settings(environ={"XRAYBATCH_UMASK": "022"}).umask_bits == 0o022
    with pytest.raises(ConfigError, match="umask must be three or four octal digits"):
        load_settings(environ={"XRAYBATCH_UMASK": "0999"})


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.lstat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize(("environ_umask", "file_bits", "dir_bits"), [(None, 0o640, 0o750), ("0077", 0o600, 0o700)])
def test_files_created_by_the_cli_are_not_world_readable(
    tmp_path: Path, tiny_bundles: Path, dicom_factory: Callable[..., Path], environ_umask: str | None,
    file_bits: int, dir_bits: int,
) -> None:
    """Started with umask 0 (as a careless service manager might), run-folder still creates the DB, the outputs
    and the quarantine sidecar at most 0640 (folders 0750), or what [umask] asks for."""
    incoming = tmp_path / "in"
    incoming.mkdir()
    dicom_factory("in/chest.dcm")
    (incoming / "notes.txt").write_text("not an image\n")
    work = tmp_path / "work"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XRAYBATCH_")}
    environ["PYTHONPATH"] = str(ROOT)
    if environ_umask:
        environ["XRAYBATCH_UMASK"] = environ_umask
    result = subprocess.run(
        [sys.executable, "-m", "xraybatch", "run-folder", str(incoming), "--workdir", str(work), "--bundle",
         str(tiny_bundles), "--no-progress"],
        check=False, env=environ, umask=0, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    modes = _modes(work)
    files = {name: mode for name, mode in modes.items() if (work / name).is_file()}
    assert any(name.startswith("outbox/") for name in files), modes  # outputs were written
    assert any(name.endswith(".sqlite") for name in files), modes
    too_open = {name: oct(mode) for name, mode in modes.items()
                if mode & ~(dir_bits if (work / name).is_dir() else file_bits)}
    assert not too_open, too_open


# -- offline bundle ----------------------------------------------------------------------------------------


def test_offline_install_script_refuses_the_network(tmp_path: Path) -> None:
    """install.sh installs with --no-index from the archive's wheels only, ignoring any pip configuration."""
    script = (ROOT / "deploy" / "offline" / "install.sh").read_text()
    assert "--no-index" in script and "PIP_CONFIG_FILE=/dev/null" in script
    assert "--index-url" not in script and "--extra-index-url" not in script
    result = subprocess.run(["bash", "-n", str(ROOT / "deploy" / "offline" / "install.sh")], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_offline_bundle_archive_layout(tmp_path: Path) -> None:
    """The archive `make offline-bundle` writes, from a small wheel folder: one top folder with the wheels, the
    install script and the service files (the full build with torch runs in CI: `make offline-test`)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "xraybatch-0.1.0-py3-none-any.whl").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    archive = tmp_path / "bundle.tar"
    stage = tmp_path / "stage"
    subprocess.run(["bash", str(ROOT / "deploy" / "offline" / "make-bundle.sh"), str(wheels), str(stage), str(archive),
                    "0.1.0"], check=True, capture_output=True, timeout=120)
    staged = stage / "xraybatch-0.1.0-offline" / "wheels" / "xraybatch-0.1.0-py3-none-any.whl"
    assert staged.stat().st_ino == (wheels / staged.name).stat().st_ino  # a hard link, not a second copy
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        modes = {m.name: m.mode for m in tar.getmembers()}
    top = {n.split("/")[0] for n in names}
    assert top == {"xraybatch-0.1.0-offline"}
    base = "xraybatch-0.1.0-offline/"
    for required in ("install.sh", "README.txt", "requirements.txt", "wheels/xraybatch-0.1.0-py3-none-any.whl",
                     "systemd/xraybatch.service", "systemd/xraybatch-watch@.service", "xraybatch.example.toml"):
        assert base + required in names, names
    assert modes[base + "install.sh"] & 0o100
    with tarfile.open(archive) as tar:
        requirements = tar.extractfile(base + "requirements.txt").read().decode()  # type: ignore[union-attr]
    assert requirements.splitlines()[0] == "xraybatch==0.1.0"
