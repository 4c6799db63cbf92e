"""The order of the stages, and the only per-file catch-all.

    file -> ingest -> preprocess -> infer -> explain -> write back -> persist

:class:`Processor` holds what is loaded once per process (model bundles, the database engine) and turns a
batch of paths into one :class:`~xraybatch.domain.Outcome` per path. Every path ends in exactly one final
state: ``InvalidInputError`` -> ``rejected``, ``NotApplicableError`` -> ``not_applicable``, a SOP Instance UID
that already has a live row -> ``duplicate``, any other error -> ``failed`` (logged with its traceback).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xraybatch import ingest, logs, preprocess
from xraybatch.domain import DisplayImage, InstanceHeader, ModelInput, Outcome, State, XrayImage, file_ref
from xraybatch.errors import (
    InvalidInputError,
    NotApplicableError,
    PersistError,
    WriteBackError,
    XrayBatchError,
)
from xraybatch.settings import IngestConfig, PreprocessConfig, Settings

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
    inputs: dict[tuple[int, int], ModelInput]  # one per distinct model input size
    timings: dict[str, float]


def _decode(header: InstanceHeader, cfg: PreprocessConfig, sizes: Sequence[tuple[int, int]]) -> _Prepared:
    """Decode and preprocess one file; runs in a worker process when ``decode_processes`` > 1."""
    clock = _Clock()
    image = ingest.read(header)
    clock.lap("decode")
    display = preprocess.to_display(image, cfg)
    inputs = {size: preprocess.to_model_input(display, size) for size in sizes}
    clock.lap("preprocess")
    return _Prepared(-1, header.path, image, display, inputs, clock.timings)


@dataclass(frozen=True)
class RunSummary:
    """Counts per final state and wall time of a run."""

    counts: dict[str, int]
    seconds: float

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
        self._sizes = sorted({p.spec.input.size for p in self.predictors})
        self._pool: ProcessPoolExecutor | None = None

    @classmethod
    def open(cls, settings: Settings, worker_id: str | None = None) -> Processor:
        """Load the model bundles and open (and migrate) the results database.

        ``worker_id`` names the claims of this process (``xraybatch watch`` passes its own); ``host:pid`` by default.

        Raises
        ------
        ModelError
            When no bundle is found or a bundle's weights fail their check.
        PersistError
            When the database cannot be reached or migrated.
        """
        from xraybatch.db import repo, session
        from xraybatch.infer import Predictor, set_threads
        from xraybatch.models.registry import find_bundles

        set_threads(settings.model.threads)
        specs = find_bundles(settings.model.bundles)
        predictors = [Predictor(spec) for spec in specs]
        url = settings.db_url
        if url.startswith("sqlite"):
            settings.workdir.mkdir(parents=True, exist_ok=True)
        if settings.db.auto_upgrade:
            session.upgrade(url)
        sessions = session.make_sessionmaker(session.make_engine(url))
        with sessions() as s:
            repo.register_models(s, specs)
        return cls(settings, predictors, sessions, worker_id)

    # -- per file, before inference ---------------------------------------------------------------------

    def _admit(self, path: Path, busy: set[str]) -> _Admitted | Outcome | None:
        """Header, claim and selection: cheap checks in the main process; an Outcome when the file stops here.

        Returns ``None`` for a file whose SOP Instance UID another file of this batch holds (``busy``): it is
        taken up after the batch, when that file has ended, so a damaged first copy cannot shadow a good one.
        """
        from xraybatch.db import repo

        cfg = self.settings
        clock = _Clock()
        header: InstanceHeader | None = None
        instance_id: int | None = None
        try:
            header, ds = ingest.read_header(path, cfg.ingest)
            clock.lap("header")
            if header.sop_instance_uid in busy:
                return None
            busy.add(header.sop_instance_uid)
            with self.sessions() as s:
                instance_id = repo.claim(s, header, self.worker_id, self.model_set)
                live = repo.live_instance(s, header.sop_instance_uid, self.model_set) if instance_id is None else None
            clock.lap("claim")
            if instance_id is None:
                where = f" (instance {live.id}, state {live.state})" if live is not None else ""
                duplicate = Outcome(path, State.DUPLICATE, f"SOP Instance UID already received{where}", header)
                return self._record(duplicate, None)
            ingest.select(header, cfg.ingest)
            ingest.check_image(header, ds, cfg.ingest)
            return _Admitted(instance_id, path, header, clock.timings)
        except Exception as err:  # noqa: BLE001 - the per-file boundary
            outcome = _failure(path, header, err, clock.timings)
        return self._record(outcome, instance_id)

    def _admit_claimed(self, claimed: Claimed) -> _Admitted | Outcome:
        """Header and selection for a row already claimed from the queue (``xraybatch watch``)."""
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

            self._pool = ProcessPoolExecutor(
                cfg.pipeline.decode_processes, mp_context=multiprocessing.get_context("forkserver")
            )
        if self._pool is not None and len(admitted) > 1:
            futures = [self._pool.submit(_decode, a.header, cfg.preprocess, self._sizes) for a in admitted]
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
                    results.append(_decode(a.header, cfg.preprocess, self._sizes))
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

    def _record(self, outcome: Outcome, instance_id: int | None) -> Outcome:
        """Store ``outcome`` (on the claimed row ``instance_id``, if any) and log it; ``recorded`` says whether it was.

        A claimed row is finished only while this worker still holds it (:func:`~xraybatch.db.repo.finish`).
        """
        from xraybatch.db import repo

        with self.sessions() as s:
            if instance_id is None:
                repo.record_unclaimed(s, outcome, self.model_set)
            elif not repo.finish(s, instance_id, outcome, worker_id=self.worker_id):
                return replace(outcome, recorded=False)
        _log(outcome)
        return outcome

    # -- per batch --------------------------------------------------------------------------------------

    def process_batch(self, paths: Sequence[Path]) -> list[Outcome]:
        """Claim and process ``paths`` (run-folder): one forward pass per model for the images that get that far."""
        busy: set[str] = set()
        admitted = [self._admit(p, busy) for p in paths]
        deferred = [p for p, r in zip(paths, admitted) if r is None]
        outcomes = self._complete([r for r in admitted if r is not None])
        return outcomes + (self.process_batch(deferred) if deferred else [])

    def process_claimed(self, claimed: Sequence[Claimed]) -> list[Outcome]:
        """Process rows already claimed from the queue (``xraybatch watch``), one Outcome each, in order."""
        return self._complete([self._admit_claimed(c) for c in claimed])

    def _complete(self, admitted: Sequence[_Admitted | Outcome]) -> list[Outcome]:
        """Decode, infer, explain, write back and record the admitted files; pass the others through."""
        decoded = iter(self._prepare([r for r in admitted if isinstance(r, _Admitted)]))
        results = [next(decoded) if isinstance(r, _Admitted) else r for r in admitted]
        ready = [r for r in results if isinstance(r, _Prepared)]
        finished: dict[int, Outcome] = {}
        if ready:
            try:
                finished = self._infer_and_write(ready)
            except PersistError:
                raise  # the DB is unreachable: a transient fault, not a reason to fail these files
            except Exception as err:  # a broken batch fails its files, not the run
                logger.exception("inference failed for a batch of %d images", len(ready))
                for item in ready:
                    outcome = Outcome(
                        item.received_path, State.FAILED, f"internal error during inference: {err}",
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
            size = predictor.spec.input.size
            feats = predictor.forward([item.inputs[size] for item in ready])
            features.append(feats)
            per_model.append(predictor.to_predictions(feats))
        infer_each = (time.perf_counter() - start) / len(ready)

        outcomes: dict[int, Outcome] = {}
        for i, item in enumerate(ready):
            clock = _Clock(dict(item.timings))
            clock.timings["infer"] = infer_each
            predictions = tuple(preds[i] for preds in per_model)
            header = item.image.header
            try:
                any_input = next(iter(item.inputs.values()))
                heatmaps = explain.gradcam(
                    self.predictors, features, i, any_input, predictions, self.settings.explain
                )
                clock.lap("explain")
                outputs = writeback.write_outputs(
                    item.image.dataset, item.display, predictions, heatmaps, self.settings.output,
                    self.settings.outbox,
                )
                clock.lap("writeback")
                outcome = Outcome(
                    item.received_path, State.DONE, "", header, predictions, outputs, item.display.notes,
                    clock.timings,
                )
            except XrayBatchError as err:
                outcome = Outcome(
                    item.received_path, State.FAILED, str(err), header, predictions, timings=clock.timings,
                    retryable=isinstance(err, WriteBackError),
                )
            except Exception as err:  # the per-file boundary
                logger.exception("unexpected error while explaining or writing %s", header.sop_instance_uid)
                outcome = Outcome(
                    item.received_path, State.FAILED, f"internal error: {type(err).__name__}: {err}", header,
                    predictions,
                )
            persist = time.perf_counter()
            outcome = self._record(outcome, item.instance_id)
            outcome = replace(outcome, timings={**outcome.timings, "persist": time.perf_counter() - persist})
            outcomes[item.instance_id] = outcome
        return outcomes


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root``, recursively, in sorted order, whatever its name or extension."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _chunks(items: Iterable[Path], size: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_folder(
    input_dir: Path,
    settings: Settings,
    on_outcome: Callable[[Outcome], None] | None = None,
    processor: Processor | None = None,
) -> RunSummary:
    """Process every regular file under ``input_dir`` once; input files are left in place.

    Parameters
    ----------
    input_dir
        Folder (searched recursively) or a single file.
    settings
        The resolved settings; outputs go to ``settings.outbox``, results to ``settings.db_url``.
    on_outcome
        Called after each file, e.g. to advance a progress bar.
    processor
        An already opened :class:`Processor` (to reuse loaded models); opened from ``settings`` if omitted.

    Raises
    ------
    InvalidInputError
        When ``input_dir`` does not exist.
    ModelError, PersistError
        When the models or the database cannot be loaded; no file is touched then.
    """
    if not input_dir.exists():
        raise InvalidInputError(f"input folder {input_dir} does not exist")
    owned = processor is None
    processor = processor or Processor.open(settings)
    start = time.perf_counter()
    counts: Counter[str] = Counter()
    try:
        for batch in _chunks(iter_files(input_dir), settings.pipeline.batch_size):
            for outcome in processor.process_batch(batch):
                counts[str(outcome.state)] += 1
                if on_outcome is not None:
                    on_outcome(outcome)
    finally:
        if owned:
            processor.close()
    return RunSummary(counts=dict(counts), seconds=time.perf_counter() - start)
