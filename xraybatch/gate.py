"""The learned input gate: is the image a frontal chest radiograph like those the bundle was trained on?

The header rules (:func:`xraybatch.ingest.select`) trust what a file says about itself; many files say
nothing (no Body Part Examined, no View Position) or the wrong thing. The gate looks at the pixels, through
the bundle's own network: the global average pool of the backbone activations that
:meth:`xraybatch.infer.Predictor.forward` computes for the findings anyway (no extra forward pass) is scored
against the training chest radiographs. An image whose score is over the bundle's threshold ends
``not_applicable``, with the score and the threshold in its reason, and gets no findings and no outputs.

A bundle carries its gate in ``model.json`` (``xraybatch train gate`` fits it; see docs/training.md)::

    "gate": {
      "format": 1,
      "file": "gate.safetensors", "sha256": "...",   # the numbers the scores need
      "pooling": "global+halves", "channels": 1280,   # the features (see pool) and the backbone's channels
      "scores": [                                     # every score must be <= its threshold to pass
        {"name": "distance", "kind": "mahalanobis", "threshold": 27.5, "definition": "..."},
        {"name": "classifier", "kind": "logistic", "threshold": 1.0, "definition": "..."}
      ],
      "rule": "...", "validation": {...}, "test_cases": {...}, "provenance": {...}
    }

The features ``f`` of an image are :func:`pool` of its activations: F = 5 C numbers for C channels.
``gate.safetensors`` holds ``center`` and ``scale`` (F): they are standardised, ``z = (f - center) / scale``.
Per score kind: ``mahalanobis`` needs ``components`` (k x F, a PCA projection ``u = components z``), ``mean`` (k)
and ``precision`` (k x k): the score is the distance ``sqrt((u - mean)' precision (u - mean))``; ``logistic``
needs ``coef`` (F) and ``intercept`` (1): the score is the logit ``z . coef + intercept`` (positive: more like
the negatives than like the chests). A bundle without a ``gate`` block has no learned
gate; ``[gate] enabled = false`` turns every gate off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from xraybatch.errors import ModelError
from xraybatch.models.registry import BundleSpec, sha256_of

if TYPE_CHECKING:
    import torch

    from xraybatch.infer import Features, Predictor
    from xraybatch.settings import GateConfig

logger = logging.getLogger(__name__)

GATE_FORMAT = 1
SCORE_KINDS = {"mahalanobis": ("components", "mean", "precision"), "logistic": ("coef", "intercept")}
REASON = "input gate: not a frontal chest radiograph like the training images"


POOLING = "global+halves"
PARTS = ("global", "top", "bottom", "left", "right")


def pool(activations: torch.Tensor | np.ndarray) -> np.ndarray:
    """The gate's features of backbone activations (N, C, h, w): (N, 5 C) float64.

    Five average pools of each channel, concatenated: the whole map, its top and bottom halves and its left and
    right halves (the halves of an odd size share the middle row or column, as ``adaptive_avg_pool2d`` bins
    them). The global pool says what is in the image; the halves say where, so a chest turned 90 degrees or
    upside down (lung apices at the bottom) differs from an upright one even where its global pool does not.
    """
    if activations.ndim != 4:
        raise ValueError(f"activations must be (N, C, h, w), got shape {tuple(activations.shape)}")
    if not isinstance(activations, np.ndarray):
        activations = activations.detach().float().cpu().numpy()
    x = np.asarray(activations, dtype=np.float64)
    h, w = x.shape[2], x.shape[3]
    top, bottom = slice(0, (h + 1) // 2), slice(h // 2, h)
    left, right = slice(0, (w + 1) // 2), slice(w // 2, w)
    parts = [x.mean(axis=(2, 3)), x[:, :, top].mean(axis=(2, 3)), x[:, :, bottom].mean(axis=(2, 3)),
             x[:, :, :, left].mean(axis=(2, 3)), x[:, :, :, right].mean(axis=(2, 3))]
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class Score:
    """One score of a gate: its name (shown in reasons), kind and threshold (an image passes at or below it)."""

    name: str
    kind: str
    threshold: float


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one image: passed or not, and the text for the results DB.

    ``text`` is the reason of a refused image (the failing score and its threshold), or a note of a passed one
    (every score and threshold). Only numbers: no patient data, no file names.
    """

    passed: bool
    text: str = ""


