"""Throughput against the compute floor: the floor, ``run-folder`` end to end and a naive pipeline, on the same
copies of real radiographs. Medians over repeats; a report, never a test.

    .venv/bin/python bench/throughput.py                      # 120 copies of each input, 3 repeats
    .venv/bin/python bench/throughput.py --copies 40 --repeat 1 --input RG1_J2KR --json bench.json

Inputs (each copy has a fresh SOP Instance UID; the pixel data keeps its encoding):

- ``RG1_J2KR``: pydicom-data's 1955x1841 CR chest PA, JPEG 2000 lossless;
- ``RG1_UNCR``: the same image uncompressed;
- ``jpeg-1024``: the 1024x1024 JPEG baseline chest CR in ../shared/data/dicom (torchxrayvision's test file,
  stored as Secondary Capture: the copies get the CR SOP class, which the input rules ask for); left out with
  a note where the shared data is absent.

What is measured, for each input:

(a) **floor**: the work no pipeline can skip: decode, preprocess (the display image and each bundle's model
    input) and both forward passes in batches of ``[pipeline] batch_size``, one process per core, each with one
    torch thread, over the copies split equally between the processes; timed from the moment every process has
    loaded its models.
(b) **run-folder**: ``xraybatch run-folder`` with the default settings (one worker per core), as a user runs it,
    in its own process with a fresh SQLite DB; every output written (SR, SC, parametric maps). Timed from the
    first claim to the last result in the DB (the models' loading is reported apart, as start-up).
(c) **naive**: one process, one file at a time: decode, preprocess, forward, pytorch-grad-cam's ``GradCAM`` on the
    full network with one backward per explained finding (up to ``[explain] max_findings``), the same outputs.

``--backend onnxruntime`` runs (a) and (b) with ``[model] backend = "onnxruntime"`` (the ONNX files exported
once, before anything is timed); compare it with a run of the default ``torch`` backend.

It prints images/s, the ratio (b)/(a), the per-stage medians of (b) (from the timings each row records), the
peak resident memory of each process, start-up (importing the CLI, loading torch and the models, run-folder on
one file) and the drop-to-SR latency of ``watch`` for a single file with ``settle_seconds`` 0.5. Numbers depend
on the machine and on what else runs on it (the load average is printed): compare ratios on one machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ComputedRadiographyImageStorage, generate_uid

ROOT = Path(__file__).resolve().parents[1]
SHARED_JPEG = ROOT.parent / "shared" / "data" / "dicom" / "torchxrayvision_tests" / (
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
WATCH_SETTLE = 0.5


def inputs() -> dict[str, Path | None]:
    return {
        "RG1_J2KR": Path(get_testdata_file("RG1_J2KR.dcm")),
        "RG1_UNCR": Path(get_testdata_file("RG1_UNCR.dcm")),
        "jpeg-1024": SHARED_JPEG if SHARED_JPEG.is_file() else None,
    }


def make_copies(source: Path, folder: Path, copies: int) -> list[Path]:
    """``copies`` files of ``source`` with fresh SOP Instance UIDs (and the CR SOP class)."""
    folder.mkdir(parents=True)
    ds = dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    out = []
    for i in range(copies):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"copy{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- (a) the floor ----------------------------------------------------------------------------------------------

_floor_state: dict[str, Any] = {}


def _floor_init(bundles: tuple[str, ...], backend: str, onnx_folder: Path) -> None:
    from xraybatch.infer import Predictor, set_threads
    from xraybatch.models.registry import find_bundles
    from xraybatch.settings import load_settings

    set_threads(1)
    settings = load_settings(None, {"model": {"bundles": list(bundles)}}, environ={})
    predictors = [Predictor(spec, backend, onnx_folder) for spec in find_bundles(settings.model.bundles)]
    _floor_state.update(settings=settings, predictors=predictors,
                        plans=list(dict.fromkeys((p.spec.preprocess, p.spec.input.size) for p in predictors)))


def _floor_ready(_: int) -> int:
    time.sleep(0.05)  # long enough for the tasks to spread over the processes that are ready
    return os.getpid()


def _floor_share(share: tuple[list[Path], int]) -> tuple[int, float]:
    """One process's share of the floor: its files in batches of ``batch_size``."""
    from xraybatch import ingest
    from xraybatch.pipeline import _decode

    settings, predictors, plans = _floor_state["settings"], _floor_state["predictors"], _floor_state["plans"]
    paths, batch_size = share
    for start in range(0, len(paths), batch_size):
        batch = paths[start: start + batch_size]
        prepared = [_decode(ingest.read_header(p, settings.ingest)[0], settings.preprocess, plans) for p in batch]
        for predictor in predictors:
            plan = (predictor.spec.preprocess, predictor.spec.input.size)
            predictor.to_predictions(predictor.forward([item.inputs[plan] for item in prepared]))
    return len(paths), peak_rss_mb()


