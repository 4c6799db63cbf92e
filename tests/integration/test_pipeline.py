"""run-folder end to end: real and synthetic DICOM files through every stage into the DB and the outbox."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import SHARED_DATA
from tests.integration import throwaway_postgres_database
from tests.synth import write_dicom
from xraybatch.db import session as db_session
from xraybatch.db.export import ResultFilter, iter_rows
from xraybatch.pipeline import Processor, run_folder
from xraybatch.settings import Settings, load_settings

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage: one per explained finding, beside the SR and SC


def _settings(tmp_path: Path, bundles: Path, **sections: dict[str, object]) -> Settings:
    return load_settings(
        None, {"workdir": tmp_path / "work", "model": {"bundles": [str(bundles)]}, **sections}, environ={}
    )


def _rows(settings: Settings, what: str = "instances") -> list[dict[str, object]]:
    with db_session.make_sessionmaker(db_session.make_engine(settings.db_url))() as s:
        return list(iter_rows(s, what, ResultFilter()))  # type: ignore[arg-type]


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.shared_data
def test_real_files_end_to_end(tmp_path: Path, tiny_bundles: Path) -> None:
    source = SHARED_DATA / "dicom"
    if not source.is_dir():
        pytest.skip(f"{source} is absent: the shared data folder is not next to this checkout")
    inbox = tmp_path / "in"
    shutil.copytree(source, inbox, ignore=shutil.ignore_patterns("*.txt"))
    (inbox / "empty").write_bytes(b"")
    (inbox / "notes.txt").write_text("not an image")
    data = (source / "pydicom_data_wg04" / "RG1_UNCR.dcm").read_bytes()
    (inbox / "truncated").write_bytes(data[: len(data) // 2])

    settings = _settings(tmp_path, tiny_bundles)
    summary = run_folder(inbox, settings)

    by_name = {Path(str(r["path"])).name: r for r in _rows(settings)}
    assert len(by_name) == summary.files == 14
    states = {name: r["state"] for name, r in by_name.items()}
    assert states == {
        "RG1_J2KI.dcm": "done",
        "RG1_J2KR.dcm": "done",
        "RG1_UNCI.dcm": "duplicate",
        "RG1_UNCR.dcm": "done",
        "RG3_J2KI.dcm": "not_applicable",
        "RG3_J2KR.dcm": "not_applicable",
        "RG3_UNCI.dcm": "duplicate",
        "RG3_UNCR.dcm": "not_applicable",
        "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm": "not_applicable",  # RSNA: Secondary Capture
        "Fake_MONOHR1.dcm": "duplicate",
        "dx_image.dcm": "done",
        "empty": "rejected",
        "notes.txt": "rejected",
        "truncated": "rejected",
    }
    assert "BodyPartExamined 'EXTREMITY'" in str(by_name["RG3_UNCR.dcm"]["reason"])
    rsna = by_name["1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]
    assert "Secondary Capture Image Storage) is not a radiograph storage class" in str(rsna["reason"])
    assert "empty file" in str(by_name["empty"]["reason"])
    assert "not a DICOM file" in str(by_name["notes.txt"]["reason"])

    # Lossless JPEG 2000 and uncompressed copies of one image give the same probabilities.
    preds = _rows(settings, "predictions")
    uid = {name: by_name[name]["sop_instance_uid"] for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")}
    prob = {
        name: {(p["model"], p["target"]): p["probability"] for p in preds if p["sop_instance_uid"] == u}
        for name, u in uid.items()
    }
    assert len(prob["RG1_UNCR.dcm"]) == 16  # 1 binary + 15 multi-label targets
    for key, value in prob["RG1_UNCR.dcm"].items():
        assert abs(value - prob["RG1_J2KR.dcm"][key]) < 1e-3  # type: ignore[operator]

    # One SR and one SC per processed instance, each referencing its source; parametric maps beside them.
    everything = sorted(settings.outbox.rglob("*.dcm"))
    maps = [p for p in everything if dcmread(p, stop_before_pixels=True).SOPClassUID == PARAMETRIC_MAP]
    outputs = [p for p in everything if p not in maps]
    assert len(outputs) == 2 * summary.counts["done"] == 8
    done_uids = {r["sop_instance_uid"] for r in by_name.values() if r["state"] == "done"}
    referenced: dict[str, list[str]] = {}
    for path in outputs:
        ds = dcmread(path)
        assert "not for diagnostic use" in ds.SeriesDescription.lower()
        ref = (
            ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            if "SourceImageSequence" in ds
            else (
                ds.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence[0]
                .ReferencedSOPSequence[0]
                .ReferencedSOPInstanceUID
            )
        )
        referenced.setdefault(ref, []).append(ds.Modality)
        if shutil.which("dciodvfy"):
            assert _dciodvfy_errors(path) == [], path
    assert set(referenced) == done_uids
    assert all(sorted(kinds) == ["OT", "SR"] for kinds in referenced.values()), referenced
    for path in maps:
        ds = dcmread(path, stop_before_pixels=True)
        derivation = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID in done_uids
        if shutil.which("dciodvfy"):
            assert _dciodvfy_errors(path) == [], path

    # A second run over the same folder resumes: every file is final already, nothing is processed again.
    again = run_folder(inbox, settings)
    assert (again.counts, again.skipped, again.left) == ({}, 14, 0)
    assert sorted(settings.outbox.rglob("*.dcm")) == everything and len(_rows(settings)) == 14


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The results DB for a pipeline test: a SQLite file, or a throwaway database on the real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.sqlite'}"
    else:
        with throwaway_postgres_database() as url:
            yield url


def test_synthetic_batch_every_file_one_state(
    tmp_path: Path, tiny_bundles: Path, dicom_factory: Callable[..., Path], db_url: str
) -> None:
    for i in range(5):
        dicom_factory(f"chest{i}", photometric="MONOCHROME1" if i % 2 else "MONOCHROME2")
    dicom_factory("lateral", view="LL")
    dicom_factory("ct", modality="CT")
    (tmp_path / "in" / "garbage").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    settings = _settings(tmp_path, tiny_bundles, pipeline={"batch_size": 3}, db={"url": db_url})
    summary = run_folder(tmp_path / "in", settings)
    assert summary.counts == {"done": 5, "not_applicable": 2, "rejected": 1}
    rows = _rows(settings)
    assert len(rows) == 8 and all(r["reason"] for r in rows if r["state"] != "done")
    assert len(_rows(settings, "predictions")) == 5 * 16
    written = sorted(settings.outbox.rglob("*.dcm"))
    maps = [p for p in written if dcmread(p, stop_before_pixels=True).SOPClassUID == PARAMETRIC_MAP]
    assert len(written) - len(maps) == 10  # an SR and an SC per done file, and a map per explained finding
    # Same folder again: nothing to do, nothing written twice. A copy in another folder is a duplicate.
    again = run_folder(tmp_path / "in", settings)
    assert (again.counts, again.skipped) == ({}, 8)
    copies = tmp_path / "copies"
    copies.mkdir()
    for name in ("chest0", "lateral", "garbage"):
        (copies / name).write_bytes((tmp_path / "in" / name).read_bytes())
    assert run_folder(copies, settings).counts == {"duplicate": 2, "rejected": 1}
    assert sorted(settings.outbox.rglob("*.dcm")) == written and len(_rows(settings, "predictions")) == 80


def test_internal_error_fails_one_file_and_the_run_goes_on(
    tmp_path: Path,
    tiny_bundles: Path,
    dicom_factory: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from xraybatch import preprocess

    first = dicom_factory("a")
    dicom_factory("b")
    real = preprocess.to_display

    def flaky(image, cfg):  # type: ignore[no-untyped-def]
        if image.header.path == first:
            raise RuntimeError("boom")
        return real(image, cfg)

    monkeypatch.setattr(preprocess, "to_display", flaky)
    settings = _settings(
        tmp_path, tiny_bundles, pipeline={"decode_processes": 1}
    )  # the patch lives in this process
    summary = run_folder(tmp_path / "in", settings)
    assert summary.counts == {"failed": 1, "done": 1}
    failed = [r for r in _rows(settings) if r["state"] == "failed"]
    # The reason names the error and where it was raised, never its message (which may quote a value).
    assert str(failed[0]["reason"]).startswith("internal error: RuntimeError in ") and "boom" not in str(failed[0]["reason"])
    assert "unexpected error" in caplog.text and "RuntimeError: boom" in caplog.text  # the traceback is logged
    # A failed instance is retried by the next run; the done one is left alone.
    monkeypatch.setattr(preprocess, "to_display", real)
    again = run_folder(tmp_path / "in", settings)
    assert (again.counts, again.skipped) == ({"done": 1}, 1)
    assert sorted(r["state"] for r in _rows(settings)) == ["done", "done"]  # one row per input


def test_no_patient_data_in_logs(
    tmp_path: Path, tiny_bundles: Path, dicom_factory: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    dicom_factory("Synthetic_SYN-0001_19700101")  # file names may carry patient data too
    dicom_factory("lat", view="LL")
    write_dicom(tmp_path / "in" / "tiny", pixels=__import__("numpy").zeros((8, 8), "uint16"))
    (tmp_path / "in" / "Test^Synthetic.txt").write_text("not DICOM")
    run_folder(tmp_path / "in", _settings(tmp_path, tiny_bundles))
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    for secret in ("Test^Synthetic", "SYN-0001", "19700101"):
        assert secret not in text
    assert "rejected file:" in caplog.text  # a file without a readable header is named by its path digest


def test_the_default_worker_count_uses_the_callers_file_count(
    tmp_path: Path, tiny_bundles: Path, dicom_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI counts the files for its progress bar; run-folder takes that count instead of walking again."""
    from xraybatch import pipeline

    for name in ("a", "b", "c"):
        dicom_factory(name)
    asked = []
    real = pipeline.worker_count
    monkeypatch.setattr(pipeline, "worker_count", lambda w, n, b: asked.append(n) or real(w, 1, b))
    summary = run_folder(tmp_path / "in", _settings(tmp_path, tiny_bundles), workers=0, files=1)
    assert asked == [1] and summary.counts == {"done": 3}
    run_folder(tmp_path / "in", _settings(tmp_path, tiny_bundles), workers=0)
    assert asked == [1, 3]  # not given: counted