@dataclass(frozen=True)
class Gate:
    """A bundle's learned gate, loaded from ``model.json`` and ``gate.safetensors``."""

    model_id: str
    channels: int  # of the backbone's activations; the features are len(PARTS) times as many
    scores: tuple[Score, ...]
    tensors: Mapping[str, np.ndarray] = field(repr=False)

    def score(self, activations: torch.Tensor | np.ndarray) -> np.ndarray:
        """Scores (N, len(scores)) of a batch of backbone activations (N, C, h, w); higher is less chest-like.

        Raises
        ------
        ModelError
            When the activations do not have the gate's channel count (a gate fitted on another network).
        """
        if activations.ndim != 4 or activations.shape[1] != self.channels:
            raise ModelError(
                f"the input gate of {self.model_id} was fitted on {self.channels} feature channels, the network "
                f"gives {activations.shape[1] if activations.ndim == 4 else tuple(activations.shape)}; refit it with "
                "`xraybatch train gate BUNDLE` after retraining"
            )
        return self.score_features(pool(activations))

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """:meth:`score` of features already pooled by :func:`pool` (N, 5 C)."""
        t = self.tensors
        z = (np.asarray(features, dtype=np.float64) - t["center"]) / t["scale"]
        out = np.empty((len(features), len(self.scores)), dtype=np.float64)
        for j, s in enumerate(self.scores):
            if s.kind == "mahalanobis":
                d = z @ t["components"].T - t["mean"]
                out[:, j] = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, t["precision"], d), 0.0))
            else:
                out[:, j] = z @ t["coef"] + float(t["intercept"][0])
        return out

    def passes(self, scores: np.ndarray) -> np.ndarray:
        """Per image (row of :meth:`score`): every score at or below its threshold (a NaN score fails)."""
        limits = np.array([s.threshold for s in self.scores])
        return np.all(np.asarray(scores) <= limits, axis=1)

    def verdict(self, row: np.ndarray) -> Verdict:
        """The :class:`Verdict` for one image's scores."""
        for s, value in zip(self.scores, row):
            if not value <= s.threshold:
                return Verdict(False, f"{REASON} ({s.name} {value:.2f} > threshold {s.threshold:.2f}; "
                                      f"gate of {self.model_id})")
        shown = ", ".join(f"{s.name} {v:.2f} <= {s.threshold:.2f}" for s, v in zip(self.scores, row))
        return Verdict(True, f"input gate of {self.model_id}: {shown}")


def read_gate(spec: BundleSpec) -> Gate | None:
    """The gate of a bundle, or ``None`` when its ``model.json`` has no ``gate`` block.

    Raises
    ------
    ModelError
        When the block is malformed, or ``gate.safetensors`` is missing, damaged or does not fit the block.
    """
    block = spec.meta.get("gate")
    if block is None:
        return None
    where = f"bundle {spec.path}: the \"gate\" block of model.json"
    refit = "refit it with `xraybatch train gate` (docs/training.md), or set [gate] enabled = false"
    try:
        if block.get("format") != GATE_FORMAT:
            raise ModelError(f"{where} has format {block.get('format')!r}, this xraybatch reads {GATE_FORMAT}; {refit}")
        channels = int(block["channels"])
        pooling = str(block["pooling"])
        scores = tuple(Score(str(s["name"]), str(s["kind"]), float(s["threshold"])) for s in block["scores"])
        file = spec.path / str(block["file"])
        digest = str(block["sha256"]).lower()
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelError(f"{where} is malformed ({type(err).__name__}: {err}); {refit}") from err
    if pooling != POOLING:
        raise ModelError(f"{where} has pooling {pooling!r}, this xraybatch computes {POOLING!r}; {refit}")
    if not scores:
        raise ModelError(f"{where} lists no scores; {refit}")
    for s in scores:
        if s.kind not in SCORE_KINDS:
            raise ModelError(f"{where}: score {s.name!r} has kind {s.kind!r}, known: {sorted(SCORE_KINDS)}; {refit}")
        if not math.isfinite(s.threshold):
            raise ModelError(f"{where}: score {s.name!r} has threshold {s.threshold}, not a finite number; {refit}")
    if not file.is_file():
        raise ModelError(f"{where} names {file.name}, which is missing; {refit}")
    if sha256_of(file) != digest:
        raise ModelError(f"{where}: sha256 of {file.name} differs from model.json's; the file was changed or "
                         f"damaged: reinstall the bundle or {refit}")
    from safetensors.numpy import load_file

    tensors = {k: np.asarray(v, dtype=np.float64) for k, v in load_file(str(file)).items()}
    _check_shapes(tensors, channels, scores, f"{where} ({file.name})", refit)
    return Gate(spec.model_id, channels, scores, tensors)


