"""Grad-CAM through the head only must equal pytorch-grad-cam's full backward, and be finite and non-zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_bundle
from xraybatch.domain import Heatmap, ModelInput, Prediction, fit_within
from xraybatch.explain import SC_HEAT_SIDE, choose_targets, gradcam, head_cams, output_max_side
from xraybatch.infer import Predictor, to_tensor
from xraybatch.models.findings import NIH_TARGETS
from xraybatch.models.registry import read_bundle
from xraybatch.settings import ExplainConfig, OutputConfig


def _image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size), dtype=np.float32)


@pytest.mark.parametrize("targets", [[0], [3, 7, 14]])
def test_head_only_cam_matches_full_backward(tmp_path: Path, targets: list[int]) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    bundle = make_tiny_bundle(tmp_path / "b", name="m", task="multilabel", targets=NIH_TARGETS, size=64)
    predictor = Predictor(read_bundle(bundle))
    inp = ModelInput(pixels=_image(64), source_shape=(64, 64))
    features = predictor.forward([inp])
    fast = head_cams(predictor, features.activations, targets)

    batch = to_tensor([inp.pixels] * len(targets), predictor.spec.input)
    with GradCAM(model=predictor.net, target_layers=[predictor.net.features[-1]]) as cam:
        full = cam(input_tensor=batch, targets=[ClassifierOutputTarget(t) for t in targets])

    assert fast.shape == (len(targets), 16, 16)
    assert np.isfinite(fast).all() and (fast.max(axis=(1, 2)) > 0).all()
    # pytorch-grad-cam resizes each layer's map to the input size, then min-max normalises once more.
    upsampled = scale_cam_image(scale_cam_image(fast, (64, 64)))
    np.testing.assert_allclose(upsampled, full, atol=1e-4)


def test_choose_targets_positive_only_ranked_and_capped() -> None:
    preds = [
        Prediction("a", "1", ("Pneumonia",), (0.9,), (0.5,)),
        Prediction("b", "1", ("Effusion", "Mass", "No Finding", "Nodule"), (0.6, 0.95, 0.99, 0.2), (0.5,) * 4),
    ]
    assert choose_targets(preds, ExplainConfig(max_findings=3)) == [(1, 1), (0, 0), (1, 0)]
    assert choose_targets(preds, ExplainConfig(max_findings=1)) == [(1, 1)]
    assert choose_targets(preds, ExplainConfig(enabled=False)) == []


def _gradcam_of_positive(tmp_path: Path, source_shape: tuple[int, int], max_side: int) -> tuple[Heatmap, ...]:
    """Grad-CAM of one image through a tiny binary bundle whose Pneumonia is always positive."""
    bundle = make_tiny_bundle(tmp_path / "b", thresholds={"Pneumonia": 0.0})
    predictor = Predictor(read_bundle(bundle))
    inp = ModelInput(pixels=_image(64), source_shape=source_shape)
    features = predictor.forward([inp])
    preds = predictor.to_predictions(features)
    return gradcam([predictor], [features], 0, inp, preds, ExplainConfig(), max_side=max_side)


def test_gradcam_maps_onto_source_grid(tmp_path: Path) -> None:
    maps = _gradcam_of_positive(tmp_path, (300, 250), 512)
    assert len(maps) == 1 and maps[0].target == "Pneumonia"
    assert maps[0].values.shape == (300, 250)  # never finer than the source
    assert maps[0].covers == (300, 250)
    assert np.isfinite(maps[0].values).all() and maps[0].values.max() > 0 and maps[0].values.min() >= 0
    assert torch.is_grad_enabled()  # Grad-CAM leaves the global autograd state as it found it


def test_gradcam_maps_on_the_outputs_grid_keep_aspect_and_agree(tmp_path: Path) -> None:
    (coarse,) = _gradcam_of_positive(tmp_path / "coarse", (2000, 1500), 256)
    (fine,) = _gradcam_of_positive(tmp_path / "fine", (2000, 1500), 2000)
    assert coarse.values.shape == (256, 192) and coarse.covers == (2000, 1500)
    assert fine.values.shape == (2000, 1500)
    # the coarse map is the fine map seen at lower resolution, not another picture
    import cv2

    shrunk = cv2.resize(fine.values, (192, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk - coarse.values).max() < 0.02


def test_heat_grid_and_output_side() -> None:
    assert fit_within((2000, 1500), 256) == (256, 192)
    assert fit_within((100, 80), 256) == (100, 80)
    assert fit_within((3000, 10), 256) == (256, 1)
    assert output_max_side(OutputConfig()) == max(SC_HEAT_SIDE, OutputConfig().pm_max_size)
    assert output_max_side(OutputConfig(pm_max_size=512)) == 512
    assert output_max_side(OutputConfig(pm_max_size=512, parametric_map=False)) == SC_HEAT_SIDE