def floor(paths: list[Path], bundles: tuple[str, ...], batch_size: int, backend: str,
          onnx_folder: Path) -> dict[str, float]:
    from xraybatch.settings import available_cores

    cores = available_cores()
    # An equal share per process, so that no process idles at the end while another finishes a last batch
    # (15 batches of 8 over two processes would leave one of them a batch behind).
    shares = [(paths[i::cores], batch_size) for i in range(cores)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(cores, initializer=_floor_init, initargs=(bundles, backend, onnx_folder)) as pool:
        ready: set[int] = set()
        while len(ready) < cores:  # every process has loaded its models (the initializer runs before any task)
            ready |= set(pool.map(_floor_ready, range(cores * 4), chunksize=1))
        start = time.perf_counter()
        results = pool.map(_floor_share, shares, chunksize=1)
        seconds = time.perf_counter() - start
    return {"images_per_s": sum(n for n, _ in results) / seconds, "seconds": seconds, "processes": cores,
            "peak_rss_mb": max(rss for _, rss in results)}


# -- (b) run-folder ---------------------------------------------------------------------------------------------


def _ps_peak(pids: set[int], peaks: dict[int, float]) -> None:
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = max(peaks.get(pid, 0.0), int(line.split()[1]) / 1024)


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(c) for c in children)
    return out


def run_folder(
    folder: Path, work: Path, bundles: tuple[str, ...], extra: list[str], backend: str, onnx_folder: Path
) -> dict[str, Any]:
    """``xraybatch run-folder`` in its own process; rate from the first claim to the last result."""
    from sqlalchemy import create_engine, text

    if backend == "onnxruntime":  # the files exported once, as a site's workdir keeps them
        shutil.copytree(onnx_folder, work / "models")

    cmd = [sys.executable, "-m", "xraybatch", "run-folder", str(folder), "--workdir", str(work), "--no-progress",
           *[a for b in bundles for a in ("--bundle", b)], *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "XRAYBATCH_MODEL_BACKEND": backend})
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        _ps_peak(_descendants(proc.pid), peaks)
        time.sleep(0.25)
    wall = time.perf_counter() - started
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"run-folder failed ({proc.returncode}):\n{output}")
    engine = create_engine(f"sqlite:///{work / 'xraybatch.sqlite'}")
    with engine.connect() as c:
        first, last, done = c.execute(text(
            "SELECT min(started_at), max(finished_at), sum(state = 'done') FROM instances")).one()
        timings = [json.loads(t) if isinstance(t, str) else t
                   for (t,) in c.execute(text("SELECT timings FROM instances WHERE state = 'done'"))]
        outputs = dict(c.execute(text("SELECT kind, count(*) FROM outputs GROUP BY kind")).all())
    engine.dispose()
    from datetime import datetime

    span = (datetime.fromisoformat(str(last)) - datetime.fromisoformat(str(first))).total_seconds()
    stages = sorted({k for t in timings for k in t})
    return {
        "images_per_s": done / span, "seconds": span, "wall_seconds": wall, "done": done, "outputs": outputs,
        "stage_median_ms": {k: 1000 * statistics.median(t[k] for t in timings if k in t) for k in stages},
        "peak_rss_mb": sorted(round(v) for v in peaks.values() if v > 200)[::-1],
    }


