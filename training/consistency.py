"""Consistency across encodings, measured: the same validation pictures as DICOM in every encoding, run through
``run-folder``, and the spread of each model's probabilities over the encodings of one picture.

For each bundle: a seeded sample of the ``val`` rows of its ``split_manifest.csv`` (each file checked against
its recorded sha256) is read as training reads it (8-bit grayscale), written in every encoding of
:data:`training.encodings.ENCODINGS` (one Study per picture) into a temporary folder, and processed by
:func:`xraybatch.pipeline.run_folder` with that bundle alone, a results DB in the temporary folder and no
Grad-CAM or DICOM outputs (they come after the predictions and change none of them). Each file's probabilities
are read back from the results DB. The *spread* of a picture and target is max - min of the probability over
the encodings; the report gives, per target and over all targets, its maximum and median over the pictures,
separately over the lossless encodings and over all of them (with lossy JPEG), and per encoding the largest
deviation from the 8-bit MONOCHROME2 file (the form training reads). Target: a maximum spread of at most
:data:`TARGET_MAX_LOSSLESS` over the lossless encodings.

``xraybatch train consistency`` runs it; ``--write-card`` stores the report in the bundle's ``model.json`` under
``metrics["encoding_spread"]`` (the weights and their sha256 stay as they are) and re-renders the model card,
whose "Encoding consistency" section (:func:`spread_card_lines`) shows it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training.encodings import ENCODINGS, REFERENCE, Encoding, read_picture, write_encodings

logger = logging.getLogger(__name__)

TARGET_MAX_LOSSLESS = 0.02  # issue target: the largest spread over the lossless encodings
DEFAULT_PICTURES = 200


def validation_files(bundle: Path, data: Path) -> list[tuple[str, Path, str]]:
    """The ``val`` rows of the bundle's split manifest: (relative name, path under ``data``, recorded sha256).

    Raises
    ------
    ValueError
        When the bundle has no manifest or it has no validation rows, or a file is missing under ``data``.
    """
    from training.splits import read_manifest
    from xraybatch.models.registry import read_bundle

    spec = read_bundle(bundle)
    manifest = bundle / str(spec.meta.get("provenance", {}).get("split_manifest", "split_manifest.csv"))
    if not manifest.is_file():
        raise ValueError(f"bundle {bundle} has no split manifest ({manifest.name}): it names its validation images")
    rows = [r for r in read_manifest(manifest) if r["split"] == "val"]
    if not rows:
        raise ValueError(f"{manifest} has no 'val' rows")
    out = []
    for row in rows:
        path = data / row["file"]
        if not path.is_file():
            raise ValueError(f"validation file {row['file']} of {manifest} is not under {data}; pass the data root "
                             "the bundle was trained on as --data")
        out.append((row["file"], path, row["sha256"]))
    return out


def sample(files: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """A seeded sample of ``n`` items (all when ``n`` is ``None`` or at least ``len(files)``), in input order."""
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n is None or n >= len(files):
        return list(files)
    chosen = np.random.default_rng(seed).choice(len(files), size=n, replace=False)
    return [files[i] for i in sorted(int(i) for i in chosen)]


def summarise(probabilities: np.ndarray, targets: Sequence[str], encodings: Sequence[Encoding]) -> dict[str, Any]:
    """Spread statistics of ``probabilities`` (pictures, encodings, targets); NaN marks a file with no result.

    A picture enters a subset (lossless, all) only when every encoding of the subset has a result.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 3 or p.shape[1] != len(encodings) or p.shape[2] != len(targets):
        raise ValueError(f"probabilities must be (pictures, {len(encodings)}, {len(targets)}), got {p.shape}")
    lossless = [i for i, e in enumerate(encodings) if e.lossless]
    subsets = {"lossless": lossless, "all": list(range(len(encodings)))}
    spreads: dict[str, np.ndarray] = {}
    pictures: dict[str, int] = {}
    for name, cols in subsets.items():
        sub = p[:, cols, :]
        complete = ~np.isnan(sub).any(axis=(1, 2))
        pictures[name] = int(complete.sum())
        spreads[name] = (sub[complete].max(axis=1) - sub[complete].min(axis=1)) if len(cols) else np.zeros((0, 0))

    def stats(values: np.ndarray) -> dict[str, float | None]:
        if values.size == 0:
            return {"max": None, "median": None}
        return {"max": round(float(values.max()), 6), "median": round(float(np.median(values)), 6)}

    report: dict[str, Any] = {
        "pictures": pictures,
        "targets": {t: {name: stats(s[:, j]) for name, s in spreads.items()} for j, t in enumerate(targets)},
        "overall": {name: stats(s) for name, s in spreads.items()},
    }
    names = [e.name for e in encodings]
    if REFERENCE.name in names:
        ref = p[:, names.index(REFERENCE.name), :]
        deviation = {}
        for i, enc in enumerate(encodings):
            diff = np.abs(p[:, i, :] - ref)
            deviation[enc.name] = stats(diff[~np.isnan(diff)])
        report["deviation_from_reference"] = {"reference": REFERENCE.name, "per_encoding": deviation}
    worst = report["overall"]["lossless"]["max"]
    report["meets_target"] = worst is not None and worst <= TARGET_MAX_LOSSLESS
    return report


