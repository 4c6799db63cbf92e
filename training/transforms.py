"""Augmentation of cached model inputs: random rotation, shift, zoom, brightness/contrast, optional flip.

It runs on batches of preprocessed images in [0, 1] (N, 1, H, W), after the shared inference preprocessing,
so it never changes what a production image looks like; it only varies the training views. One affine
``grid_sample`` per batch does rotation, shift and zoom together; borders repeat the edge pixels.
Horizontal flip is off by default: a chest radiograph is not left-right symmetric (heart, situs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
