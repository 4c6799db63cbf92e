"""Grad-CAM heat maps for positive findings, with pytorch-grad-cam, over the whole source image.

Grad-CAM on the last convolutional block needs only the gradient through the classifier head. The
backbone has already run once under ``torch.inference_mode`` (:meth:`xraybatch.infer.Predictor.forward`);
here pytorch-grad-cam is given the *head* as its model and the detached activations as its input, so all
targets of an image cost one small forward and backward through the head instead of one full backward each.

The maps are returned on the grid the outputs need (:func:`output_max_side`), not on the source's pixels: a
Grad-CAM map has a few dozen cells of detail, and resampling it to a 3,000-pixel grid only to shrink it again
for the Secondary Capture and the Parametric Map cost more than the Grad-CAM itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from xraybatch.domain import Heatmap, ModelInput, Prediction, fit_within
from xraybatch.infer import Features, Predictor
from xraybatch.models.findings import NO_FINDING
from xraybatch.preprocess import resample
from xraybatch.settings import ExplainConfig, OutputConfig

SC_HEAT_SIDE = 256  # longest side of the heat grid the Secondary Capture blends (it blurs and upsamples it)

logger = logging.getLogger(__name__)


class _HeadOnly(nn.Module):
    """The classifier head with an identity layer in front, for pytorch-grad-cam to hook as target layer."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.activations = nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.activations(x))


def head_cams(predictor: Predictor, activations: torch.Tensor, target_indices: Sequence[int]) -> np.ndarray:
    """Grad-CAM of one image's backbone ``activations`` (1, C, h, w) for each of ``target_indices``.

    Returns
    -------
    numpy.ndarray
        (len(target_indices), h, w) float32 maps in [0, 1] on the activation grid.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    head = _HeadOnly(predictor.net.head).eval()
    # Outside inference mode, a clone is an ordinary tensor that autograd can track.
    batch = activations.clone().repeat(len(target_indices), 1, 1, 1).requires_grad_(True)
    with GradCAM(model=head, target_layers=[head.activations]) as cam:
        maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(t)) for t in target_indices])
    return np.asarray(maps, dtype=np.float32)


def choose_targets(predictions: Sequence[Prediction], cfg: ExplainConfig) -> list[tuple[int, int]]:
    """The (model index, target index) pairs to explain: positive findings, most probable first.

    "No Finding" is never explained; at most ``cfg.max_findings`` pairs are returned.
    """
    if not cfg.enabled:
        return []
    ranked = [
        (p.probabilities[t], m, t)
        for m, p in enumerate(predictions)
        for t, positive in enumerate(p.positive)
        if positive and p.targets[t] != NO_FINDING
    ]
    ranked.sort(key=lambda item: -item[0])
    return [(m, t) for _, m, t in ranked[: cfg.max_findings]]


def output_max_side(cfg: OutputConfig) -> int:
    """Longest side of the heat grid the outputs of ``cfg`` need: the SC's, or the Parametric Map's if finer."""
    return max(SC_HEAT_SIDE, cfg.pm_max_size if cfg.parametric_map else 0)


def gradcam(
    predictors: Sequence[Predictor],
    features: Sequence[Features],
    index: int,
    model_input: ModelInput,
    predictions: Sequence[Prediction],
    cfg: ExplainConfig,
    max_side: int = SC_HEAT_SIDE,
) -> tuple[Heatmap, ...]:
    """Heat maps for the positive findings of image ``index`` of a batch.

    Parameters
    ----------
    predictors, features
        One per model, as returned by :meth:`Predictor.forward` for the batch.
    index
        The image's position in the batch.
    model_input
        Any of the image's model inputs: its ``source_shape`` is the image the maps cover.
    predictions
        The image's predictions, one per model, aligned with ``predictors``.
    max_side
        Longest side of the returned maps' grid (:func:`output_max_side`); the source's aspect ratio is kept.
    """
    chosen = choose_targets(predictions, cfg)
    heatmaps: list[Heatmap] = []
    for m in sorted({m for m, _ in chosen}):
        targets = [t for mm, t in chosen if mm == m]
        maps = head_cams(predictors[m], features[m].activations[index : index + 1], targets)
        grid = fit_within(model_input.source_shape, max_side)
        for t, cam in zip(targets, maps):
            values = np.clip(resample(cam, grid), 0.0, 1.0)
            heatmaps.append(
                Heatmap(
                    model_name=predictions[m].model_name,
                    target=predictions[m].targets[t],
                    probability=predictions[m].probabilities[t],
                    values=values,
                    source_shape=model_input.source_shape,
                )
            )
    heatmaps.sort(key=lambda h: -h.probability)
    return tuple(heatmaps)