def measure_bundle(
    bundle: Path,
    data: Path,
    n: int | None = DEFAULT_PICTURES,
    seed: int = 0,
    threads: int = 2,
    encodings: Sequence[Encoding] = ENCODINGS,
    keep: Path | None = None,
    on_file: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """The encoding-spread report of one bundle (see the module docstring).

    Parameters
    ----------
    bundle, data
        The model bundle and the data root it was trained on (its manifest's file names are relative to it).
    n, seed
        How many validation pictures (a sample drawn with ``seed``; all when ``None`` or more than there are).
    threads
        torch threads of the pipeline's models.
    encodings
        The encodings written; the default is every one of :data:`~training.encodings.ENCODINGS`.
    keep
        A folder for the DICOM files and the results DB, kept afterwards; a temporary folder otherwise.
    on_file
        Called with each file's Outcome as ``run-folder`` ends it (progress).

    Raises
    ------
    ValueError
        When the manifest's validation files are not under ``data`` or changed, or a picture is constant.
    ModelError, PersistError
        When the bundle or the results DB cannot be loaded.
    """
    from xraybatch.models.registry import read_bundle

    spec = read_bundle(bundle)
    files = []
    for name, path, digest in sample(validation_files(bundle, data), n, seed):
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{name} changed since the manifest was written (sha256 differs)")
        files.append((name, path))
    view = "AP" if spec.meta.get("provenance", {}).get("layout") == "kermany" else "PA"
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return _measure_in(keep, spec, bundle, data, files, n, seed, threads, encodings, view, on_file)
    with tempfile.TemporaryDirectory(prefix="xraybatch-consistency-") as tmp:
        return _measure_in(Path(tmp), spec, bundle, data, files, n, seed, threads, encodings, view, on_file)


def _measure_in(root: Path, spec: Any, bundle: Path, data: Path, files: Sequence[tuple[str, Path]], n: int | None,
                seed: int, threads: int, encodings: Sequence[Encoding], view: str,
                on_file: Callable[[Any], None] | None) -> dict[str, Any]:
    from xraybatch import __version__
    from xraybatch.db import session as db_session
    from xraybatch.db.export import ResultFilter, iter_rows
    from xraybatch.pipeline import run_folder
    from xraybatch.settings import IngestConfig, load_settings

    inbox = root / "in"
    where: dict[str, tuple[int, int]] = {}  # SOP Instance UID -> (picture, encoding)
    smallest = IngestConfig().min_size
    start = time.perf_counter()
    for i, (_name, path) in enumerate(files):
        picture = read_picture(path)
        if int(picture.min()) == int(picture.max()):
            raise ValueError(f"validation picture {path} is constant: it has no contrast to encode")
        smallest = min(smallest, *picture.shape)
        written = write_encodings(picture, inbox, f"{i:05d}", encodings, view=view)
        for j, enc in enumerate(encodings):
            where[written[enc.name][1]] = (i, j)
    write_seconds = time.perf_counter() - start
    settings = load_settings(None, {
        "workdir": str(root / "work"),
        "ingest": {"min_size": smallest},  # small training pictures (NIH 64 px) are measured too
        "pipeline": {"decode_processes": 1},
        "model": {"bundles": [str(bundle)], "threads": threads},
        "explain": {"enabled": False},
        "output": {"secondary_capture": False, "structured_report": False, "parametric_map": False},
        "db": {"url": ""},
    }, environ={})
    summary = run_folder(inbox, settings, on_file)
    engine = db_session.make_engine(settings.db_url)
    try:
        with db_session.make_sessionmaker(engine)() as s:
            instances = list(iter_rows(s, "instances", ResultFilter()))
            predictions = list(iter_rows(s, "predictions", ResultFilter(model=spec.name, model_version=spec.version)))
    finally:
        engine.dispose()
    targets = list(spec.targets)
    probs = np.full((len(files), len(encodings), len(targets)), np.nan)
    for row in predictions:
        i, j = where[str(row["sop_instance_uid"])]
        probs[i, j, targets.index(str(row["target"]))] = float(row["probability"])  # type: ignore[arg-type]
    not_done = []
    for row in instances:
        if row["state"] != "done":
            i, j = where.get(str(row["sop_instance_uid"]), (-1, -1))
            not_done.append({"file": files[i][0] if i >= 0 else "", "encoding": encodings[j].name if j >= 0 else "",
                             "state": row["state"], "reason": row["reason"]})
    if not_done:
        logger.warning("%d of %d files did not end done, e.g. %s", len(not_done), len(where), not_done[0])
    report = summarise(probs, targets, encodings)
    worst = _worst(probs, files, targets, encodings)
    return {
        "model": spec.model_id,
        "bundle": str(bundle),
        "preprocessing": spec.preprocess.to_meta(),
        "data": str(data),
        "sample": {"source": "val rows of split_manifest.csv", "n": len(files), "requested": n, "seed": seed},
        "encodings": [{"name": e.name, "description": e.description, "lossless": e.lossless} for e in encodings],
        "files": len(where),
        "counts": dict(summary.counts),
        "not_done": not_done,
        **report,
        "target_max_lossless": TARGET_MAX_LOSSLESS,
        "worst": worst,
        "seconds": {"write_files": round(write_seconds, 2), "run_folder": round(summary.seconds, 2),
                    "run_folder_per_file": round(summary.seconds / max(len(where), 1), 4)},
        "measured_with": f"xraybatch {__version__} run-folder",
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _worst(probs: np.ndarray, files: Sequence[tuple[str, Path]], targets: Sequence[str],
           encodings: Sequence[Encoding]) -> dict[str, Any]:
    """The picture and target of the largest spread, per subset, with each encoding's probability."""
    out: dict[str, Any] = {}
    for subset in ("lossless", "all"):
        cols = [j for j, e in enumerate(encodings) if e.lossless or subset == "all"]
        sub = probs[:, cols, :]
        filled = np.nan_to_num(sub, nan=0.0)
        spread = np.where(np.isnan(sub).any(axis=1), -1.0, filled.max(axis=1) - filled.min(axis=1))
        if spread.size == 0 or spread.max() < 0:
            continue
        i, t = (int(v) for v in np.unravel_index(int(np.argmax(spread)), spread.shape))
        out[subset] = {"file": files[i][0], "target": targets[t], "spread": round(float(spread[i, t]), 6),
                       "probabilities": {encodings[j].name: round(float(probs[i, j, t]), 6) for j in cols}}
    return out


# -- presentation -----------------------------------------------------------------------------------------


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def spread_table(report: Mapping[str, Any]) -> str:
    """Markdown: per target and over all targets, the max and median spread (lossless, all encodings)."""
    rows = ["| target | lossless max | lossless median | all max | all median |", "|---|---|---|---|---|"]
    entries = [*report["targets"].items(), ("**all targets**", report["overall"])]
    for name, s in entries:
        rows.append(f"| {name} | {_cell(s['lossless']['max'])} | {_cell(s['lossless']['median'])} "
                    f"| {_cell(s['all']['max'])} | {_cell(s['all']['median'])} |")
    deviation = report.get("deviation_from_reference")
    if deviation:
        parts = [f"`{name}` {_cell(s['max'])}" for name, s in deviation["per_encoding"].items()
                 if name != deviation["reference"]]
        rows.append(f"\nLargest |p - p(`{deviation['reference']}`)| per encoding: " + ", ".join(parts) + ".")
    return "\n".join(rows)


def spread_summary(report: Mapping[str, Any]) -> str:
    """One line: model, pictures, the overall maxima and whether the lossless target is met."""
    overall = report["overall"]
    verdict = "meets" if report["meets_target"] else "misses"
    return (f"{report['model']} ({report['preprocessing']['contrast']}): {report['sample']['n']} pictures x "
            f"{len(report['encodings'])} encodings; max spread lossless {_cell(overall['lossless']['max'])}, all "
            f"{_cell(overall['all']['max'])}; {verdict} the lossless target <= {report['target_max_lossless']}; "
            f"{report['seconds']['run_folder_per_file']:.3f} s per file in run-folder")


def spread_card_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The model card's "Encoding consistency" section, from ``metrics["encoding_spread"]`` (none without it)."""
    report = metrics.get("encoding_spread")
    if not report:
        return []
    lossless = ", ".join(f"`{e['name']}`" for e in report["encodings"] if e["lossless"])
    lossy = ", ".join(f"`{e['name']}`" for e in report["encodings"] if not e["lossless"])
    return [
        "## Encoding consistency",
        (f"{report['sample']['n']} validation pictures (seed {report['sample']['seed']}, from the split manifest) "
         f"written as DICOM in {len(report['encodings'])} encodings, lossless: {lossless}; lossy: {lossy}; run "
         f"through `run-folder` ({report['measured_with']}, {report['measured_at']}). Spread = max - min of a "
         "probability over the encodings of one picture; target: max <= "
         f"{report['target_max_lossless']} over the lossless encodings "
         f"(**{'met' if report['meets_target'] else 'not met'}**)."),
        "",
        spread_table(report),
        "",
        (f"Reproduce: `xraybatch train consistency BUNDLE --data DATA_ROOT --n {report['sample']['n']} --seed "
         f"{report['sample']['seed']}` (docs/training.md)."),
        "",
    ]


def write_card(bundle: Path, report: Mapping[str, Any]) -> Path:
    """Store ``report`` as ``metrics["encoding_spread"]`` in the bundle's ``model.json`` and refresh the card.

    The weights must still match the sha256 in ``model.json`` (checked first); only ``model.json`` (written
    atomically, every other field as it was) and ``model_card.md`` change.

    Raises
    ------
    ModelError
        When the weights do not match their recorded sha256.
    """
    from training.evaluate import refresh_model_card
    from xraybatch.models.registry import read_bundle, verify_weights

    verify_weights(read_bundle(bundle))
    path = bundle / "model.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.setdefault("metrics", {})["encoding_spread"] = dict(report)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(partial, path)
    verify_weights(read_bundle(bundle))
    return refresh_model_card(bundle)