# -- (c) naive --------------------------------------------------------------------------------------------------


def naive(paths: list[Path], bundles: tuple[str, ...], outbox: Path) -> dict[str, float]:
    """One file at a time, full-network Grad-CAM with one backward per finding; the same outputs."""
    import numpy as np
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from xraybatch import explain, ingest, preprocess, writeback
    from xraybatch.domain import Heatmap
    from xraybatch.infer import Predictor, to_tensor
    from xraybatch.models.registry import find_bundles
    from xraybatch.pipeline import _decode
    from xraybatch.settings import load_settings

    settings = load_settings(None, {"model": {"bundles": list(bundles)}}, environ={})
    predictors = [Predictor(spec) for spec in find_bundles(settings.model.bundles)]
    plans = list(dict.fromkeys((p.spec.preprocess, p.spec.input.size) for p in predictors))
    start = time.perf_counter()
    for path in paths:
        item = _decode(ingest.read_header(path, settings.ingest)[0], settings.preprocess, plans)
        inputs = [item.inputs[(p.spec.preprocess, p.spec.input.size)] for p in predictors]
        preds = [p.to_predictions(p.forward([inp]))[0] for p, inp in zip(predictors, inputs)]
        heatmaps = []
        for m, t in explain.choose_targets(preds, settings.explain):
            net = predictors[m].net
            batch = to_tensor([inputs[m].pixels], predictors[m].spec.input)
            with GradCAM(model=net, target_layers=[net.features[-1]]) as cam:
                values = cam(input_tensor=batch, targets=[ClassifierOutputTarget(t)])[0]
            full = preprocess.resample(np.asarray(values, np.float32), inputs[m].source_shape)
            heatmaps.append(Heatmap(preds[m].model_name, preds[m].targets[t], preds[m].probabilities[t], full))
        writeback.write_outputs(item.image.dataset, item.display, preds, heatmaps, settings.output, outbox)
    seconds = time.perf_counter() - start
    return {"images_per_s": len(paths) / seconds, "seconds": seconds}


# -- start-up and watch latency ---------------------------------------------------------------------------------


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def start_up(one_file: Path, bundles: tuple[str, ...], tmp: Path) -> dict[str, float]:
    py = sys.executable
    load = ("import time; t = time.perf_counter(); from xraybatch.infer import Predictor; "
            "from xraybatch.models.registry import find_bundles; "
            f"[Predictor(s) for s in find_bundles({list(bundles)!r})]; print(time.perf_counter() - t)")
    out = subprocess.run([py, "-c", load], check=True, capture_output=True, text=True).stdout
    folder = tmp / "one"
    folder.mkdir()
    (folder / one_file.name).write_bytes(one_file.read_bytes())
    return {
        "import_cli_s": _timed([py, "-c", "import xraybatch.cli"]),
        "torch_and_models_s": float(out.strip().splitlines()[-1]),
        "run_folder_one_file_s": _timed([py, "-m", "xraybatch", "run-folder", str(folder), "--workdir",
                                         str(tmp / "one-work"), "--no-progress",
                                         *[a for b in bundles for a in ("--bundle", b)]]),
    }


