"""Losses and sampling for imbalanced labels: class weights (capped), weighted focal loss, under/over-sampling.

For one target with label y in {0, 1}, logit z and p = sigmoid(z)::

    p_t     = p if y == 1 else 1 - p
    alpha_t = alpha if y == 1 else 1 - alpha        (no alpha: 1)
    w_t     = w_pos if y == 1 else w_neg            (class weights; no weighting: 1)
    loss    = - w_t * alpha_t * (1 - p_t) ** gamma * log(p_t)

``gamma = 0`` and no alpha give (weighted) binary cross-entropy. The batch loss is the mean over images and
targets. Class weights are ``n / (2 * n_class)`` per target (the "balanced" rule), capped at ``max_weight``.

Sampling (:func:`epoch_indices`) draws the images of one epoch from ``seed`` and the epoch number:

- ``undersample`` / ``oversample``: class-balanced epochs on the first target (the binary task).
- ``repeat`` (multi-label): repeat-factor sampling as in LVIS (Gupta et al. 2019). Finding ``c`` occurs in a
  fraction ``f_c`` of the training images; an image's repeat factor is ``max(1, sqrt(t / f_c))`` over the
  findings it carries (``t`` = ``repeat_threshold``), capped at ``max_repeat``; each epoch holds
  ``floor(r)`` copies plus one more with probability ``r - floor(r)``. Images with no finding (NIH
  "No Finding") are under-sampled instead: each epoch keeps a ``keep_empty`` share of them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

SAMPLING = ("none", "undersample", "oversample", "repeat")


def class_weights(labels: np.ndarray, max_weight: float = 10.0) -> torch.Tensor:
    """Balanced weights per target and class, shape (targets, 2): column 0 for negatives, 1 for positives.

    A class with no examples gets weight ``max_weight`` (it never occurs in the loss anyway).
    """
    if max_weight <= 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}")
    labels = np.asarray(labels).reshape(len(labels), -1)
    n = labels.shape[0]
    pos = labels.sum(axis=0).astype(np.float64)
    neg = n - pos
    with np.errstate(divide="ignore"):
        w = np.stack([n / (2.0 * neg), n / (2.0 * pos)], axis=1)
    w = np.minimum(np.nan_to_num(w, posinf=max_weight), max_weight)
    return torch.tensor(w, dtype=torch.float32)


class WeightedFocalLoss(nn.Module):
    """Focal loss with optional alpha balancing and per-target class weights (see the module docstring)."""

    weights: torch.Tensor  # (targets, 2) or empty: a buffer, so it follows .to(device)

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, weights: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) or None, got {alpha}")
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("weights", weights if weights is not None else torch.empty(0))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        log_pt = -F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # log(p_t), stable
        loss = -log_pt
        if self.gamma:
            # (1 - p_t) ** gamma as exp(gamma * log(1 - p_t)), log(1 - p_t) = logsigmoid(-z_t) with z_t the logit
            # of p_t: finite with a finite gradient everywhere. The plain power has an infinite derivative at
            # p_t = 1 for gamma < 1, which a confidently right prediction reaches in float32: NaN weights.
            z_t = logits * (2.0 * targets - 1.0)
            loss = loss * torch.exp(self.gamma * F.logsigmoid(-z_t))
        if self.alpha is not None:
            loss = loss * (targets * self.alpha + (1.0 - targets) * (1.0 - self.alpha))
        if self.weights.numel():
            w = self.weights.to(logits)
            loss = loss * (targets * w[:, 1] + (1.0 - targets) * w[:, 0])
        return loss.mean()


def repeat_factors(findings: np.ndarray, threshold: float = 0.1, max_repeat: float = 4.0) -> np.ndarray:
    """LVIS repeat factor per image (see the module docstring); 1 for images without a finding.

    ``findings`` is (N, findings) 0/1, without the "No Finding" column.
    """
    if threshold <= 0 or max_repeat < 1:
        raise ValueError(f"repeat threshold must be > 0 and max_repeat >= 1, got {threshold}, {max_repeat}")
    findings = np.asarray(findings).reshape(len(findings), -1).astype(bool)
    freq = findings.mean(axis=0) if len(findings) else np.zeros(findings.shape[1])
    with np.errstate(divide="ignore"):
        per_finding = np.maximum(1.0, np.sqrt(threshold / freq))  # inf where a finding never occurs: unused
    factors = np.where(findings, per_finding[None, :], 1.0).max(axis=1, initial=1.0)
    return np.minimum(factors, max_repeat)


def epoch_indices(labels: np.ndarray, mode: str, rng: np.random.Generator, factors: np.ndarray | None = None,
                  keep_empty: float = 1.0) -> np.ndarray:
    """The training indices of one epoch, shuffled (see the module docstring for the modes).

    ``undersample``/``oversample`` balance the first target. ``repeat`` takes ``labels`` as the findings
    matrix (no "No Finding" column), ``factors`` from :func:`repeat_factors` (computed from ``labels`` when
    omitted) and keeps a ``keep_empty`` share of the images without any finding.
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    if mode not in SAMPLING:
        raise ValueError(f"sampling {mode!r} is not one of {SAMPLING}")
    if mode == "none":
        return rng.permutation(len(labels))
    if mode == "repeat":
        if not 0.0 < keep_empty <= 1.0:
            raise ValueError(f"keep_empty must be in (0, 1], got {keep_empty}")
        factors = repeat_factors(labels) if factors is None else np.asarray(factors, dtype=np.float64)
        copies = np.floor(factors) + (rng.random(len(labels)) < factors - np.floor(factors))
        empty = ~labels.astype(bool).any(axis=1)
        copies[empty] = rng.random(int(empty.sum())) < keep_empty
        return rng.permutation(np.repeat(np.arange(len(labels)), copies.astype(np.int64)))
    first = labels[:, 0]
    by_class = [np.flatnonzero(first == c) for c in (0, 1)]
    by_class = [c for c in by_class if len(c)]
    if mode == "undersample":
        n = min(len(c) for c in by_class)
        chosen = [rng.choice(c, size=n, replace=False) for c in by_class]
    else:
        n = max(len(c) for c in by_class)
        chosen = [np.concatenate([c, rng.choice(c, size=n - len(c), replace=True)]) for c in by_class]
    return rng.permutation(np.concatenate(chosen))
