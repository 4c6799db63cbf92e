"""The order of the stages, and the only per-file catch-all.

    file -> ingest -> preprocess -> infer -> input gate -> explain -> write back -> persist

:class:`Processor` holds what is loaded once per process (model bundles, the database engine) and takes a
batch of rows claimed from the queue through every stage (:meth:`Processor.process_claimed`, the executor of
the worker loop in :mod:`xraybatch.loop`), recording one :class:`~xraybatch.domain.Outcome` per row. Every
file ends in exactly one final state: ``InvalidInputError`` -> ``rejected``, ``NotApplicableError`` ->
``not_applicable``, a good copy of an instance another copy already ended ``done`` or ``not_applicable`` ->
``duplicate`` (decided only after the file was judged), any other error -> ``failed`` (logged with its
traceback).

:func:`run_folder` is ``xraybatch run-folder``: its source (:func:`take_in_folder`) queues every file of a
folder in place, and the worker loop drains the queue.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xraybatch import gate, ingest, logs, preprocess
from xraybatch.domain import (
    DisplayImage,
    InstanceHeader,
    ModelInput,
    Outcome,
    State,
    XrayImage,
    file_ref,
    path_text,
    path_to_db,
)
from xraybatch.errors import (
    InvalidInputError,
    NotApplicableError,
    PersistError,
    WriteBackError,
    XrayBatchError,
)
from xraybatch.lifetime import install_stop_handlers
from xraybatch.models.registry import ModelPreprocess
from xraybatch.settings import IngestConfig, PreprocessConfig, Settings, for_worker, worker_count

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from sqlalchemy.orm import Session, sessionmaker

    from xraybatch.db.queue import Claimed
    from xraybatch.infer import Predictor

logger = logging.getLogger(__name__)


@dataclass
class _Clock:
    """Per-stage wall times of one file."""

    timings: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._last
        self._last = now


@dataclass(frozen=True)
class _Admitted:
    """A claimed chest radiograph whose header passed every check, waiting to be decoded."""

    instance_id: int
    received_path: Path  # where the file arrived (``header.path`` is where it is read from)
    header: InstanceHeader
    timings: dict[str, float]


@dataclass(frozen=True)
class _Prepared:
    """A claimed, decoded and preprocessed image waiting for inference."""

    instance_id: int
    received_path: Path
    image: XrayImage
    display: DisplayImage
    inputs: dict[tuple[ModelPreprocess, tuple[int, int]], ModelInput]  # one per distinct (preprocessing, size)
    timings: dict[str, float]


def _decode(header: InstanceHeader, cfg: PreprocessConfig,
            plans: Sequence[tuple[ModelPreprocess, tuple[int, int]]]) -> _Prepared:
    """Decode and preprocess one file; runs in a worker process when ``decode_processes`` > 1.

    The display image follows the site's ``[preprocess]``; each model input follows its bundle (``plans``).
    """
    clock = _Clock()
    image = ingest.read(header)
    clock.lap("decode")
    display = preprocess.to_display(image, cfg)
    inputs = preprocess.model_inputs(image, list(plans))
    clock.lap("preprocess")
    return _Prepared(-1, header.path, image, display, inputs, clock.timings)


@dataclass(frozen=True)
class RunSummary:
    """Counts per final state and wall time of a run."""

    counts: dict[str, int]  # final state -> files that ended so in this run
    seconds: float  # wall time from the models loaded (one worker) or the first claim (worker processes)
    skipped: int = 0  # files an earlier run over the same folder had already ended: not processed again
    left: int = 0  # files still queued or processing when the run stopped (interrupted): rerun to finish them
    interrupted: str = ""  # the signal that stopped the run early ("SIGINT", "SIGTERM"), or empty

    @property
    def files(self) -> int:
        return sum(self.counts.values())

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0

    @property
    def done_per_second(self) -> float:
        return self.counts.get(State.DONE, 0) / self.seconds if self.seconds > 0 else 0.0


def _failure(path: Path, header: InstanceHeader | None, err: BaseException, timings: dict[str, float]) -> Outcome:
    """The final Outcome for an error raised while reading a file (the per-file catch-all).

    The reason of an unexpected error names its type and where it was raised, never its message: pydicom's
    conversion errors quote the element value (a birth date, a name). The traceback goes to the log with
    every quoted value and date withheld.
    """
    if isinstance(err, NotApplicableError):
        return Outcome(path, State.NOT_APPLICABLE, str(err), header, timings=timings)
    if isinstance(err, InvalidInputError):
        return Outcome(path, State.REJECTED, str(err), header, timings=timings)
    if isinstance(err, XrayBatchError):
        return Outcome(path, State.FAILED, logs.mask_exception_text(str(err)), header, timings=timings)
    where = logs.describe_error(err)
    logger.error(
        "unexpected error while reading %s: %s\n%s", file_ref(path), where, logs.format_exception(err),
        extra={"sop_instance_uid": header.sop_instance_uid if header else "", "stage": "read"},
    )
    return Outcome(path, State.FAILED, f"internal error: {where} (traceback in the log)", header, timings=timings)


def read_received(path: Path, received: Path, cfg: IngestConfig) -> InstanceHeader | Outcome:
    """The header of a file just received (``xraybatch watch``), or its final Outcome if the file stops here.

    The per-file boundary for the daemon's intake: ``InvalidInputError`` -> ``rejected``, any other error ->
    ``failed`` (logged with its traceback), so a file pydicom cannot parse never stops the daemon.

    Parameters
    ----------
    path
        Where the file is read from (the daemon's ``inflight/`` copy).
    received
        Where it arrived, for the Outcome.
    cfg
        ``[ingest]``: size limits.
    """
    try:
        header, _ = ingest.read_header(path, cfg)
    except Exception as err:  # noqa: BLE001 - the per-file boundary
        return _failure(received, None, err, {})
    return header


def _log(outcome: Outcome) -> None:
    """One line per final state; files are named by UID or path digest, failure texts with values withheld."""
    uid = outcome.header.sop_instance_uid if outcome.header else ""
    extra = {"sop_instance_uid": uid, "stage": "pipeline", "state": str(outcome.state)}
    ref = uid or file_ref(outcome.path)
    level = logging.INFO if outcome.state in (State.DONE, State.DUPLICATE, State.NOT_APPLICABLE) else logging.WARNING
    # Reasons of rejected and not-applicable files are ours and name elements only; a failure can carry a
    # library's message (a write-back or inference error), which may quote a value.
    reason = logs.mask_exception_text(outcome.reason) if outcome.state == State.FAILED else outcome.reason
    if reason:
        logger.log(level, "%s %s: %s", outcome.state, ref, reason, extra=extra)
    else:
        logger.log(level, "%s %s", outcome.state, ref, extra=extra)


class Processor:
    """Model bundles and the results DB, loaded once; processes batches of files."""

    def __init__(
        self,
        settings: Settings,
        predictors: Sequence[Predictor],
        sessions: sessionmaker[Session],
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.predictors = list(predictors)
        self.sessions = sessions
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"  # who claims; finish checks it
        self.model_set = ",".join(sorted(p.spec.model_id for p in self.predictors))
        self._plans = list(dict.fromkeys((p.spec.preprocess, p.spec.input.size) for p in self.predictors))
        self._gates = gate.load_gates(self.predictors, settings.gate)
        self._pool: ProcessPoolExecutor | None = None

    @classmethod
    def open(cls, settings: Settings, worker_id: str | None = None, *, migrate: bool = True) -> Processor:
        """Load the model bundles and open (and, with ``[db] auto_upgrade`` and ``migrate``, migrate) the results DB.

        ``worker_id`` names the claims of this process (the worker loop passes its own); ``host:pid`` by default.
        A supervisor migrates once before it starts its workers, which pass ``migrate=False``.

        Raises
        ------
        ModelError
            When no bundle is found or a bundle's weights fail their check.
        PersistError
            When the database cannot be reached or migrated.
        """
        from xraybatch.db import repo, session
        from xraybatch.infer import Predictor, set_threads
        from xraybatch.models.registry import check_preprocessing, find_bundles

        set_threads(settings.model.threads)
        specs = find_bundles(settings.model.bundles)
        check_preprocessing(settings.preprocess, specs)
        predictors = [Predictor(spec, settings.model.backend, settings.models_dir) for spec in specs]
        url = settings.db_url
        if url.startswith("sqlite"):
            settings.workdir.mkdir(parents=True, exist_ok=True)
        engine = session.make_engine(url)
        if settings.db.auto_upgrade and migrate:
            session.upgrade(engine)
        session.require_current(engine)
        sessions = session.make_sessionmaker(engine)
        with sessions() as s:
            repo.register_models(s, specs)
        return cls(settings, predictors, sessions, worker_id)

    # -- per file, before inference ---------------------------------------------------------------------

    def _admit_claimed(self, claimed: Claimed) -> _Admitted | Outcome:
        """Header, selection and the image checks for a claimed row: the file is judged before anything else."""
        cfg = self.settings
        clock = _Clock()
        received = Path(claimed.received_path)
        header: InstanceHeader | None = None
        try:
            header, ds = ingest.read_header(Path(claimed.file_path), cfg.ingest)
            clock.lap("header")
            ingest.select(header, cfg.ingest)
            ingest.check_image(header, ds, cfg.ingest)
            return _Admitted(claimed.instance_id, received, header, clock.timings)
        except Exception as err:  # noqa: BLE001 - the per-file boundary
            outcome = _failure(received, header, err, clock.timings)
        return self._record(outcome, claimed.instance_id)

    def _prepare(self, admitted: Sequence[_Admitted]) -> list[_Prepared | Outcome]:
        """Decode and preprocess, in worker processes when configured; failures become final Outcomes."""
        cfg = self.settings
        if self._pool is None and cfg.pipeline.decode_processes > 1 and len(admitted) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from xraybatch.lifetime import die_with_parent

            self._pool = ProcessPoolExecutor(
                cfg.pipeline.decode_processes, mp_context=multiprocessing.get_context("forkserver"),
                initializer=die_with_parent, initargs=(os.getpid(),),
            )
        if self._pool is not None and len(admitted) > 1:
            futures = [self._pool.submit(_decode, a.header, cfg.preprocess, self._plans) for a in admitted]
            results: list[Any] = []
            for future in futures:
                try:
                    results.append(future.result())
                except Exception as err:  # noqa: BLE001 - re-raised in the worker, judged below
                    results.append(err)
        else:
            results = []
            for a in admitted:
                try:
                    results.append(_decode(a.header, cfg.preprocess, self._plans))
                except Exception as err:  # noqa: BLE001 - judged below
                    results.append(err)
        prepared: list[_Prepared | Outcome] = []
        for a, result in zip(admitted, results):
            if isinstance(result, _Prepared):
                prepared.append(replace(
                    result, instance_id=a.instance_id, received_path=a.received_path,
                    timings={**a.timings, **result.timings},
                ))
            else:
                outcome = _failure(a.received_path, a.header, result, a.timings)
                prepared.append(self._record(outcome, a.instance_id))
        return prepared

    def _record(self, outcome: Outcome, instance_id: int) -> Outcome:
        """Store ``outcome`` on the claimed row and log it; ``recorded`` says whether it was.

        A claimed row is finished only while this worker still holds it; a ``done`` that another copy of the
        instance beat is stored as a ``duplicate`` (:func:`~xraybatch.db.repo.finish_claimed`).
        """
        from xraybatch.db import repo

        with self.sessions() as s:
            stored = repo.finish_claimed(s, instance_id, outcome, self.worker_id)
        if stored is None:
            return replace(outcome, recorded=False)
        _log(stored)
        return stored

    def _not_duplicates(self, prepared: Sequence[_Prepared | Outcome]) -> list[_Prepared | Outcome]:
        """Judged files whose instance another copy already ended done or not applicable become duplicates."""
        from xraybatch.db import repo

        out: list[_Prepared | Outcome] = []
        for item in prepared:
            if isinstance(item, _Prepared):
                header = item.image.header
                with self.sessions() as s:
                    first = repo.holder(s, header.sop_instance_uid, self.model_set, item.instance_id)
                if first is not None:
                    judged = Outcome(item.received_path, State.DONE, "", header, timings=item.timings)
                    out.append(self._record(repo.duplicate_of(judged, first), item.instance_id))
                    continue
            out.append(item)
        return out

    # -- per batch --------------------------------------------------------------------------------------

    def process_claimed(self, claimed: Sequence[Claimed]) -> list[Outcome]:
        """Take a claimed batch through every stage; one recorded Outcome per row, in order.

        Each file is judged first (header, selection, image checks, decode); only then is a copy of an instance
        that another copy already ended ``done`` or ``not_applicable`` called a ``duplicate``. Every error of a
        file ends that file (the per-file boundary); only an unreachable results DB (``PersistError``) leaves
        the batch, for the worker to release its rows and retry.
        """
        admitted = [self._admit_claimed(c) for c in claimed]
        decoded = iter(self._not_duplicates(self._prepare([r for r in admitted if isinstance(r, _Admitted)])))
        results = [next(decoded) if isinstance(r, _Admitted) else r for r in admitted]
        ready = [r for r in results if isinstance(r, _Prepared)]
        finished: dict[int, Outcome] = {}
        if ready:
            try:
                finished = self._infer_and_write(ready)
            except PersistError:
                raise  # the DB is unreachable: a transient fault, not a reason to fail these files
            except Exception as err:  # noqa: BLE001 - a broken batch fails its files, not the run
                where = logs.describe_error(err)
                logger.error("inference failed for a batch of %d images: %s\n%s", len(ready), where,
                             logs.format_exception(err), extra={"stage": "infer"})
                for item in ready:
                    outcome = Outcome(
                        item.received_path, State.FAILED, f"internal error during inference: {where}",
                        item.image.header, timings=item.timings,
                    )
                    finished[item.instance_id] = self._record(outcome, item.instance_id)
        return [finished[r.instance_id] if isinstance(r, _Prepared) else r for r in results]

    def close(self) -> None:
        """Stop the decode worker processes."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _infer_and_write(self, ready: Sequence[_Prepared]) -> dict[int, Outcome]:
        from xraybatch import explain, writeback

        start = time.perf_counter()
        features = []
        per_model = []
        for predictor in self.predictors:
            plan = (predictor.spec.preprocess, predictor.spec.input.size)
            feats = predictor.forward([item.inputs[plan] for item in ready])
            features.append(feats)
            per_model.append(predictor.to_predictions(feats))
        verdicts = gate.judge(self._gates, features)
        infer_each = (time.perf_counter() - start) / len(ready)

        outcomes: dict[int, Outcome] = {}
        for i, item in enumerate(ready):
            clock = _Clock(dict(item.timings))
            clock.timings["infer"] = infer_each
            predictions = tuple(preds[i] for preds in per_model)
            header = item.image.header
            try:
                if not verdicts[i].passed:
                    raise NotApplicableError(verdicts[i].text)
                any_input = next(iter(item.inputs.values()))
                heatmaps = explain.gradcam(
                    self.predictors, features, i, any_input, predictions, self.settings.explain,
                    explain.output_max_side(self.settings.output),
                )
                clock.lap("explain")
                outputs = writeback.write_outputs(
                    item.image.dataset, item.display, predictions, heatmaps, self.settings.output,
                    self.settings.outbox,
                )
                clock.lap("writeback")
                outcome = Outcome(
                    item.received_path, State.DONE, "", header, predictions, outputs,
                    item.display.notes + ((verdicts[i].text,) if verdicts[i].text else ()), clock.timings,
                )
            except NotApplicableError as err:  # the input gate: no findings, no outputs
                outcome = Outcome(item.received_path, State.NOT_APPLICABLE, str(err), header, timings=clock.timings)
            except InvalidInputError as err:  # e.g. a source UID that cannot name an output
                outcome = Outcome(
                    item.received_path, State.REJECTED, str(err), header, predictions, timings=clock.timings,
                )
            except XrayBatchError as err:
                outcome = Outcome(
                    item.received_path, State.FAILED, str(err), header, predictions, timings=clock.timings,
                    retryable=isinstance(err, WriteBackError),
                )
            except Exception as err:  # noqa: BLE001 - the per-file boundary: the reason says where, not the message
                where = logs.describe_error(err)
                logger.error(
                    "unexpected error while explaining or writing %s: %s\n%s", header.sop_instance_uid, where,
                    logs.format_exception(err), extra={"sop_instance_uid": header.sop_instance_uid, "stage": "write"},
                )
                outcome = Outcome(
                    item.received_path, State.FAILED, f"internal error: {where} (traceback in the log)", header,
                    predictions, timings=clock.timings,
                )
            persist = time.perf_counter()
            outcome = self._record(outcome, item.instance_id)
            outcome = replace(outcome, timings={**outcome.timings, "persist": time.perf_counter() - persist})
            outcomes[item.instance_id] = outcome
        return outcomes


def iter_files(root: Path, *, report: bool = True) -> Iterator[Path]:
    """Every regular file under ``root``, recursively, in sorted order, whatever its name or extension.

    Symbolic links, FIFOs, sockets and devices are never opened (reading a FIFO would block forever); with
    ``report``, each one is logged once, by its path digest.
    """
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            kind = _not_regular(path)
            if kind is None:
                yield path
            elif report:
                logger.warning("skipped %s: %s; run-folder reads regular files only", file_ref(path), kind,
                               extra={"stage": "run-folder"})


def _not_regular(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file (``None`` for a regular file)."""
    import stat

    try:
        mode = path.lstat().st_mode
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file"


def folder_source(root: Path) -> str:
    """``instances.source`` of the rows of a ``run-folder`` run over ``root`` (a resolved path)."""
    from xraybatch.db.tables import FOLDER_SOURCE_PREFIX

    return FOLDER_SOURCE_PREFIX + str(root)


def take_in_folder(
    root: Path,
    settings: Settings,
    model_set: str,
    sessions: sessionmaker[Session],
    stop: threading.Event,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> int:
    """``run-folder``'s source: queue every file under ``root`` in place; returns the files already final.

    A file that an earlier run over the same folder ended (``done``, ``not_applicable``, ``rejected``,
    ``duplicate``) is not queued again: rerunning resumes. A ``failed`` one is judged again. A file whose row is
    still queued or processing (an interrupted run) is left to the queue, where the rescuer returns the rows of
    dead workers. An unreadable header ends the file here (``rejected``, or ``failed`` for our own error).
    """
    from xraybatch.db import queue, repo

    source = folder_source(root)
    with sessions() as s:
        known = queue.rows_of_source(s, source)
    already = 0
    for path in iter_files(root):
        if stop.is_set():
            break
        row = known.get(path_text(path))
        if row is not None:
            instance_id, state = row
            if state != State.FAILED.value:
                already += State(state).is_final
                continue
            with sessions() as s:
                queue.forget(s, instance_id)  # judged again below: one row per input
        read = read_received(path, path, settings.ingest)
        with sessions() as s:
            if isinstance(read, Outcome):
                repo.record_unclaimed(s, read, model_set, file_path=path_to_db(path), source=source)
            else:
                queue.enqueue(s, read, path_text(path), path_to_db(path), model_set, source)
        if isinstance(read, Outcome):
            _log(read)
            if on_outcome is not None:
                on_outcome(read)
    return already


def run_folder(
    input_dir: Path,
    settings: Settings,
    on_outcome: Callable[[Outcome], None] | None = None,
    *,
    workers: int | None = None,
    files: int | None = None,
) -> RunSummary:
    """Process every regular file under ``input_dir`` once, through the shared queue; input files stay in place.

    The files are queued (source ``run-folder:<folder>``) and drained by the worker loop of
    :mod:`xraybatch.loop` (claims, leases, heartbeat, the rescuer), in this process or, with ``workers`` > 1, in
    that many worker processes. Rerunning over the same folder resumes: only files not yet final are processed.
    SIGINT/SIGTERM stop claiming; the current batch finishes (within ``[watch] grace_seconds``) or returns to
    the queue, and the summary says ``interrupted``.

    Parameters
    ----------
    input_dir
        Folder (searched recursively) or a single file.
    settings
        The resolved settings; outputs go to ``settings.outbox``, results to ``settings.db_url``.
    on_outcome
        Called after each file that ends in this run, e.g. to advance a progress bar.
    workers
        Worker processes; 1 runs the loop in this process, 0 one per core (at most one per batch of the folder's
        files and one per 2 GiB of free memory, :func:`xraybatch.settings.worker_count`); ``None`` takes
        ``[pipeline] workers``. Several workers share the cores
        (:func:`xraybatch.settings.for_worker`).
    files
        How many files :func:`iter_files` finds under ``input_dir``, when the caller has already counted them
        (e.g. for a progress bar): the default worker count needs it, and a large folder is then walked once
        less.

    Raises
    ------
    InvalidInputError
        When ``input_dir`` does not exist.
    ModelError, PersistError
        When the models or the database cannot be loaded; no file is touched then.
    """
    from xraybatch.db import session
    from xraybatch.loop import FolderRun, run_processes
    from xraybatch.models.registry import find_bundles

    if not input_dir.exists():
        raise InvalidInputError(f"input folder {input_dir} does not exist")
    if workers is None:
        workers = settings.pipeline.workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    root = input_dir.resolve()
    if workers == 0:
        if files is None:
            files = sum(1 for _ in iter_files(root, report=False))
        workers = worker_count(0, files, settings.pipeline.batch_size)
    model_set = ",".join(sorted(spec.model_id for spec in find_bundles(settings.model.bundles)))
    url = settings.db_url
    if url.startswith("sqlite"):
        settings.workdir.mkdir(parents=True, exist_ok=True)
    engine = session.make_engine(url)
    if settings.db.auto_upgrade:
        session.upgrade(engine)  # once, before any worker starts
    session.require_current(engine)
    sessions = session.make_sessionmaker(engine)
    started = datetime.now(UTC)
    start = time.perf_counter()
    skipped = 0

    def intake(stop: threading.Event, callback: Callable[[Outcome], None] | None) -> None:
        nonlocal skipped
        skipped = take_in_folder(root, settings, model_set, sessions, stop, callback)

    try:
        if workers == 1:
            worker = FolderRun(root, settings, threading.Event(), on_outcome)
            restore = worker.install_signal_handlers()
            failure: list[BaseException] = []

            def fill() -> None:
                try:
                    intake(worker.stop, on_outcome)
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    failure.append(err)
                    worker.stop.set()
                finally:
                    worker.intake_done.set()  # type: ignore[union-attr]

            filler = threading.Thread(target=fill, name="run-folder-intake", daemon=True)
            filler.start()
            try:
                worker.run(migrate=False)
            finally:
                restore()
                worker.stop.set()
                filler.join()
            if failure:
                raise failure[0]
            signum = worker.signal_received
            start = worker.ready_at or start  # the run's time, without loading the models (as before)
        else:
            supervisor = _Supervisor()
            restore = supervisor.install()
            seen: set[int] = set()

            def poll() -> None:
                if on_outcome is None:
                    return
                from xraybatch.db import queue

                with sessions() as s:
                    for outcome_id, outcome in queue.finished_since(s, folder_source(root), started, seen):
                        seen.add(outcome_id)
                        on_outcome(outcome)

            try:
                run_processes(root, for_worker(settings, workers), workers, lambda: intake(supervisor.stop, None),
                              supervisor.stop, poll)
            finally:
                restore()
            signum = supervisor.signal_received
            from xraybatch.db import queue

            with sessions() as s:  # the run's time from the first claim, as with one worker (not the start-up)
                first = queue.first_claim(s, folder_source(root), started)
            if first is not None:
                start = time.perf_counter() - max(0.0, (datetime.now(UTC) - first).total_seconds())
        with sessions() as s:
            from xraybatch.db import queue

            counts = queue.finished_counts(s, folder_source(root), started)
            left = queue.pending(s, folder_source(root))
    finally:
        engine.dispose()
    return RunSummary(
        counts=counts, seconds=time.perf_counter() - start, skipped=skipped, left=left,
        interrupted=signal.Signals(signum).name if signum is not None else "",
    )


class _Supervisor:
    """The stop event of ``run-folder --workers N``: the first SIGINT/SIGTERM sets it, a second exits at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signal_received: int | None = None

    def install(self) -> Callable[[], None]:
        return install_stop_handlers(self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signal_received is not None:
            os._exit(128 + signum)  # the workers die with this process (parent-death signal), releasing their rows
        self.signal_received = signum
        self.stop.set()
