"""The ``xraybatch`` command line: a thin click layer over the library.

Settings are resolved once here (defaults < --config TOML < XRAYBATCH_* environment < flags); library errors
become ``Error: <message>`` with exit code 1. Heavy imports (torch, the pipeline) happen inside the commands
that need them, so ``--help``, ``results`` and ``db`` answer at once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from xraybatch import __version__
from xraybatch.errors import XrayBatchError
from xraybatch.settings import Settings, as_toml, host_worker_count, load_settings

F = TypeVar("F", bound=Callable[..., Any])

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the record's extras (``sop_instance_uid``, ``stage``, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _configure_logging(verbose: int, log_format: str) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:  # one line per record, never wrapped to the terminal's width (a log collector reads it too)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    from xraybatch import logs

    logs.install(handler)  # library warnings through this handler; quoted values masked
    root = logging.getLogger("xraybatch")
    root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)] + [handler]
    root.setLevel(level)
    logging.getLogger("training").handlers = [handler]
    logging.getLogger("training").setLevel(min(level, logging.INFO))  # epoch lines are what a training run is for


def settings_options(func: F) -> F:
    """--workdir, --db and --config, resolved into ``settings`` for the command."""

    @click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                  help="TOML settings file (see `xraybatch config show`).")
    @click.option("--db", "db_url", metavar="URL", help="Results DB URL (default: SQLite in WORKDIR).")
    @click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                  help="Folder for the results DB and outbox/ (default ./xraybatch-data).")
    @functools.wraps(func)
    def wrapper(*args: Any, config_file: Path | None, db_url: str | None, workdir: Path | None, **kwargs: Any) -> Any:
        overrides: dict[str, Any] = {"workdir": workdir, "db": {"url": db_url}}
        try:
            settings = load_settings(config_file, overrides)
        except XrayBatchError as err:
            raise click.ClickException(str(err)) from err
        os.umask(settings.umask_bits)  # the configured umask replaces the default set in main()
        return func(*args, settings=settings, **kwargs)

    return wrapper  # type: ignore[return-value]


def send_option(func: F) -> F:
    """--send DEST (repeatable): destinations added to ``[delivery] destinations`` for this command."""

    @click.option("--send", "send", multiple=True, metavar="DEST",
                  help="Deliver the outputs to DEST (repeatable): dicom://AE@HOST:PORT, dicoms://..., "
                       "http(s)://HOST:PORT/PATH (DICOMweb). Adds to [delivery] destinations.")
    @functools.wraps(func)
    def wrapper(*args: Any, send: tuple[str, ...], settings: Settings, **kwargs: Any) -> Any:
        if send:
            import dataclasses

            from xraybatch.delivery.destinations import parse_destination

            _run(lambda: [parse_destination(d) for d in send])
            merged = tuple(dict.fromkeys((*settings.delivery.destinations, *send)))
            settings = dataclasses.replace(
                settings, delivery=dataclasses.replace(settings.delivery, destinations=merged)
            )
        return func(*args, settings=settings, **kwargs)

    return wrapper  # type: ignore[return-value]


def _run(fn: Callable[[], Any]) -> Any:
    """Call ``fn``, turning XrayBatchError into a ClickException (``Error: ...``, exit 1)."""
    try:
        return fn()
    except XrayBatchError as err:
        raise click.ClickException(str(err)) from err


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xraybatch")
@click.option("-v", "--verbose", count=True, help="-v: info, -vv: debug.")
@click.option("--log-format", type=click.Choice(["plain", "json"]), default="plain", show_default=True,
              help="Log format on stderr.")
def main(verbose: int, log_format: str) -> None:
    """DICOM-native batch processing of chest radiographs.

    Results are AI generated and NOT FOR DIAGNOSTIC USE.

    Example:

        xraybatch run-folder /data/incoming --workdir /var/lib/xraybatch
    """
    # Results hold patient names: whatever started the process (a shell, systemd, a container), nothing it
    # creates is world-readable. Commands that read settings then apply the configured umask.
    os.umask(Settings().umask_bits)
    _configure_logging(verbose, log_format)
    os.environ[LOG_VARIABLE] = f"{verbose}:{log_format}"  # worker processes set up their logging the same way


LOG_VARIABLE = "XB_LOG_SETUP"


def configure_logging_from_environment() -> None:
    """Set up logging in a worker process as the command that started it did (``-v``, ``--log-format``)."""
    setup = os.environ.get(LOG_VARIABLE, "")
    verbose, _, log_format = setup.partition(":")
    if verbose.isdigit() and log_format in ("plain", "json"):
        _configure_logging(int(verbose), log_format)


def _daemon_logging(ctx: click.Context) -> None:
    """The daemon logs start-up, each final state and each fault at INFO unless -v asks for more."""
    if not ctx.find_root().params.get("verbose"):
        logging.getLogger("xraybatch").setLevel(logging.INFO)


@main.command("run-folder")
@click.argument("input_dir", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("--bundle", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle directory (repeatable); default: the bundles shipped with xraybatch.")
@click.option("--batch-size", type=int, help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Worker processes, each with its own models; 1 runs in this process; 0 one per core (at most "
                   "one per batch of files and per 2 GiB of free memory). Default: [pipeline] workers (0).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@settings_options
@send_option
def run_folder_cmd(input_dir: Path, bundles: tuple[Path, ...], batch_size: int | None, workers: int | None,
                   progress: bool, settings: Settings) -> None:
    """Process every file under INPUT once and print a summary.

    Every regular file is read, whatever its name; input files are never moved, renamed or deleted. DICOM
    outputs (a Secondary Capture and a Structured Report per processed image) go to WORKDIR/outbox/. The files
    go through the same queue in the results DB as `watch`: running the command again on the same folder
    resumes, processing only the files not yet final (after Ctrl-C, SIGTERM, a crash or SIGKILL). An
    interrupted run exits with code 130 (SIGINT) or 143 (SIGTERM). With --send (or [delivery] destinations)
    each new output is then tried once per destination; what could not be sent waits for `xraybatch deliver`,
    and the exit code stays 0.

    Example:

        xraybatch run-folder ./archive --workdir ./xraybatch-data --workers 2

        xraybatch run-folder ./archive --workdir ./xraybatch-data --send dicom://ORTHANC@pacs:4242

        xraybatch results export --workdir ./xraybatch-data --what predictions --format csv --out results.csv
    """
    import dataclasses
    import signal

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from xraybatch import pipeline

    if bundles:
        settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, bundles=tuple(map(str, bundles))))
    if batch_size:
        settings = dataclasses.replace(settings, pipeline=dataclasses.replace(settings.pipeline, batch_size=batch_size))
    started = datetime.now(UTC)
    total = sum(1 for _ in pipeline.iter_files(input_dir, report=False))
    err_console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]processing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
        TimeRemainingColumn(), console=err_console, disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("run", total=total, last="")
        summary = _run(lambda: pipeline.run_folder(
            input_dir, settings, on_outcome=lambda o: bar.update(task, advance=1, last=str(o.state)),
            workers=workers, files=total,
        ))
    table = Table(title="run-folder summary")
    table.add_column("state")
    table.add_column("files", justify="right")
    for state in ("done", "not_applicable", "rejected", "duplicate", "failed"):
        table.add_row(state, str(summary.counts.get(state, 0)))
    if summary.skipped:
        table.add_row("already final (earlier run)", str(summary.skipped))
    if summary.left:
        table.add_row("not processed yet", str(summary.left))
    Console().print(table)
    click.echo(
        f"{summary.files} files in {summary.seconds:.1f} s; "
        f"throughput: {summary.files_per_second:.2f} files/s, {summary.done_per_second:.2f} processed images/s"
        f"\nresults: {_safe_url(settings.db_url)}\noutputs: {settings.outbox}"
    )
    if settings.delivery.destinations and not summary.interrupted:  # one try per output and destination
        from xraybatch.db import session as db_session

        _deliver_once(db_session.make_sessionmaker(db_session.make_engine(settings.db_url)), settings, started)
    if summary.interrupted:
        click.echo(
            f"interrupted by {summary.interrupted}: {summary.left} files not processed yet; run the same command "
            "again to resume", err=True,
        )
        sys.exit(128 + int(getattr(signal, summary.interrupted)))


def _deliver_once(sessions: Any, settings: Settings, since: datetime) -> None:
    """run-folder's delivery: each new (or still pending) output tried once per destination, short timeout."""
    from xraybatch.delivery import deliver_pending

    cfg = settings.delivery
    report = _run(lambda: deliver_pending(sessions, cfg.destinations, cfg, since=since,
                                          connect_timeout=cfg.try_timeout))
    click.echo(f"delivery: {report.sent} sent, {report.failed} refused by the PACS, "
               f"{report.pending} outputs wait for delivery (xraybatch deliver)")
    for dest, why in report.faults.items():
        click.echo(f"  {dest}: {why}", err=True)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def single_worker_argv(argv: list[str]) -> list[str]:
    """``argv`` of ``xraybatch ... watch ...`` with ``--workers N`` / ``--workers=N`` replaced by ``--workers 1``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return [*out, "--workers", "1"]


@main.command("watch")
@click.argument("incoming", type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Worker processes on this host, each with its own models, sharing the queue in the results DB; "
                   "0 one per core (at most one per 2 GiB of free memory). Default: [pipeline] workers (0).")
@click.option("--bundle", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle directory (repeatable); default: the bundles shipped with xraybatch.")
@settings_options
@send_option
@click.pass_context
def watch_cmd(ctx: click.Context, incoming: Path, workers: int | None, bundles: tuple[Path, ...],
              settings: Settings) -> None:
    """Process every DICOM file dropped into INCOMING, once, until SIGTERM/SIGINT.

    A file is taken when its size and mtime have settled (names like *.part, *.tmp and dot-files are
    ignored until renamed). Processed inputs move to WORKDIR/archive/, others to WORKDIR/quarantine/ with a
    JSON file giving the reason; the drop folder ends empty. Several workers, on one or more hosts, may
    watch the same folder with one PostgreSQL database (--db). Use --log-format json for a log collector.
    With --send (or [delivery] destinations) outputs are delivered in the background, retried with
    backoff while a destination is down; processing never waits for it.

    Example:

        xraybatch --log-format json watch /data/incoming --workdir /var/lib/xraybatch --db postgresql://db/xraybatch
    """
    import dataclasses

    from xraybatch import daemon
    from xraybatch.lifetime import exit_when_parent_dies, set_parent_death_signal

    _daemon_logging(ctx)
    if not incoming.is_dir():
        raise click.ClickException(
            f"the drop folder {incoming} does not exist (or is not a folder): create it, or point "
            "`xraybatch watch` at the folder the DICOM receiver writes to"
        )
    count = host_worker_count(settings.pipeline.workers if workers is None else workers)
    if count > 1:
        sys.exit(_run(lambda: daemon.run_workers(single_worker_argv(sys.argv[1:]), count, settings)))
    supervisor = os.environ.get(daemon.PARENT_PID_VARIABLE, "")
    if supervisor.isdigit():  # a worker of --workers N: die with the supervisor, whatever ends it
        import signal

        set_parent_death_signal(signal.SIGTERM)
        exit_when_parent_dies(int(supervisor), signal.SIGTERM)
    if bundles:
        settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, bundles=tuple(map(str, bundles))))
    code = _run(daemon.Daemon(incoming, settings).run)
    # Everything is committed and signed off: skip the interpreter's teardown (seconds with torch loaded on a
    # busy host), so that the service manager sees the stop at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.command("status")
@settings_options
def status_cmd(settings: Settings) -> None:
    """Show the queue depth, counts per state, the oldest queued file, the workers alive and the deliveries.

    Example:

        xraybatch status --db postgresql://db/xraybatch
    """
    from xraybatch.db import queue
    from xraybatch.delivery import store as delivery_store

    def read() -> Any:
        with _open_session(settings) as s:
            return (queue.status(s, alive_within_seconds=3 * settings.watch.heartbeat_seconds),
                    delivery_store.counts(s))

    st, deliveries = _run(read)
    click.echo(f"queue depth: {st.counts.get('queued', 0)} queued, {st.counts.get('processing', 0)} processing")
    click.echo(f"oldest queued: {st.oldest_queued.isoformat() if st.oldest_queued else '-'}")
    click.echo("states: " + ", ".join(f"{k} {v}" for k, v in st.counts.items()))
    click.echo(f"workers alive: {len(st.workers_alive)}")
    for worker_id, last_seen in st.workers_alive:
        click.echo(f"  {worker_id} (last seen {last_seen.isoformat(timespec='seconds')})")
    click.echo("deliveries:" + ("" if deliveries else " none"))  # delivery counts per destination
    for dest, by_state in sorted(deliveries.items()):
        click.echo(f"  {dest}: " + ", ".join(f"{k} {by_state.get(k, 0)}" for k in ("sent", "pending", "failed")))


@main.command("deliver")
@click.option("--retry-failed", is_flag=True, help="Also send again the outputs a PACS refused (state failed).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@settings_options
@send_option
def deliver_cmd(retry_failed: bool, progress: bool, settings: Settings) -> None:
    """Send every output still pending to each destination, verified and exactly once.

    Destinations come from --send (repeatable) and [delivery] destinations: dicom://CALLED_AE@HOST:PORT
    (C-STORE), dicoms://... (C-STORE over TLS), http(s)://HOST:PORT/PATH (DICOMweb STOW-RS to PATH/studies).
    An output already sent to a destination is never sent there again. Exit code 0 only when nothing is
    left unsent (pending or refused) for these destinations.

    Example:

        xraybatch deliver --workdir ./xraybatch-data --send dicom://ORTHANC@pacs:4242

        xraybatch deliver --db postgresql://db/xraybatch --send https://pacs/dicom-web --retry-failed
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from xraybatch.db import session
    from xraybatch.delivery import deliver_pending
    from xraybatch.delivery import store as delivery_store

    cfg = settings.delivery
    if not cfg.destinations:
        raise click.UsageError("no destination: give --send DEST or set [delivery] destinations")
    url = settings.db_url
    if url.startswith("sqlite"):
        settings.workdir.mkdir(parents=True, exist_ok=True)
    if settings.db.auto_upgrade:
        _run(lambda: session.upgrade(url))
    sessions = session.make_sessionmaker(session.make_engine(url))

    def queued() -> int:
        with sessions() as s:
            delivery_store.enqueue(s, cfg.destinations)
            left = delivery_store.unsent(s, [str(d) for d in _run(lambda: _parsed(cfg.destinations))])
        return left.get("pending", 0) + (left.get("failed", 0) if retry_failed else 0)

    total = _run(queued)
    with Progress(TextColumn("[bold]delivering"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
                  console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("deliver", total=total, last="")
        report = _run(lambda: deliver_pending(
            sessions, cfg.destinations, cfg, retry_failed=retry_failed,
            on_result=lambda dest, r: bar.update(task, advance=1, last=r.state),
        ))
    click.echo(f"{report.sent} sent, {report.failed} refused, {report.warnings} with warnings in {report.seconds:.1f} s; "
               f"left: {report.pending} pending, {report.failed_total} failed")
    for dest, why in report.faults.items():
        click.echo(f"  {dest}: {why}", err=True)
    if report.unsent:
        sys.exit(1)


def _parsed(destinations: tuple[str, ...]) -> Any:
    from xraybatch.delivery import parse_destinations

    return parse_destinations(destinations)


@main.command("receive")
@click.argument("incoming", type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), help="TCP port (default: [receive] port, 11112).")
@click.option("--ae-title", help="Our AE title, the called AE title senders use (default: [receive] ae_title, XRAYBATCH).")
@settings_options
def receive_cmd(incoming: Path, port: int | None, ae_title: str | None, settings: Settings) -> None:
    """Receive DICOM objects by C-STORE into INCOMING, where `xraybatch watch` takes them; until SIGTERM/SIGINT.

    Accepts CR and DX storage in the usual transfer syntaxes, and C-ECHO. Each object is written atomically
    as INCOMING/<SOPInstanceUID>.dcm. Limits and back-pressure come from [receive]: max_associations,
    timeouts, allowed_ae_titles, allowed_hosts, and min_free_bytes (below it C-STORE answers 0xA700 Out of
    Resources). Binds 127.0.0.1 unless [receive] address says otherwise.

    Example:

        xraybatch receive /data/incoming --port 11112 --ae-title XRAYBATCH

        xraybatch watch /data/incoming --workdir /var/lib/xraybatch --send dicom://ORTHANC@pacs:4242
    """
    import dataclasses

    from xraybatch.errors import ConfigError
    from xraybatch.receive import Receiver

    cfg = settings.receive
    if port is not None:
        cfg = dataclasses.replace(cfg, port=port)
    if ae_title is not None:
        if not 1 <= len(ae_title) <= 16:
            raise click.ClickException(str(ConfigError(f"--ae-title must be 1-16 characters, got {ae_title!r}")))
        cfg = dataclasses.replace(cfg, ae_title=ae_title)
    try:
        receiver = Receiver(incoming, cfg)
        code = receiver.serve()
    except OSError as err:
        raise click.ClickException(f"cannot listen on {cfg.address}:{cfg.port}: {err}") from err
    sys.exit(code)


@main.command("retry")
@click.argument("incoming", type=click.Path(file_okay=False, path_type=Path))
@click.option("--state", type=click.Choice(["failed", "rejected", "not_applicable"]), default="failed",
              show_default=True, help="Quarantined files of this state go back to INCOMING.")
@settings_options
def retry_cmd(incoming: Path, state: str, settings: Settings) -> None:
    """Move quarantined files of a state back into the drop folder, to be processed again.

    Example:

        xraybatch retry /data/incoming --state failed --workdir /var/lib/xraybatch
    """
    from xraybatch.db import queue

    def move() -> int:
        with _open_session(settings) as s:
            return queue.return_to_incoming(s, state, settings.workdir.resolve() / "quarantine", incoming, copy=False)

    click.echo(f"{_run(move)} {state} files moved back to {incoming}")


@main.command("reprocess")
@click.argument("incoming", type=click.Path(file_okay=False, path_type=Path))
@click.option("--since", type=click.DateTime(), help="Only instances processed at or after (UTC).")
@click.option("--until", type=click.DateTime(), help="Only instances processed before (UTC).")
@click.option("--bundle", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The models to reprocess with (default: the shipped bundles).")
@settings_options
def reprocess_cmd(incoming: Path, since: datetime | None, until: datetime | None, bundles: tuple[Path, ...],
                  settings: Settings) -> None:
    """Run archived instances again with a new model set: copies them back into the drop folder.

    Instances already processed with the current model set are left alone (they would be duplicates).

    Example:

        xraybatch reprocess /data/incoming --since 2026-11-01 --workdir /var/lib/xraybatch
    """
    from xraybatch.db import queue
    from xraybatch.models.registry import find_bundles

    specs = _run(lambda: find_bundles(tuple(map(str, bundles)) or settings.model.bundles))
    model_set = ",".join(sorted(spec.model_id for spec in specs))

    def copy() -> int:
        with _open_session(settings) as s:
            return queue.return_to_incoming(
                s, "done", settings.workdir.resolve() / "archive", incoming, copy=True, exclude_model_set=model_set,
                since=since.replace(tzinfo=UTC) if since else None,
                until=until.replace(tzinfo=UTC) if until else None,
            )

    click.echo(f"{_run(copy)} archived instances copied to {incoming} for {model_set}")


# -- results ----------------------------------------------------------------------------------------------


@main.group("results")
def results() -> None:
    """Query the results database (filters, CSV/JSON export).

    Example:

        xraybatch results export --what predictions --format csv --target Pneumonia --positive-only
    """


def filter_options(func: F) -> F:
    """Filters shared by ``results export`` and ``results list``."""
    options = [
        click.option("--target", help="Only this finding (e.g. Pneumonia, Effusion)."),
        click.option("--min-probability", type=float, help="Only predictions with probability >= this."),
        click.option("--positive-only", is_flag=True, help="Only predictions at or above their threshold."),
        click.option("--state", type=click.Choice(["done", "not_applicable", "rejected", "duplicate", "failed",
                                                   "queued", "processing"]), help="Only instances in this state."),
        click.option("--model", help="Only this model name."),
        click.option("--model-version", help="Only this model version."),
        click.option("--since", type=click.DateTime(), help="Processed at or after (UTC), e.g. 2026-01-31."),
        click.option("--until", type=click.DateTime(), help="Processed before (UTC)."),
        click.option("--accession", help="Only this accession number."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filter(kw: dict[str, Any]) -> Any:
    from xraybatch.db.export import ResultFilter

    def utc(value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    return ResultFilter(
        target=kw.pop("target"), min_probability=kw.pop("min_probability"),
        positive=True if kw.pop("positive_only") else None, state=kw.pop("state"), model=kw.pop("model"),
        model_version=kw.pop("model_version"), since=utc(kw.pop("since")), until=utc(kw.pop("until")),
        accession=kw.pop("accession"),
    )


def _open_session(settings: Settings) -> Any:
    """A session on the existing results DB, for the read-only commands: nothing is created."""
    from xraybatch.db import session

    return session.make_sessionmaker(session.open_existing(settings.db_url))()


@results.command("export")
@click.option("--what", type=click.Choice(["predictions", "instances", "outputs"]), required=True,
              help="predictions: one row per instance, model and target; instances: one row per input file; "
                   "outputs: one row per output and destination (delivery state).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), required=True, help="Output format.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default: stdout).")
@filter_options
@settings_options
def results_export(what: str, fmt: str, out: Path | None, settings: Settings, **kw: Any) -> None:
    """Export results as CSV or JSON.

    Example:

        xraybatch results export --workdir ./xraybatch-data --what predictions --format csv --out predictions.csv

        xraybatch results export --db postgresql://xraybatch@db/xraybatch --what instances --format json --state rejected

        xraybatch results export --workdir ./xraybatch-data --what outputs --format csv
    """
    from xraybatch.db.export import write_export

    flt = _filter(kw)

    def export() -> int:
        with _open_session(settings) as s:
            if out is None:
                return write_export(s, what, fmt, sys.stdout, flt)  # type: ignore[arg-type]
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", encoding="utf-8", newline="") as fh:
                return write_export(s, what, fmt, fh, flt)  # type: ignore[arg-type]

    count = _run(export)
    if out is not None:
        click.echo(f"wrote {count} {what} rows to {out}", err=True)


@results.command("list")
@click.option("--what", type=click.Choice(["predictions", "instances"]), default="instances", show_default=True)
@click.option("--limit", type=int, default=50, show_default=True, help="Show at most this many rows.")
@filter_options
@settings_options
def results_list(what: str, limit: int, settings: Settings, **kw: Any) -> None:
    """Show results as a table in the terminal.

    Example:

        xraybatch results list --what predictions --target Pneumonia --positive-only --since 2026-11-01
    """
    from itertools import islice

    from rich.console import Console
    from rich.table import Table

    from xraybatch.db.export import iter_rows

    columns = {
        "instances": ["received_at", "sop_instance_uid", "state", "reason"],
        "predictions": ["finished_at", "sop_instance_uid", "model", "target", "probability", "positive"],
    }[what]
    flt = _filter(kw)
    table = Table(*columns)

    def fill() -> int:
        with _open_session(settings) as s:
            rows = list(islice(iter_rows(s, what, flt), limit))  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c] or "") for c in columns))
        return len(rows)

    count = _run(fill)
    Console().print(table)
    click.echo(f"{count} rows (limit {limit})", err=True)


# -- db, models, config -----------------------------------------------------------------------------------


@main.group("db")
def db() -> None:
    """Manage the results database schema (Alembic migrations).

    Example:

        xraybatch db upgrade --db postgresql://xraybatch@db/xraybatch
    """


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@settings_options
def db_upgrade(revision: str, settings: Settings) -> None:
    """Create or migrate the results database to REVISION.

    Example:

        xraybatch db upgrade --workdir ./xraybatch-data
    """
    from xraybatch.db import session

    url = settings.db_url
    if url.startswith("sqlite"):
        settings.workdir.mkdir(parents=True, exist_ok=True)
    _run(lambda: session.upgrade(url, revision))
    click.echo(f"database at revision {_run(lambda: session.current_revision(url))}")


@db.command("current")
@settings_options
def db_current(settings: Settings) -> None:
    """Print the database's schema revision.

    Example:

        xraybatch db current --workdir ./xraybatch-data
    """
    from xraybatch.db import session

    click.echo(str(_run(lambda: session.current_revision(settings.db_url))))


@main.group("models")
def models() -> None:
    """Inspect model bundles.

    Example:

        xraybatch models list
    """


@models.command("list")
@click.option("--bundle", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Bundle directory (repeatable); default: the shipped bundles.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the weights' sha256.")
def models_list(bundles: tuple[Path, ...], verify: bool) -> None:
    """List the installed model bundles with their targets and thresholds.

    Example:

        xraybatch models list --bundle ./my-bundle
    """
    from rich.console import Console
    from rich.table import Table

    from xraybatch.models.registry import find_bundles, verify_weights

    specs = _run(lambda: find_bundles(tuple(str(b) for b in bundles)))
    table = Table("name", "version", "task", "architecture", "input", "targets (threshold)", "weights")
    for spec in specs:
        status = "not checked"
        if verify:
            _run(functools.partial(verify_weights, spec))
            status = "sha256 ok"
        targets = ", ".join(f"{t} ({th:.3g})" for t, th in zip(spec.targets, spec.thresholds))
        size = f"{spec.input.size[0]}x{spec.input.size[1]}x{spec.input.channels}"
        table.add_row(spec.name, spec.version, spec.task, spec.architecture, size, targets, status)
    Console(width=200).print(table)


@models.command("export")
@settings_options
@click.option("--bundle", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Bundle directory (repeatable); default: [model] bundles, or the shipped bundles.")
def models_export(settings: Settings, bundles: tuple[Path, ...]) -> None:
    """Export each bundle to ONNX for `[model] backend = "onnxruntime"`, and check it against torch.

    The files go to WORKDIR/models/, named by bundle and weights; run-folder, watch and receive with that
    backend use them (and export them themselves at first use when they are missing).

    Example:

        xraybatch models export --workdir /var/lib/xraybatch
    """
    from xraybatch.infer import load_network
    from xraybatch.models import export
    from xraybatch.models.registry import find_bundles

    chosen = tuple(str(b) for b in bundles) or settings.model.bundles
    for spec in _run(lambda: find_bundles(chosen)):
        net = _run(functools.partial(load_network, spec))
        path = _run(functools.partial(export.export, spec, net, export.onnx_path(spec, settings.models_dir)))
        check = _run(functools.partial(export.load, spec, net, settings.models_dir, 1)).checked
        assert check is not None  # load returns only a checked model
        click.echo(f"{spec.model_id}: {path} (largest difference from torch: probability {check.probability:.1e}, "
                   f"activation {check.activation:.1e})")


@main.group("config")
def config() -> None:
    """Inspect the settings.

    Example:

        xraybatch config show --config /etc/xraybatch.toml
    """


@config.command("show")
@settings_options
def config_show(settings: Settings) -> None:
    """Print the resolved settings as TOML (defaults < file < environment < flags).

    Example:

        XRAYBATCH_DB_URL=postgresql://db/xraybatch xraybatch config show
    """
    click.echo(as_toml(settings), nl=False)


def _add_training_commands() -> None:
    try:
        from training.cli import train
    except ImportError:  # the training package is optional in a slim install
        return
    main.add_command(train)


_add_training_commands()