def test_processor_reports_missing_models(tmp_path: Path) -> None:
    from xraybatch.errors import ModelError

    (tmp_path / "none").mkdir()
    settings = load_settings(
        None, {"workdir": tmp_path, "model": {"bundles": [str(tmp_path / "none")]}}, environ={}
    )
    with pytest.raises(ModelError, match="no model bundle found"):
        Processor.open(settings)
    assert not (tmp_path / "outbox").exists()


def test_no_patient_data_in_warnings(
    tmp_path: Path, tiny_bundles: Path, dicom_factory: Callable[..., Path], recwarn: pytest.WarningsRecorder
) -> None:
    dicom_factory(
        "a", PatientName="Doe", ReferringPhysicianName="ward"
    )  # one-component names make highdicom warn
    assert run_folder(tmp_path / "in", _settings(tmp_path, tiny_bundles)).counts == {"done": 1}
    messages = " ".join(str(w.message) for w in recwarn)
    assert '"Doe"' not in messages and '"ward"' not in messages


def test_links_and_fifos_in_the_folder_are_logged_once_never_opened(
    tmp_path: Path, tiny_bundle: Path, dicom_factory: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import os

    good = dicom_factory("good.dcm")
    os.mkfifo(tmp_path / "in" / "pipe")  # reading it would block for ever
    (tmp_path / "in" / "link.dcm").symlink_to(good)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "in" / "linked-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    caplog.set_level(logging.WARNING, logger="xraybatch.pipeline")
    summary = run_folder(tmp_path / "in", _settings(tmp_path, tiny_bundle))
    assert summary.counts == {"done": 1}
    assert [Path(str(r["path"])).name for r in _rows(_settings(tmp_path, tiny_bundle))] == ["good.dcm"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 3 and sum("a FIFO" in m for m in skipped) == 1, skipped
    assert sum("a symbolic link" in m for m in skipped) == 2


def test_the_onnxruntime_backend_gives_the_same_results_and_outputs(tmp_path: Path, tiny_bundles: Path) -> None:
    """run-folder with ``[model] backend = "onnxruntime"``: the ONNX files are exported into WORKDIR/models at
    first use; predictions match torch's within 1e-4, positives and outputs (heat maps included) are the same."""
    import numpy as np

    rng = np.random.default_rng(11)
    inbox = tmp_path / "in"
    for i in range(4):
        write_dicom(inbox / f"img{i}.dcm", pixels=rng.integers(0, 4096, (160, 144)).astype(np.uint16))
    runs = {}
    for backend in ("torch", "onnxruntime"):
        settings = _settings(tmp_path / backend, tiny_bundles, model={"bundles": [str(tiny_bundles)],
                                                                      "backend": backend})
        assert run_folder(inbox, settings).counts == {"done": 4}
        predictions = {(r["sop_instance_uid"], r["model"], r["target"]): (float(r["probability"]), r["positive"])  # type: ignore[arg-type]
                       for r in _rows(settings, "predictions")}
        outputs = {(r["source_sop_instance_uid"], r["kind"], r["sop_instance_uid"]) for r in _rows(settings, "outputs")}
        runs[backend] = predictions, outputs
    assert sorted(p.name[:13] for p in (tmp_path / "onnxruntime" / "work" / "models").glob("*.onnx")) == [
        "tiny-binary-0", "tiny-multilab"]
    assert not (tmp_path / "torch" / "work" / "models").exists()
    (p1, o1), (p2, o2) = runs["torch"], runs["onnxruntime"]
    assert p1.keys() == p2.keys() and len(p1) == 4 * 16
    assert max(abs(p1[k][0] - p2[k][0]) for k in p1) < 1e-4
    assert {k: v[1] for k, v in p1.items()} == {k: v[1] for k, v in p2.items()}
    assert o1 == o2 and {kind for _, kind, _ in o1} >= {"sc", "sr"}


def test_worker_processes_give_the_same_results_as_one_worker(tmp_path: Path, tiny_bundles: Path) -> None:
    """Two worker processes (their own models, one torch thread each, decoding in-process) against one worker in
    this process: the same predictions and the same output objects (UIDs derive from source and model set)."""
    import numpy as np

    rng = np.random.default_rng(7)
    inbox = tmp_path / "in"
    for i in range(12):  # two batches of 8: both workers get work
        pixels = rng.integers(0, 4096, (160, 144)).astype(np.uint16)
        write_dicom(inbox / f"img{i:02d}.dcm", pixels=pixels, photometric=("MONOCHROME1", "MONOCHROME2")[i % 2])
    runs = {}
    for workers in (1, 2):
        settings = _settings(tmp_path / f"w{workers}", tiny_bundles, explain={"max_findings": 2})
        began = time.perf_counter()
        summary = run_folder(inbox, settings, workers=workers)
        wall = time.perf_counter() - began
        assert summary.counts == {"done": 12}
        # the run's time counts from the models loaded (first claim), not from the start: worker processes'
        # start-up (spawning, importing torch, loading the models) takes seconds
        assert 0 < summary.seconds < (wall - 1.0 if workers > 1 else wall)
        from sqlalchemy import select

        from xraybatch.db.tables import Instance

        with db_session.make_sessionmaker(db_session.make_engine(settings.db_url))() as s:
            instances = list(s.scalars(select(Instance.worker_id)))
        predictions = {(r["sop_instance_uid"], r["model"], r["target"]): float(r["probability"])  # type: ignore[arg-type]
                       for r in _rows(settings, "predictions")}
        outputs = {(r["sop_instance_uid"], r["kind"]) for r in _rows(settings, "outputs")}
        runs[workers] = (instances, predictions, outputs)
    (one, p1, o1), (two, p2, o2) = runs[1], runs[2]
    assert len(set(one)) == 1
    assert len(set(two)) == 2  # really two processes
    assert p1.keys() == p2.keys() and len(p1) == 12 * 16
    assert max(abs(p1[k] - p2[k]) for k in p1) < 1e-5
    assert o1 == o2 and {kind for _, kind in o1} >= {"sc", "sr"}
