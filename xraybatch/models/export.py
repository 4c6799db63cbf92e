"""The ONNX Runtime backend: a bundle's network exported to ONNX once, then run by ONNX Runtime.

``[model] backend = "onnxruntime"`` runs the backbone and head of each bundle in ONNX Runtime, which measures
faster than torch on this kind of CPU (docs/scaling.md). The torch network stays loaded: Grad-CAM back-propagates
through its head. The ONNX file is exported from the bundle's verified weights, at first use or by
``xraybatch models export``, into ``<workdir>/models/``, named by the bundle and its weights' sha256, so a
retrained bundle gets a new file. Every session is checked against torch on a fixed probe batch before it is
used: probabilities must agree within :data:`TOLERANCE`, or the bundle does not load.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xraybatch.errors import ModelError
from xraybatch.files import fsync_dir
from xraybatch.models.registry import BundleSpec

if TYPE_CHECKING:
    from xraybatch.models.nets import XrayNet

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest difference of a probability between ONNX Runtime and torch that a session may show
OPSET = 17
_PROBE_SEED = 20261202


def onnx_path(spec: BundleSpec, folder: Path) -> Path:
    """Where the ONNX file of ``spec`` lies: named by the bundle and the first 16 hex digits of its weights' sha256."""
    return folder / f"{spec.name}-{spec.version}-{spec.sha256[:16]}.onnx"


class _FeaturesAndLogits(torch.nn.Module):
    """The network as ONNX sees it: one input, the backbone's activations and the head's logits out."""

    def __init__(self, net: XrayNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activations = self.net.features(x)
        return activations, self.net.head(activations)


def export(spec: BundleSpec, net: XrayNet, path: Path) -> Path:
    """Export ``net`` (the loaded network of ``spec``) to ``path`` atomically (temporary file, fsync, rename).

    The batch size is dynamic. Raises ModelError when the network cannot be exported.
    """
    dummy = torch.zeros(1, spec.input.channels, *spec.input.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on tracing; they name no input
            torch.onnx.export(
                _FeaturesAndLogits(net).eval(), (dummy,), str(tmp), input_names=["image"],
                output_names=["activations", "logits"], opset_version=OPSET, dynamo=False,
                dynamic_axes={"image": {0: "batch"}, "activations": {0: "batch"}, "logits": {0: "batch"}},
            )
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (RuntimeError, OSError, ImportError) as err:
        raise ModelError(f"bundle {spec.path}: could not export it to ONNX at {path}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("exported model %s to ONNX: %s", spec.model_id, path.name)
    return path


@dataclass(frozen=True)
class Check:
    """How far an ONNX Runtime session is from torch on the probe batch."""

    probability: float  # largest absolute difference of a probability (after the bundle's temperature)
    activation: float  # largest absolute difference of a backbone activation

    @property
    def passed(self) -> bool:
        return self.probability <= TOLERANCE


class OnnxModel:
    """An ONNX Runtime session for one bundle, checked against its torch network."""

    def __init__(self, spec: BundleSpec, session: Any, path: Path) -> None:
        self.spec = spec
        self.session = session
        self.path = path
        self.checked: Check | None = None  # the result of the check :func:`load` made

    def run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations and logits of a normalised (N, C, H, W) float32 batch, as torch tensors."""
        activations, logits = self.session.run(None, {"image": batch.numpy()})
        return torch.from_numpy(activations), torch.from_numpy(logits)

    def check(self, net: XrayNet) -> Check:
        """Compare with ``net`` on a fixed batch of two random images (a seeded probe, the same every time)."""
        rng = np.random.default_rng(_PROBE_SEED)
        probe = torch.from_numpy(rng.standard_normal((2, self.spec.input.channels, *self.spec.input.size),
                                                     dtype=np.float32))
        with torch.inference_mode():
            reference = _FeaturesAndLogits(net)(probe)
        ours = self.run(probe)
        temperature = torch.tensor(self.spec.temperature, dtype=torch.float32)
        p_ref, p_ours = (torch.sigmoid(logits / temperature) for logits in (reference[1], ours[1]))
        return Check(float((p_ref - p_ours).abs().max()), float((reference[0] - ours[0]).abs().max()))


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (beside the ONNX file) for the block: one process at a time
    exports or checks the file, on this host or on others sharing the work folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f"{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise ModelError(f"cannot create the lock file {lock} for the ONNX export: {err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ONNX Runtime's own notes go to stderr otherwise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _checked(spec: BundleSpec, net: XrayNet, path: Path, threads: int) -> OnnxModel | str:
    """The model of ``path`` when it runs and matches ``net``; otherwise what is wrong with it."""
    try:
        model = OnnxModel(spec, _session(path, threads), path)
        result = model.checked = model.check(net)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file; ONNX Runtime's errors share no base
        return f"cannot be run ({type(err).__name__})"
    if not result.passed:
        return (f"differs from its weights: its probabilities differ from torch's by {result.probability:.2e} "
                f"(allowed {TOLERANCE:g})")
    logger.info("loaded model %s in ONNX Runtime (largest probability difference from torch %.1e)",
                spec.model_id, result.probability)
    return model


def load(spec: BundleSpec, net: XrayNet, folder: Path, threads: int) -> OnnxModel:
    """The checked ONNX Runtime model of ``spec``, exported first when its file is absent and exported again
    (once) when the file there cannot be run or does not match the weights.

    Raises
    ------
    ModelError
        ONNX Runtime is not installed, or the freshly exported network does not match torch within TOLERANCE.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ModelError(
            '[model] backend = "onnxruntime" needs the onnxruntime and onnx packages: pip install onnxruntime '
            'onnx, or set [model] backend = "torch"'
        ) from err
    path = onnx_path(spec, folder)
    with _exclusive(path):  # workers starting together: one exports, the others wait and then check its file
        fresh = not path.exists()
        if fresh:
            export(spec, net, path)
        outcome = _checked(spec, net, path, threads)
        if isinstance(outcome, str) and not fresh:
            logger.warning("the ONNX file of model %s %s; exporting it again", spec.model_id, outcome)
            export(spec, net, path)
            outcome = _checked(spec, net, path, threads)
    if isinstance(outcome, str):
        raise ModelError(f"bundle {spec.path}: the ONNX export {outcome}; run it with [model] backend = \"torch\"")
    return outcome
