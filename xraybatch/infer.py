"""Run model bundles: one :class:`Predictor` per bundle, loaded once per process, batched.

``to_tensor`` turns model inputs into the network's normalised batch; training calls it too, so the
normalisation cannot drift between training and inference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xraybatch.domain import ModelInput, Prediction
from xraybatch.errors import ModelError
from xraybatch.models.nets import XrayNet, build_network
from xraybatch.models.registry import BundleSpec, InputSpec, verify_weights

logger = logging.getLogger(__name__)


def to_tensor(images: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """Stack 2-D float images in [0, 1] into a normalised (N, C, H, W) float32 batch.

    Grayscale is repeated over ``spec.channels``; each channel is normalised as ``(x - mean) / std``.
    """
    batch = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images]))[:, None]
    if tuple(batch.shape[-2:]) != spec.size:
        raise ValueError(f"images must be {spec.size}, got {tuple(batch.shape[-2:])}")
    batch = batch.expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (batch - mean) / std


def load_network(spec: BundleSpec) -> XrayNet:
    """Build the bundle's network and load its weights, after checking their sha256.

    Raises
    ------
    ModelError
        When the weights are missing, do not match their sha256, or do not fit the architecture.
    """
    verify_weights(spec)
    try:
        net = build_network(
            spec.architecture, num_outputs=len(spec.targets), in_channels=spec.input.channels,
            **spec.architecture_args,
        )
    except (TypeError, ValueError) as err:
        raise ModelError(f"bundle {spec.path}: cannot build {spec.architecture!r}: {err}") from err
    try:
        if spec.weights_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(spec.weights_file))
        else:
            state = torch.load(spec.weights_file, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as err:
        raise ModelError(f"bundle {spec.path}: weights do not fit {spec.architecture!r}: {err}") from err
    return net.eval()


@dataclass(frozen=True)
class Features:
    """Backbone activations of a batch, kept so Grad-CAM can back-propagate through the head only."""

    activations: torch.Tensor  # (N, C, h, w), computed without autograd
    logits: torch.Tensor  # (N, targets)


class Predictor:
    """One loaded bundle. ``predict`` returns a :class:`Prediction` per input, aligned with ``targets``."""

    def __init__(self, spec: BundleSpec, backend: str = "torch", onnx_folder: Path | None = None) -> None:
        """Load ``spec``; with ``backend="onnxruntime"`` its forward pass runs in ONNX Runtime, from the checked
        ONNX file in ``onnx_folder`` (exported there at first use; see :mod:`xraybatch.models.export`)."""
        self.spec = spec
        self.net = load_network(spec)  # torch's network is kept for Grad-CAM's backward through the head
        self.targets = spec.targets
        self._temperature = torch.tensor(spec.temperature, dtype=torch.float32)
        self._onnx = None
        if backend == "onnxruntime":
            from xraybatch.models import export

            if onnx_folder is None:
                raise ValueError("the onnxruntime backend needs the folder of its ONNX files")
            self._onnx = export.load(spec, self.net, onnx_folder, torch.get_num_threads())
        logger.info("loaded model %s (%s, %d targets, %s)", spec.model_id, spec.architecture, len(spec.targets),
                    backend)

    @property
    def backend(self) -> str:
        return "torch" if self._onnx is None else "onnxruntime"

    def forward(self, inputs: Sequence[ModelInput]) -> Features:
        """Backbone and head of one batch, under ``torch.inference_mode`` or in ONNX Runtime."""
        batch = to_tensor([i.pixels for i in inputs], self.spec.input)
        if self._onnx is not None:
            activations, logits = self._onnx.run(batch)
            return Features(activations=activations, logits=logits)
        with torch.inference_mode():
            activations = self.net.features(batch)
            logits = self.net.head(activations)
        return Features(activations=activations, logits=logits)

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities: ``sigmoid(logit / temperature)`` per target."""
        return torch.sigmoid(logits.float() / self._temperature).numpy()

    def to_predictions(self, features: Features) -> list[Prediction]:
        """One Prediction per image of the batch."""
        probs = self.probabilities(features.logits)
        return [
            Prediction(
                model_name=self.spec.name,
                model_version=self.spec.version,
                targets=self.targets,
                probabilities=tuple(float(p) for p in row),
                thresholds=self.spec.thresholds,
                weights_sha256=self.spec.sha256,
            )
            for row in probs
        ]

    def predict(self, inputs: Sequence[ModelInput]) -> list[Prediction]:
        """Run the model on ``inputs`` (all of this model's input size) and return one Prediction each."""
        return self.to_predictions(self.forward(inputs))


def set_threads(threads: int) -> None:
    """Set torch's intra-op thread count; 0 keeps torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)
