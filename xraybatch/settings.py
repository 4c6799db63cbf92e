"""One frozen settings tree: defaults < TOML file < ``XRAYBATCH_*`` environment < CLI flags.

Every field below carries its default and a comment. A TOML file uses the section names as tables::

    workdir = "/var/lib/xraybatch"

    [ingest]
    views = ["PA", "AP"]

    [db]
    url = "postgresql+psycopg://xraybatch@db/xraybatch"

Environment variables are ``XRAYBATCH_<SECTION>_<FIELD>`` (``XRAYBATCH_DB_URL``, ``XRAYBATCH_EXPLAIN_MAX_FINDINGS``)
and ``XRAYBATCH_WORKDIR``, ``XRAYBATCH_UMASK``; lists are comma-separated. Unknown keys and values of the wrong type raise
``ConfigError`` at start-up, never at the first file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xraybatch.errors import ConfigError

ENV_PREFIX = "XRAYBATCH_"


@dataclass(frozen=True)
class IngestConfig:
    """Which DICOM instances are chest radiographs we process (series selection as data)."""

    sop_classes: tuple[str, ...] = (  # (0008,0016) SOP Class UIDs accepted: CR, DX for presentation and processing
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    )
    modalities: tuple[str, ...] = ("CR", "DX", "DR")  # (0008,0060) Modality values accepted
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG")  # (0018,0015) BodyPartExamined accepted
    accept_missing_body_part: bool = True  # many CR devices leave BodyPartExamined empty
    views: tuple[str, ...] = ("PA", "AP")  # (0018,5101) ViewPosition accepted; laterals are not applicable
    accept_missing_view: bool = True  # an empty ViewPosition is taken as frontal
    min_size: int = 128  # smallest Rows/Columns we accept, in pixels
    max_pixels: int = 80_000_000  # Rows*Columns above this is rejected before decoding (memory guard)
    max_file_bytes: int = 1_000_000_000  # files larger than this are rejected unread


@dataclass(frozen=True)
class PreprocessConfig:
    """How stored pixel values become the [0, 1] display image of the Secondary Capture."""

    # The model input is not set here: each bundle's model.json fixes its own (binding; see
    # xraybatch.models.registry.ModelPreprocess). `contrast`, when set, states what the site expects of every
    # bundle; a bundle made otherwise stops the start-up with a message that names both.

    percentile_window: tuple[float, float] = (0.5, 99.5)  # display window when the file has no VOI
    prefer_voi_lut: bool = True  # use a VOI LUT Sequence over Window Center/Width when both exist
    contrast: str = ""  # model input contrast every bundle must use ("equalise" | "display"); empty = no demand


@dataclass(frozen=True)
class PipelineConfig:
    """How files flow through the stages."""

    workers: int = 0  # worker processes with their own models (run-folder, watch); 0 = one per core and 2 GiB free
    decode_processes: int = 2  # processes that decode and preprocess in parallel for one worker; 1 = in the worker
    batch_size: int = 8  # images per claim and forward pass (fewer as the queue drains: shared by the workers)


BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class ModelConfig:
    """Which model bundles to load and how to run them."""

    bundles: tuple[str, ...] = ()  # bundle directories; empty = the bundles shipped with xraybatch
    threads: int = 0  # torch intra-op threads; 0 = torch's default (one per core)
    backend: str = "torch"  # "torch", or "onnxruntime": faster forward passes, from ONNX files in WORKDIR/models


@dataclass(frozen=True)
class GateConfig:
    """The learned input gate: a bundle's check that the pixels are a frontal chest radiograph like its training data."""

    enabled: bool = True  # bundles with a "gate" block stop images that score over its threshold (not_applicable)


@dataclass(frozen=True)
class ExplainConfig:
    """Grad-CAM for positive findings."""

    enabled: bool = True  # compute heat maps for positive findings
    max_findings: int = 3  # at most this many heat maps per image, highest probability first


@dataclass(frozen=True)
class DbConfig:
    """The results database."""

    url: str = ""  # SQLAlchemy URL; empty = SQLite at WORKDIR/xraybatch.sqlite
    auto_upgrade: bool = True  # apply Alembic migrations at start-up