def _check_shapes(t: Mapping[str, np.ndarray], channels: int, scores: Sequence[Score], where: str,
                  refit: str) -> None:
    needed = {"center", "scale"} | {name for s in scores for name in SCORE_KINDS[s.kind]}
    missing = sorted(needed - set(t))
    if missing:
        raise ModelError(f"{where} lacks tensors {missing}; {refit}")
    k = t["components"].shape[0] if "components" in t and t["components"].ndim == 2 else -1
    f = len(PARTS) * channels
    expected: dict[str, tuple[int, ...]] = {
        "center": (f,), "scale": (f,), "components": (k, f), "mean": (k,), "precision": (k, k), "coef": (f,),
        "intercept": (1,),
    }
    for name in sorted(needed):
        if t[name].shape != expected[name] or not np.all(np.isfinite(t[name])):
            raise ModelError(f"{where}: tensor {name!r} has shape {t[name].shape} (or values that are not "
                             f"finite), expected {expected[name]} for {channels} channels; {refit}")
    if np.any(t["scale"] <= 0):
        raise ModelError(f"{where}: tensor 'scale' must be positive; {refit}")


def load_gates(predictors: Sequence[Predictor], cfg: GateConfig) -> list[Gate | None]:
    """One entry per predictor: its bundle's gate, or ``None`` (no gate block, or ``[gate] enabled = false``).

    Each gate is checked against its network at start-up (one blank image through the backbone), so a gate
    fitted on another network stops the start-up instead of failing every file.

    Raises
    ------
    ModelError
        As :func:`read_gate`, or when a gate does not fit its network's feature channels.
    """
    if not cfg.enabled:
        return [None] * len(predictors)
    from xraybatch.domain import ModelInput

    gates: list[Gate | None] = []
    for predictor in predictors:
        gate = read_gate(predictor.spec)
        if gate is not None:
            size = predictor.spec.input.size
            blank = ModelInput(np.zeros(size, dtype=np.float32), size)
            gate.score(predictor.forward([blank]).activations)  # raises ModelError on a channel mismatch
            logger.info("input gate of %s: %s", gate.model_id,
                        ", ".join(f"{s.name} <= {s.threshold:g}" for s in gate.scores))
        gates.append(gate)
    return gates


def judge(gates: Sequence[Gate | None], features: Sequence[Features]) -> list[Verdict]:
    """One :class:`Verdict` per image of a batch: refused by the first gate it fails, else passed.

    ``gates`` and ``features`` are aligned with the predictors (:func:`load_gates`, ``Predictor.forward``).
    """
    n = len(features[0].logits) if features else 0
    verdicts = [Verdict(True)] * n
    notes: list[list[str]] = [[] for _ in range(n)]
    for gate, feats in zip(gates, features):
        if gate is None:
            continue
        scores = gate.score(feats.activations)
        for i, row in enumerate(scores):
            if not verdicts[i].passed:
                continue
            verdict = gate.verdict(row)
            if verdict.passed:
                notes[i].append(verdict.text)
            else:
                verdicts[i] = verdict
    return [v if not v.passed else Verdict(True, "; ".join(notes[i])) for i, v in enumerate(verdicts)]

