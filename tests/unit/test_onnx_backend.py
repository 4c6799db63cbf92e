"""The onnxruntime backend: exported once per bundle and weights, checked against torch, the same probabilities."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_bundle
from xraybatch.domain import ModelInput
from xraybatch.errors import ConfigError, ModelError
from xraybatch.infer import Predictor
from xraybatch.models import export
from xraybatch.models.registry import read_bundle
from xraybatch.settings import load_settings


def _inputs(n: int, size: int) -> list[ModelInput]:
    rng = np.random.default_rng(3)
    return [ModelInput(rng.random((size, size), dtype=np.float32), (size, size)) for _ in range(n)]


@pytest.mark.parametrize("name", ["tiny-binary", "tiny-multilabel"])
def test_probabilities_and_activations_match_torch(tiny_bundles: Path, tmp_path: Path, name: str) -> None:
    spec = read_bundle(tiny_bundles / name)
    folder = tmp_path / "models"
    torch_p = Predictor(spec)
    onnx_p = Predictor(spec, "onnxruntime", folder)
    assert (torch_p.backend, onnx_p.backend) == ("torch", "onnxruntime")
    assert [p.name for p in folder.glob("*.onnx")] == [export.onnx_path(spec, folder).name]
    inputs = _inputs(5, spec.input.size[0])  # a batch size the export never saw: the batch axis is dynamic
    a, b = torch_p.forward(inputs), onnx_p.forward(inputs)
    torch.testing.assert_close(b.activations, a.activations, atol=1e-4, rtol=1e-4)
    for x, y in zip(torch_p.to_predictions(a), onnx_p.to_predictions(b)):
        assert x.targets == y.targets and x.thresholds == y.thresholds
        np.testing.assert_allclose(y.probabilities, x.probabilities, atol=export.TOLERANCE, rtol=0)


def test_the_file_is_named_by_the_weights_and_reused(tiny_bundle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = read_bundle(tiny_bundle)
    folder = tmp_path / "models"
    Predictor(spec, "onnxruntime", folder)
    path = export.onnx_path(spec, folder)
    assert spec.sha256[:16] in path.name and spec.version in path.name
    stamp = path.stat().st_mtime_ns

    def no_export(*_: object) -> None:
        raise AssertionError("exported again although the file was there and passed its check")

    monkeypatch.setattr(export, "export", no_export)
    Predictor(spec, "onnxruntime", folder)
    assert path.stat().st_mtime_ns == stamp
    # retrained weights: another sha256, another file
    other = read_bundle(make_tiny_bundle(tmp_path / "retrained", seed=5))
    assert export.onnx_path(other, folder) != path


def test_a_damaged_file_is_exported_again(tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = read_bundle(tiny_bundle)
    folder = tmp_path / "models"
    path = export.onnx_path(spec, folder)
    folder.mkdir()
    path.write_bytes(b"not an ONNX model")
    with caplog.at_level(logging.WARNING):
        predictor = Predictor(spec, "onnxruntime", folder)
    assert "cannot be run" in caplog.text and "exporting it again" in caplog.text
    assert path.stat().st_size > 1000
    assert predictor.forward(_inputs(1, spec.input.size[0])).logits.shape == (1, 1)


def test_a_file_of_other_weights_is_exported_again(tiny_bundle: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A file that runs but does not match the weights (copied over, or stale) fails the probe and is replaced."""
    spec = read_bundle(tiny_bundle)
    other = read_bundle(make_tiny_bundle(tmp_path / "other", seed=9))
    folder = tmp_path / "models"
    Predictor(other, "onnxruntime", folder)
    shutil.copy(export.onnx_path(other, folder), export.onnx_path(spec, folder))
    with caplog.at_level(logging.WARNING):
        predictor = Predictor(spec, "onnxruntime", folder)
    assert "differs from its weights" in caplog.text
    net = predictor.net
    assert export.load(spec, net, folder, 1).check(net).passed


def _load_counting_exports(bundle: Path, folder: Path, marks: Path, barrier: Any) -> None:
    """In a worker process: load ``bundle`` with ONNX Runtime once the others are ready; mark each export."""
    real = export.export

    def counting(spec: Any, net: Any, path: Path) -> Path:
        (marks / str(os.getpid())).touch()
        time.sleep(0.5)  # a slow export: a worker that does not wait for it would export too
        return real(spec, net, path)

    export.export = counting  # type: ignore[assignment]
    spec = read_bundle(bundle)
    barrier.wait(timeout=120)
    Predictor(spec, "onnxruntime", folder)


def test_workers_starting_together_export_once(tiny_bundle: Path, tmp_path: Path) -> None:
    """Several workers with a cold work folder: one exports, the others wait for its file and check it."""
    folder, marks = tmp_path / "models", tmp_path / "marks"
    marks.mkdir()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    workers = [ctx.Process(target=_load_counting_exports, args=(tiny_bundle, folder, marks, barrier))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(180)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert len(list(marks.iterdir())) == 1
    assert [p.name for p in folder.glob("*.onnx")] == [export.onnx_path(read_bundle(tiny_bundle), folder).name]
    assert not list(folder.glob(".*.tmp-*"))


def test_a_network_that_disagrees_with_torch_does_not_load(tiny_bundle: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spec = read_bundle(tiny_bundle)
    real_run = export.OnnxModel.run

    def off_by_a_little(self: export.OnnxModel, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activations, logits = real_run(self, batch)
        return activations, logits + 0.01  # 0.01 in logit moves a probability near 0.5 by 0.0025

    monkeypatch.setattr(export.OnnxModel, "run", off_by_a_little)
    with pytest.raises(ModelError, match=r'differ from torch.s by .*backend = "torch"'):
        Predictor(spec, "onnxruntime", tmp_path / "models")


def test_the_backend_setting_is_checked() -> None:
    assert load_settings(None, {"model": {"backend": "onnxruntime"}}, environ={}).model.backend == "onnxruntime"
    assert load_settings(None, {}, environ={"XRAYBATCH_MODEL_BACKEND": "onnxruntime"}).model.backend == "onnxruntime"
    with pytest.raises(ConfigError, match="backend must be one of torch, onnxruntime"):
        load_settings(None, {"model": {"backend": "tensorrt"}}, environ={})