@dataclass(frozen=True)
class OutputConfig:
    """DICOM objects written back into the study."""

    secondary_capture: bool = True  # write the Grad-CAM overlay as a Secondary Capture
    structured_report: bool = True  # write the TID 1500 Structured Report
    parametric_map: bool = True  # write one Parametric Map per explained finding (the heat as values 0-1)
    sc_max_size: int = 1024  # longest side of the Secondary Capture's image part (the panel is added), in pixels
    sc_encoding: str = "jpeg"  # SC pixels: "jpeg" (baseline, lossy, high quality), "jpeg-ls" or "rle" (lossless), "none"
    pm_max_size: int = 256  # longest side of a Parametric Map's grid, in pixels (Grad-CAM holds no finer detail)
    institution: str = ""  # InstitutionName in Contributing Equipment; empty = copy from the source
    uid_root: str = ""  # the site's UID root for output UIDs; empty = UUID-derived UIDs under 2.25 (no registration)


@dataclass(frozen=True)
class WatchConfig:
    """The drop-folder daemon (``xraybatch watch``)."""

    settle_seconds: float = 2.0  # a file is complete when its size and mtime are unchanged this long
    poll_seconds: float = 0.5  # how often settled files are collected
    rescan_seconds: float = 30.0  # full scan of the drop folder, a safety net for missed events
    polling: bool = False  # watchdog's polling observer, for network filesystems where inotify sees nothing
    ignore_patterns: tuple[str, ...] = ("*.part", "*.tmp", ".*")  # names ignored until renamed
    after_done: str = "archive"  # processed and duplicate inputs: "archive" (WORKDIR/archive/) or "delete"
    batch_wait_seconds: float = 1.0  # wait this long for a batch to fill while files are still arriving
    lease_seconds: float = 300.0  # a claimed instance returns to the queue when its worker is silent this long
    max_attempts: int = 3  # claims of one instance before it is failed and quarantined
    grace_seconds: float = 30.0  # on SIGTERM/SIGINT: finish the batch within this, then exit anyway
    heartbeat_seconds: float = 10.0  # how often a worker records that it is alive, renews its leases and reclaims expired ones
    orphan_seconds: float = 60.0  # in-flight files no queue row knows for this long go back to the drop folder
    retry_max_seconds: float = 30.0  # longest wait between retries of a transient fault (DB down, disk full)
    metrics_port: int = 0  # serve Prometheus metrics at http://ADDRESS:PORT/metrics (0: off); --workers N: PORT + i
    metrics_address: str = "127.0.0.1"  # where the metrics listen; "0.0.0.0" to be scraped from other hosts


@dataclass(frozen=True)
class DeliveryConfig:
    """Sending the outputs to PACS nodes (C-STORE, STOW-RS); see docs/delivery.md."""

    destinations: tuple[str, ...] = ()  # dicom://CALLED_AE@HOST:PORT, dicoms://... (TLS), http(s)://HOST:PORT/PATH (DICOMweb)
    ae_title: str = "XRAYBATCH"  # our calling AE title in C-STORE associations
    connect_timeout: float = 10.0  # seconds to open a TCP connection / association, or an HTTP connection
    timeout: float = 60.0  # seconds to wait for a DIMSE response or an HTTP response
    try_timeout: float = 5.0  # run-folder's single try per destination: connection timeout, in seconds
    batch_size: int = 50  # outputs per association or STOW-RS request
    concurrency: int = 2  # associations or requests open at once per destination
    poll_seconds: float = 5.0  # watch: how often the background delivery looks for pending outputs
    retry_max_seconds: float = 300.0  # watch: longest wait between retries while a destination is down
    verify: str = "none"  # "none", "commitment" (DICOM Storage Commitment, dicom://) or "qido" (QIDO-RS read-back, http://)
    commitment_address: str = "127.0.0.1"  # where the N-EVENT-REPORT of Storage Commitment is received
    commitment_port: int = 0  # port for the N-EVENT-REPORT (0: on the same association only)
    commitment_timeout: float = 30.0  # seconds to wait for the Storage Commitment result
    tls_ca_file: str = ""  # dicoms:// and https://: CA bundle that signs the PACS certificate (empty: system CAs)
    tls_cert_file: str = ""  # dicoms:// and https://: our client certificate (PEM), for mutual TLS
    tls_key_file: str = ""  # dicoms:// and https://: the client certificate's private key (PEM)
    http_token: str = ""  # DICOMweb: bearer token (Authorization: Bearer ...); empty: none
    http_username: str = ""  # DICOMweb: basic auth user name; empty: none
    http_password: str = ""  # DICOMweb: basic auth password


