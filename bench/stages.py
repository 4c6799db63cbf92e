"""Per-stage time of one radiograph, and run-folder throughput over N copies. Reports medians, not tests.

    .venv/bin/python bench/stages.py                      # RG1_J2KI (1955x1841 JPEG 2000), shipped bundles
    .venv/bin/python bench/stages.py --file X.dcm --bundle DIR --repeat 7 --copies 50

Each copy for the throughput run gets a new SOP Instance UID (otherwise it would be a duplicate); the pixel
data keeps its encoding. Numbers depend on the machine: compare ratios on the same machine.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from xraybatch import explain, ingest, preprocess, writeback
from xraybatch.infer import Predictor, set_threads
from xraybatch.models.registry import find_bundles
from xraybatch.pipeline import run_folder
from xraybatch.settings import load_settings


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def stages(path: Path, bundles: tuple[str, ...], repeat: int) -> None:
    settings = load_settings(None, {"model": {"bundles": list(bundles)}}, environ={})
    set_threads(settings.model.threads)
    predictors = [Predictor(spec) for spec in find_bundles(settings.model.bundles)]
    rows: list[tuple[str, float]] = []
    t, (header, ds) = _median(lambda: ingest.read_header(path, settings.ingest), repeat)
    rows.append(("read header (stop_before_pixels)", t))
    t, image = _median(lambda: ingest.read(header), repeat)
    rows.append((f"decode {header.rows}x{header.columns} ({ds.file_meta.TransferSyntaxUID.name})", t))
    t, display = _median(lambda: preprocess.to_display(image, settings.preprocess), repeat)
    rows.append(("modality LUT + VOI + MONOCHROME1", t))
    for p in predictors:
        t, inp = _median(lambda p=p: preprocess.to_model_input(display, p.spec.input.size), repeat)
        rows.append((f"resample to {p.spec.input.size} (SimpleITK)", t))
        t, feats = _median(lambda p=p, inp=inp: p.forward([inp]), repeat)
        rows.append((f"infer {p.spec.model_id} (batch 1)", t))
    inputs = {p.spec.input.size: preprocess.to_model_input(display, p.spec.input.size) for p in predictors}
    feats = [p.forward([inputs[p.spec.input.size]]) for p in predictors]
    preds = [p.to_predictions(f)[0] for p, f in zip(predictors, feats)]
    cfg = settings.explain
    everything = type(cfg)(enabled=True, max_findings=99)
    forced = [type(pr)(pr.model_name, pr.model_version, pr.targets, pr.probabilities, (0.0,) * len(pr.targets))
              for pr in preds]  # every target positive: the worst case for Grad-CAM
    any_input = next(iter(inputs.values()))
    t, heatmaps = _median(lambda: explain.gradcam(predictors, feats, 0, any_input, forced, everything), repeat)
    rows.append((f"Grad-CAM, all {len(heatmaps)} targets, head-only backward + map to source", t))
    for m, predictor in enumerate(predictors):  # the Grad-CAM alone, without mapping the maps to the source grid
        targets = list(range(len(preds[m].targets)))
        t, _ = _median(functools.partial(explain.head_cams, predictor, feats[m].activations[0:1], targets), repeat)
        rows.append((f"  of which head-only Grad-CAM, {len(targets)} targets of {predictor.spec.name}", t))
    t, heatmaps3 = _median(lambda: explain.gradcam(predictors, feats, 0, any_input, forced, cfg), repeat)
    rows.append((f"Grad-CAM, max_findings={cfg.max_findings}", t))
    with tempfile.TemporaryDirectory() as tmp:
        t, _ = _median(lambda: writeback.write_outputs(image.dataset, display, preds, heatmaps3, settings.output,
                                                      Path(tmp)), repeat)
    rows.append(("write SC + SR (highdicom, atomic)", t))
    print(f"\nper-stage median of {repeat} runs, {path.name}")
    for name, seconds in rows:
        print(f"  {name:<62} {seconds * 1000:9.1f} ms")


def throughput(path: Path, bundles: tuple[str, ...], copies: int, workers: int = 1) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        inbox = Path(tmp) / "in"
        inbox.mkdir()
        ds = dcmread(path)
        for i in range(copies):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(inbox / f"copy{i:04d}")
        settings = load_settings(None, {"workdir": Path(tmp) / "work", "model": {"bundles": list(bundles)}}, environ={})
        summary = run_folder(inbox, settings, workers=workers) if workers > 1 else run_folder(inbox, settings)
        print(f"\nrun-folder (workers {workers}) over {copies} copies of {path.name}: {summary.counts} in "
              f"{summary.seconds:.1f} s = "
              f"{summary.done_per_second:.2f} images/s ({summary.seconds / copies * 1000:.0f} ms per image)")
        shutil.rmtree(inbox)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, help="DICOM file (default: pydicom-data RG1_J2KI.dcm)")
    parser.add_argument("--bundle", action="append", default=[], help="bundle dir (default: shipped bundles)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--copies", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="run-folder worker processes")
    args = parser.parse_args()
    path = args.file or Path(get_testdata_file("RG1_J2KI.dcm"))
    stages(path, tuple(args.bundle), args.repeat)
    if args.copies:
        throughput(path, tuple(args.bundle), args.copies, args.workers)


if __name__ == "__main__":
    main()