def watch_latency(bundles: tuple[str, ...], drops: int) -> dict[str, float]:
    """``bench/watch.py``'s single-file latency: drop to SR, settle time 0.5 s, the first drop (warm-up) left out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_watch", Path(__file__).with_name("watch.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    models = [Path(b) for b in bundles] or module.bundles(Path(tempfile.mkdtemp()))[0]
    times = module.latency(Path(get_testdata_file("RG1_UNCR.dcm")), models, WATCH_SETTLE, drops, 2)
    return {"median_s": statistics.median(times), "max_s": max(times), "drops": len(times)}


# -- the report -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=3, help="repeats of (a) and (b); medians are reported")
    parser.add_argument("--naive-copies", type=int, default=24, help="copies the slow naive pipeline runs over")
    parser.add_argument("--input", action="append", choices=sorted(inputs()), help="default: all three")
    parser.add_argument("--bundle", action="append", default=[], help="bundle dir (default: the shipped bundles)")
    parser.add_argument("--drops", type=int, default=5, help="single-file drops for the watch latency (0: skip)")
    parser.add_argument("--run-folder-arg", action="append", default=[], help="extra run-folder argument")
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                        help="[model] backend of (a) and (b); the ONNX files are exported once, before timing")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args()

    from xraybatch.settings import Settings, available_cores

    bundles = tuple(args.bundle)
    batch = Settings().pipeline.batch_size
    report: dict[str, Any] = {"cores": available_cores(), "load_average": os.getloadavg(), "copies": args.copies,
                              "repeat": args.repeat, "backend": args.backend, "inputs": {}}
    print(f"cores {available_cores()}, load average {os.getloadavg()[0]:.2f}, {args.copies} copies, "
          f"{args.repeat} repeats, backend {args.backend}")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        onnx_folder = tmp / "onnx"
        if args.backend == "onnxruntime":
            from xraybatch.infer import Predictor
            from xraybatch.models.registry import find_bundles

            for spec in find_bundles(bundles):
                Predictor(spec, "onnxruntime", onnx_folder)
        for name, source in inputs().items():
            if args.input and name not in args.input:
                continue
            if source is None:
                print(f"\n{name}: left out: {SHARED_JPEG} is absent")
                report["inputs"][name] = {"left_out": f"{SHARED_JPEG} is absent"}
                continue
            paths = make_copies(source, tmp / name, args.copies)
            floors, runs = [], []
            for r in range(args.repeat):  # (a) and (b) in turn, so that a slow spell of the machine hits both
                floors.append(floor(paths, bundles, batch, args.backend, onnx_folder))
                runs.append(run_folder(tmp / name, tmp / f"{name}-work{r}", bundles, args.run_folder_arg,
                                       args.backend, onnx_folder))
            naive_run = naive(paths[: args.naive_copies], bundles, tmp / f"{name}-naive") if args.naive_copies else {}
            f = statistics.median(x["images_per_s"] for x in floors)
            b = statistics.median(x["images_per_s"] for x in runs)
            mid = sorted(runs, key=lambda x: x["images_per_s"])[len(runs) // 2]
            entry = {"floor": floors, "run_folder": runs, "naive": naive_run, "floor_images_per_s": f,
                     "run_folder_images_per_s": b, "ratio": b / f}
            report["inputs"][name] = entry
            print(f"\n{name} ({source.name})")
            print(f"  (a) floor       {f:7.2f} images/s  ({floors[0]['processes']} processes, peak "
                  f"{max(x['peak_rss_mb'] for x in floors):.0f} MB each)")
            print(f"  (b) run-folder  {b:7.2f} images/s  ratio (b)/(a) {b / f:.2f}; outputs {mid['outputs']}; "
                  f"peak RSS per process {mid['peak_rss_mb']} MB; wall {mid['wall_seconds']:.1f} s")
            if naive_run:
                print(f"  (c) naive       {naive_run['images_per_s']:7.2f} images/s  ({args.naive_copies} files)")
            print("  run-folder per-stage medians (ms): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in mid["stage_median_ms"].items()))
        first = next((p for p in inputs().values() if p is not None), None)
        if first is not None:
            report["start_up"] = start_up(first, bundles, tmp)
            print("\nstart-up: " + ", ".join(f"{k} {v:.2f}" for k, v in report["start_up"].items()))
            if args.drops:
                report["watch_latency"] = watch_latency(bundles, args.drops)
                w = report["watch_latency"]
                print(f"watch drop-to-SR (settle {WATCH_SETTLE} s, RG1_UNCR): median {w['median_s']:.2f} s, "
                      f"max {w['max_s']:.2f} s over {w['drops']} drops")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