@dataclass(frozen=True)
class ReceiveConfig:
    """The C-STORE receiver (``xraybatch receive``)."""

    port: int = 11112  # TCP port the receiver listens on
    address: str = "127.0.0.1"  # address the receiver binds; "0.0.0.0" to accept from other hosts
    ae_title: str = "XRAYBATCH"  # the receiver's own AE title (the called AE title senders use)
    max_associations: int = 8  # associations served at once; more are rejected (transient, "local limit exceeded")
    network_timeout: float = 60.0  # seconds of silence on an association before it is aborted (a hung sender)
    acse_timeout: float = 30.0  # seconds to wait for association negotiation messages
    dimse_timeout: float = 60.0  # seconds to wait for the rest of a DIMSE message
    allowed_ae_titles: tuple[str, ...] = ()  # calling AE titles accepted; empty: any
    allowed_hosts: tuple[str, ...] = ()  # sender IP addresses accepted; empty: any
    min_free_bytes: int = 1_000_000_000  # below this much free disk in INCOMING, C-STORE answers Out of Resources (0xA700)


@dataclass(frozen=True)
class Settings:
    """The whole configuration. Build it with :func:`load_settings`."""

    workdir: Path = Path("xraybatch-data")  # holds the SQLite DB, outbox/, inflight/, archive/, quarantine/
    umask: str = "0027"  # octal umask the process sets at start-up: "0027" makes files 0640 and folders 0750
    ingest: IngestConfig = field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    db: DbConfig = field(default_factory=DbConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    receive: ReceiveConfig = field(default_factory=ReceiveConfig)

    @property
    def db_url(self) -> str:
        """The database URL in force: ``db.url`` or SQLite under ``workdir``."""
        if self.db.url:
            return self.db.url
        return f"sqlite:///{(self.workdir / 'xraybatch.sqlite').resolve()}"

    @property
    def umask_bits(self) -> int:
        """``umask`` as the integer ``os.umask`` takes."""
        return int(self.umask, 8)

    @property
    def outbox(self) -> Path:
        """Folder that receives the DICOM outputs."""
        return self.workdir / "outbox"

    @property
    def models_dir(self) -> Path:
        """Folder of the ONNX files the onnxruntime backend exports from the bundles."""
        return self.workdir / "models"


_TOP_LEVEL = ("workdir", "umask")  # Settings fields that are plain values, not sections


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


WORKER_MEMORY = 2 * 1024**3  # what one worker process may need: two models, torch, a batch's decode buffers


def available_memory() -> int:
    """Bytes of physical memory available now (free and reclaimable), as the kernel reports it."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not reported: no limit from memory
        return WORKER_MEMORY * available_cores()


def host_worker_count(workers: int) -> int:
    """Worker processes on this host (``watch``): ``workers``, or for 0 one per core, at most one per
    :data:`WORKER_MEMORY` of available memory."""
    if workers > 0:
        return workers
    return max(1, min(available_cores(), available_memory() // WORKER_MEMORY))


def worker_count(workers: int, files: int, batch_size: int) -> int:
    """Worker processes for a run of ``files`` (``run-folder``): ``workers``, or for 0 one per core, at most one
    per batch and one per :data:`WORKER_MEMORY` of available memory."""
    if workers > 0:
        return workers
    batches = max(1, -(-files // max(1, batch_size)))
    return min(host_worker_count(0), batches)


def for_worker(settings: Settings, workers: int) -> Settings:
    """The settings of one of ``workers`` worker processes on this host: the cores shared, not oversubscribed.

    With more than one worker each takes ``cores // workers`` torch threads (unless ``[model] threads`` says
    otherwise) and decodes in its own process: the workers already keep every core busy, and extra decode
    processes would only compete with them. One worker keeps the settings as they are.
    """
    if workers <= 1:
        return settings
    threads = settings.model.threads or max(1, available_cores() // workers)
    return dataclasses.replace(
        settings,
        model=dataclasses.replace(settings.model, threads=threads),
        pipeline=dataclasses.replace(settings.pipeline, decode_processes=1),
    )


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {name: hints[name] for name in hints if name not in _TOP_LEVEL}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a TOML or environment value to ``annotation``, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif origin is tuple:
        args = typing.get_args(annotation)
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            items = [i.strip() if isinstance(i, str) else i for i in items]
            if isinstance(value, str) and items == [""]:
                items = []
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(i, args[0], where) for i in items)
            if len(items) == len(args):
                return tuple(_coerce(i, a, where) for i, a in zip(items, args))
    elif origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported settings annotation {annotation!r}")
    raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        annotation, str(annotation)
    )


def _apply(base: Any, updates: Mapping[str, Any], where: str) -> Any:
    """Return ``base`` (a frozen dataclass) with ``updates`` applied and type-checked."""
    hints = typing.get_type_hints(type(base))
    known = {f.name for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        if key not in known:
            raise ConfigError(
                f"unknown setting {where}{key!r}; known keys are {sorted(known)} "
                "(see `xraybatch config show` for every setting and its default)"
            )
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{key}] must be a table of settings, got {value!r}")
            changes[key] = _apply(getattr(base, key), value, f"[{key}] ")
        else:
            changes[key] = _coerce(value, annotation, f"setting {where}{key}")
    settings = dataclasses.replace(base, **changes)
    _validate(settings)
    return settings


def _validate(obj: Any) -> None:
    if isinstance(obj, Settings):
        if not re.fullmatch(r"0?[0-7]{3}", obj.umask):
            raise ConfigError(
                f"umask must be three or four octal digits like \"0027\" (files 0640, folders 0750), got {obj.umask!r}"
            )
    elif isinstance(obj, PipelineConfig):
        if obj.batch_size < 1:
            raise ConfigError(f"[pipeline] batch_size must be >= 1, got {obj.batch_size}")
        if obj.workers < 0:
            raise ConfigError(f"[pipeline] workers must be >= 0 (0 = one per core), got {obj.workers}")
        if obj.decode_processes < 1:
            raise ConfigError(f"[pipeline] decode_processes must be >= 1, got {obj.decode_processes}")
    elif isinstance(obj, ModelConfig):
        if obj.threads < 0:
            raise ConfigError(f"[model] threads must be >= 0, got {obj.threads}")
        if obj.backend not in BACKENDS:
            raise ConfigError(f"[model] backend must be one of {', '.join(BACKENDS)}, got {obj.backend!r}")
    elif isinstance(obj, ExplainConfig) and obj.max_findings < 0:
        raise ConfigError(f"[explain] max_findings must be >= 0, got {obj.max_findings}")
    elif isinstance(obj, PreprocessConfig):
        low, high = obj.percentile_window
        if obj.contrast not in ("", "equalise", "display"):
            raise ConfigError(f"[preprocess] contrast must be 'equalise' or 'display' (or empty), got {obj.contrast!r}")
        if not 0.0 <= low < high <= 100.0:
            raise ConfigError(
                f"[preprocess] percentile_window must be two percentiles 0 <= low < high <= 100, got {low, high}"
            )
    elif isinstance(obj, IngestConfig):
        if obj.min_size < 1 or obj.max_pixels < obj.min_size**2:
            raise ConfigError("[ingest] min_size must be >= 1 and max_pixels >= min_size**2")
    elif isinstance(obj, WatchConfig):
        if obj.after_done not in ("archive", "delete"):
            raise ConfigError(f"[watch] after_done must be 'archive' or 'delete', got {obj.after_done!r}")
        if obj.max_attempts < 1 or min(obj.settle_seconds, obj.poll_seconds, obj.lease_seconds) <= 0:
            raise ConfigError("[watch] max_attempts must be >= 1 and the times must be > 0")
        if not 0 <= obj.metrics_port <= 65535:
            raise ConfigError(f"[watch] metrics_port must be a TCP port 1-65535, or 0 for none; got {obj.metrics_port}")
    elif isinstance(obj, DeliveryConfig):
        _validate_delivery(obj)
    elif isinstance(obj, ReceiveConfig):
        if not 1 <= obj.port <= 65535 or obj.max_associations < 1 or obj.min_free_bytes < 0:
            raise ConfigError("[receive] port must be 1-65535, max_associations >= 1 and min_free_bytes >= 0")
        if min(obj.network_timeout, obj.acse_timeout, obj.dimse_timeout) <= 0:
            raise ConfigError("[receive] the timeouts must be > 0")
        if not 1 <= len(obj.ae_title) <= 16:
            raise ConfigError(f"[receive] ae_title must be 1-16 characters, got {obj.ae_title!r}")
    elif isinstance(obj, OutputConfig):
        if obj.sc_max_size < 64 or obj.pm_max_size < 8:
            raise ConfigError(
                f"[output] sc_max_size must be >= 64 and pm_max_size >= 8, got {obj.sc_max_size}, {obj.pm_max_size}"
            )
        if obj.sc_encoding not in ("jpeg", "jpeg-ls", "rle", "none"):
            raise ConfigError(
                f"[output] sc_encoding must be 'jpeg', 'jpeg-ls', 'rle' or 'none', got {obj.sc_encoding!r}"
            )
        if obj.uid_root and (
            len(obj.uid_root) > 40 or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", obj.uid_root)
        ):
            raise ConfigError(
                f"[output] uid_root must be a UID root of digits and dots, at most 40 characters, without "
                f"leading zeros (PS3.5 9.1), e.g. '1.2.840.99999.1'; got {obj.uid_root!r}"
            )


def _validate_delivery(obj: DeliveryConfig) -> None:
    from xraybatch.delivery.destinations import parse_destination

    for dest in obj.destinations:
        parse_destination(dest)  # raises ConfigError naming the accepted forms
    if not 1 <= len(obj.ae_title) <= 16:
        raise ConfigError(f"[delivery] ae_title must be 1-16 characters, got {obj.ae_title!r}")
    if obj.batch_size < 1 or obj.concurrency < 1:
        raise ConfigError("[delivery] batch_size and concurrency must be >= 1")
    if min(obj.connect_timeout, obj.timeout, obj.try_timeout, obj.poll_seconds, obj.retry_max_seconds,
           obj.commitment_timeout) <= 0:
        raise ConfigError("[delivery] the timeouts and intervals must be > 0")
    if obj.verify not in ("none", "commitment", "qido"):
        raise ConfigError(f"[delivery] verify must be 'none', 'commitment' or 'qido', got {obj.verify!r}")
    if not 0 <= obj.commitment_port <= 65535:
        raise ConfigError(f"[delivery] commitment_port must be a TCP port 1-65535, or 0; got {obj.commitment_port}")
    if bool(obj.tls_cert_file) != bool(obj.tls_key_file):
        raise ConfigError("[delivery] tls_cert_file and tls_key_file go together: set both or neither")


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Collect ``XRAYBATCH_<SECTION>_<FIELD>`` and ``XRAYBATCH_WORKDIR`` into a nested mapping."""
    sections = _section_types()
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in _TOP_LEVEL:
            out[key] = value
            continue
        for section, cls in sections.items():
            prefix = section + "_"
            if key.startswith(prefix):
                field_name = key[len(prefix) :]
                if field_name not in {f.name for f in dataclasses.fields(cls)}:
                    raise ConfigError(f"unknown environment variable {name}: [{section}] has no {field_name!r}")
                out.setdefault(section, {})[field_name] = value
                break
        else:
            if key != "config":
                raise ConfigError(
                    f"unknown environment variable {name}; use XRAYBATCH_<SECTION>_<FIELD> with a section "
                    f"among {sorted(sections)} or XRAYBATCH_WORKDIR / XRAYBATCH_UMASK"
                )
    return out


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve the settings: defaults < ``config_file`` < environment < ``overrides``.

    Parameters
    ----------
    config_file
        A TOML file; ``None`` reads none (``XRAYBATCH_CONFIG`` names one too).
    overrides
        Nested mapping from CLI flags, e.g. ``{"workdir": "...", "db": {"url": "..."}}``; ``None`` values are
        ignored.
    environ
        The environment to read; ``os.environ`` when omitted.

    Raises
    ------
    ConfigError
        For an unreadable file, an unknown key or a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    settings = Settings()
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"config file {config_file} does not exist") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {config_file} is not valid TOML: {err}") from err
        settings = _apply(settings, data, "")
    settings = _apply(settings, _from_environment(environ), "")
    if overrides:
        settings = _apply(settings, _drop_none(overrides), "")
    return settings


def _drop_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


def as_toml(settings: Settings) -> str:
    """Render ``settings`` as TOML text (for ``xraybatch config show``)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, tuple):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def entry(obj: Any, name: str) -> str:
        comment = _field_comments(type(obj)).get(name)
        return f"{name} = {fmt(getattr(obj, name))}" + (f"  # {comment}" if comment else "")

    lines = [entry(settings, name) for name in _TOP_LEVEL]
    for section in _section_types():
        sub = getattr(settings, section)
        summary = (type(sub).__doc__ or "").strip().splitlines()[:1]  # the docstring's first line: TOML has no
        lines += ["", f"[{section}]  # {''.join(summary)}"]  # multi-line comments
        lines += [entry(sub, f.name) for f in dataclasses.fields(sub)]
    return "\n".join(lines) + "\n"


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a settings dataclass's source: its documentation."""
    import inspect

    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$")
    return {m[1]: m[2].strip() for line in inspect.getsource(cls).splitlines() if (m := pattern.match(line))}
