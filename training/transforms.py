"""Augmentation of cached model inputs: re-encoding as hospitals store images (:func:`reencode`), then random
rotation, shift, zoom, brightness/contrast and an optional flip (:func:`augment`).

It runs on batches of preprocessed images in [0, 1] (N, 1, H, W), after the shared inference preprocessing,
so it never changes what a production image looks like; it only varies the training views. One affine
``grid_sample`` per batch does rotation, shift and zoom together; borders repeat the edge pixels.
Horizontal flip is off by default: a chest radiograph is not left-right symmetric (heart, situs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Random training transforms; every range is symmetric around "no change". All zero = off."""

    rotation_deg: float = 10.0  # rotate by U(-r, r) degrees
    shift: float = 0.08  # translate by U(-s, s) of the image size, each axis
    zoom: float = 0.10  # scale by U(1 - z, 1 + z)
    brightness: float = 0.10  # add U(-b, b) (pixels are in [0, 1])
    contrast: float = 0.10  # scale around the image mean by U(1 - c, 1 + c)
    hflip: bool = False  # flip left-right with probability 0.5 (off: anatomy is not symmetric)

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "shift", "zoom", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if self.zoom >= 1 or self.contrast >= 1:
            raise ValueError("augmentation zoom and contrast must be < 1")

    @property
    def enabled(self) -> bool:
        return any((self.rotation_deg, self.shift, self.zoom, self.brightness, self.contrast, self.hflip))


def _uniform(n: int, half_width: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2.0 - 1.0) * half_width


def augment(batch: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly transform a (N, C, H, W) batch in [0, 1]; returns a new tensor in [0, 1].

    ``generator`` (a seeded CPU ``torch.Generator``) draws every random number, so a seed fixes the views.
    """
    if batch.ndim != 4:
        raise ValueError(f"batch must be (N, C, H, W), got shape {tuple(batch.shape)}")
    if not cfg.enabled:
        return batch
    n = batch.shape[0]
    angle = _uniform(n, math.radians(cfg.rotation_deg), generator)
    scale = 1.0 + _uniform(n, cfg.zoom, generator)
    tx = _uniform(n, 2.0 * cfg.shift, generator)  # affine_grid coordinates span [-1, 1]: size 2
    ty = _uniform(n, 2.0 * cfg.shift, generator)
    flip = torch.ones(n)
    if cfg.hflip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    # Output pixel p samples the input at A p + t: zooming in by s means sampling a region 1/s as large.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], dim=1), torch.stack([sin * flip, cos, ty], dim=1)], dim=1
    ).to(batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid.to(batch.device), mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (1.0 + _uniform(n, cfg.contrast, generator)).view(n, 1, 1, 1).to(out)
    brightness = _uniform(n, cfg.brightness, generator).view(n, 1, 1, 1).to(out)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)


# -- re-encoding: what hospitals send -------------------------------------------------------------------------

BIT_DEPTHS = (8, 10, 12, 15, 16)


@dataclass(frozen=True)
class ReencodeConfig:
    """Store each training view as a modality might, then make its model input with the inference code.

    A view is, with probability ``probability``: gamma-curved, clipped by a window narrower than the data,
    blurred or sharpened, given noise, quantised to a random bit depth (:data:`BIT_DEPTHS`), stored
    MONOCHROME1 or 2 with a random rescale slope/intercept, and (8-bit views, with probability ``jpeg``) saved
    as lossy JPEG; then :func:`xraybatch.preprocess.equalised_stored` turns it back into a model input. The
    monotonic parts (bit depth, polarity, rescale, gamma) change nothing but quantisation under the equalised
    preprocessing; they are here so that training sees the real code path on every encoding.
    """

    probability: float = 0.8  # share of training views that are re-encoded; 0 = off
    gamma: float = 0.4  # gamma = exp(U(-g, g))
    clip: float = 0.02  # clip up to this share of pixels at each end (a narrow window)
    blur: float = 1.0  # Gaussian sigma U(0, blur) pixels, on half of the views ...
    sharpen: float = 0.6  # ... an unsharp mask of amount U(0, sharpen) on the other half
    noise: float = 0.015  # Gaussian noise with sigma U(0, noise)
    jpeg: float = 0.3  # probability that an 8-bit view is stored as lossy JPEG ...
    jpeg_quality: int = 60  # ... of quality U(jpeg_quality, 95)

    def __post_init__(self) -> None:
        if not 0 <= self.probability <= 1 or not 0 <= self.jpeg <= 1:
            raise ValueError("reencode probability and jpeg must be in [0, 1]")
        if min(self.gamma, self.clip, self.blur, self.sharpen, self.noise) < 0 or self.clip >= 0.2:
            raise ValueError("reencode gamma, clip, blur, sharpen and noise must be >= 0 (clip < 0.2)")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"reencode jpeg_quality must be 1-95, got {self.jpeg_quality}")


def reencode(view: np.ndarray, cfg: ReencodeConfig, rng: np.random.Generator, jpeg_quality: int = 0) -> np.ndarray:
    """One (H, W) model input in [0, 1] -> the model input of a randomly re-encoded copy (same shape).

    ``jpeg_quality`` is the bundle's preprocessing step (``ModelPreprocess.jpeg_quality``), applied by inference
    to every input and so to the re-encoded copy too."""
    from pydicom.dataset import Dataset
    from scipy import ndimage

    from xraybatch.preprocess import equalised_stored

    if cfg.probability <= 0 or rng.random() >= cfg.probability:
        return view
    x = np.clip(view.astype(np.float64), 0.0, 1.0) ** math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
    if cfg.clip > 0:
        low, high = np.quantile(x, [rng.uniform(0, cfg.clip), 1.0 - rng.uniform(0, cfg.clip)])
        if high > low:
            x = np.clip((x - low) / (high - low), 0.0, 1.0)
    if rng.random() < 0.5:
        x = ndimage.gaussian_filter(x, rng.uniform(0, cfg.blur)) if cfg.blur > 0 else x
    elif cfg.sharpen > 0:
        x = x + rng.uniform(0, cfg.sharpen) * (x - ndimage.gaussian_filter(x, 1.0))
    if cfg.noise > 0:
        x = x + rng.normal(0.0, rng.uniform(0, cfg.noise), x.shape)
    x = np.clip(x, 0.0, 1.0)
    bits = int(rng.choice(BIT_DEPTHS))
    top = (1 << bits) - 1
    stored = np.rint(x * top).astype(np.uint16 if bits > 8 else np.uint8)
    if bits == 8 and rng.random() < cfg.jpeg:
        stored = _jpeg(stored, int(rng.integers(cfg.jpeg_quality, 96)))
    invert = bool(rng.random() < 0.5)
    if invert:
        stored = (top - stored.astype(np.int64)).astype(stored.dtype)
    ds = Dataset()
    ds.RescaleSlope = float(rng.choice([1.0, 0.5, 2.0]))
    ds.RescaleIntercept = float(rng.choice([0.0, -1024.0, 100.0]))
    return equalised_stored(stored, ds, invert, jpeg_quality)


def _jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("L"))


def reencode_batch(batch: np.ndarray, cfg: ReencodeConfig, rng: np.random.Generator,
                   jpeg_quality: int = 0) -> np.ndarray:
    """:func:`reencode` on every (H, W) view of an (N, H, W) batch."""
    return np.stack([reencode(v, cfg, rng, jpeg_quality) for v in batch]).astype(np.float32, copy=False)
