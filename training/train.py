"""Train a model bundle, top to bottom: data -> patient-wise split -> cached inputs -> network -> epochs -> bundle.

Every choice is a field of :class:`TrainConfig` below, with its default and a comment; the defaults are the
shipped binary Normal/Pneumonia model (``xraybatch/bundles/pneumonia-binary``). The resolved config is saved
in every checkpoint and in the bundle's ``model.json``, so a bundle says exactly how it was made.

Images go through the inference preprocessing (:mod:`training.datasets`) and are cached once; each batch is
augmented (:mod:`training.transforms`) and normalised by :func:`xraybatch.infer.to_tensor`, the function the
:class:`~xraybatch.infer.Predictor` uses. After every epoch the validation split is scored; the best epoch
(validation AUROC, ties to the lower loss) is kept, ReduceLROnPlateau watches the validation loss and early
stopping ends a run that stopped improving. ``last.pt`` holds everything needed to resume. Randomness comes
from ``seed`` and the epoch number only, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from training.datasets import ImageSet, StreamedInputs, iter_batches, jpeg_quality_of, load_inputs, scan
from training.evaluate import (
    binary_metrics,
    fit_temperatures,
    model_card,
    multilabel_metrics,
    sigmoid,
    specificity_threshold,
    write_multilabel_plots,
    write_plots,
    youden_threshold,
)
from training.losses import SAMPLING, WeightedFocalLoss, class_weights, epoch_indices, repeat_factors
from training.pretrained import load_initial_weights
from training.splits import MANIFEST_NAME, Split, patient_split, write_manifest
from training.transforms import AugmentConfig, ReencodeConfig, augment, reencode_batch
from xraybatch.domain import ModelInput
from xraybatch.infer import Predictor, to_tensor
from xraybatch.models.findings import NO_FINDING
from xraybatch.models.nets import XrayNet, build_network
from xraybatch.models.registry import InputSpec, ModelPreprocess, read_bundle, write_model_json
from xraybatch.settings import available_cores

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults: a binary Normal/Pneumonia model (the recipe of bundle 2.x);
    the shipped recipes are training/configs/binary.toml and multilabel.toml, where ``train binary`` and
    ``train multilabel`` start."""

    # data
    data: str = ""  # data root (Kermany: the folder holding train/; NIH; DICOM folder with labels.csv)
    layout: str = "auto"  # kermany | nih | dicom | auto (detect)
    split: str = "train"  # the layout's split to train on; validation is carved out of it patient-wise
    val_fraction: float = 0.15  # share of images (whole patients) held out for validation
    extra_eval: tuple[str, ...] = ("val",)  # other splits of the layout scored for the record only (if present)
    # model
    architecture: str = "efficientnet_lite0"  # separable_cnn | efficientnet_lite0 | resnet50
    architecture_args: Mapping[str, Any] = field(default_factory=dict)  # constructor kwargs (widths, dropout)
    init: str = "imagenet"  # imagenet | none | PATH to a weights file (see training.pretrained)
    input_size: int = 224  # model input is input_size x input_size (Kermany train images are 224x224)
    contrast: str = "equalise"  # model input contrast (ModelPreprocess): equalise (encoding-invariant) | display
    input_jpeg_quality: int = -1  # ModelPreprocess.jpeg_quality; -1: read off the pictures (jpeg_quality_of); 0: off
    freeze: int = 4  # leading modules of net.features kept frozen (EfficientNet: stem + 3 stages); 0 = none
    # optimisation
    epochs: int = 7  # maximum number of epochs (the shipped binary run: 7 on 2 CPU cores, about 50 min)
    batch_size: int = 32  # images per step
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    loss: str = "focal"  # focal | bce
    focal_gamma: float = 1.0  # focusing parameter (0 = cross-entropy)
    focal_alpha: float | None = None  # positive-class balance in (0, 1); None = off (class weights do it)
    class_weighting: str = "none"  # balanced (n / (2 n_class), capped) | none (sampling balances instead)
    max_class_weight: float = 5.0  # cap on any class weight
    sampling: str = "undersample"  # none | undersample | oversample (first target) | repeat (multi-label)
    repeat_threshold: float = 0.1  # repeat sampling: findings rarer than this share of images get repeated
    max_repeat: float = 4.0  # repeat sampling: cap on an image's repeat factor
    no_finding_keep: float = 0.5  # repeat sampling: share of images without any finding kept per epoch
    lr_factor: float = 0.3  # ReduceLROnPlateau: multiply lr by this when validation loss stalls
    lr_patience: int = 1  # ... for this many epochs
    min_lr: float = 1e-6  # lr floor
    early_stop_patience: int = 3  # stop after this many epochs without a better validation AUROC
    reencode: ReencodeConfig = field(default_factory=ReencodeConfig)  # bit depth, polarity, window, JPEG, noise
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # rotation, shift, zoom, brightness, flip
    # operating point and calibration
    min_recall: float = 0.95  # binary: best Youden's J among thresholds with validation Pneumonia recall >= this
    specificity: float = 0.95  # multilabel: each finding's threshold keeps this validation specificity
    calibrate: bool = True  # fit per-target temperatures on validation (probabilities only; ranking unchanged)
    # runtime
    seed: int = 20240601  # seeds python, numpy, torch, the split, epoch order and augmentation
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn-only where an op has none)
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda
    threads: int = 2  # torch intra-op threads on CPU; 0 = torch's default
    loader: str = "auto"  # memory (cached array) | stream (decode per batch in workers) | auto (by size)
    stream_above: int = 20000  # auto: stream when the training data has more images than this
    workers: int = 4  # processes that make the training batches (decode when streaming, re-encode); <= CPU count
    amp: bool = True  # mixed precision (float16 autocast + GradScaler) on CUDA; ignored on CPU
    cache_dir: str = "data-cache"  # preprocessed model inputs are cached here (git-ignored)
    checkpoint_dir: str = ""  # last.pt / best.pt; empty = CACHE_DIR/checkpoints/<bundle folder name>
    # bundle
    name: str = "xraybatch-pneumonia"  # model id in the DB and the DICOM outputs
    version: str = "2.0.0"
    task: str = "binary"  # binary (one target, Pneumonia) | multilabel (NIH: 14 findings + No Finding)

    def __post_init__(self) -> None:
        if self.loss not in ("focal", "bce"):
            raise ValueError(f"loss must be 'focal' or 'bce', got {self.loss!r}")
        if self.class_weighting not in ("balanced", "none"):
            raise ValueError(f"class_weighting must be 'balanced' or 'none', got {self.class_weighting!r}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("epochs must be >= 1, batch_size >= 2 and lr > 0")
        if self.task not in ("binary", "multilabel"):
            raise ValueError(f"task must be 'binary' or 'multilabel', got {self.task!r}")
        if self.task == "multilabel" and self.sampling in ("undersample", "oversample"):
            raise ValueError(f"sampling {self.sampling!r} balances one target; multilabel uses 'repeat' or 'none'")
        if self.repeat_threshold <= 0 or self.max_repeat < 1 or not 0 < self.no_finding_keep <= 1:
            raise ValueError("repeat_threshold must be > 0, max_repeat >= 1 and no_finding_keep in (0, 1]")
        if self.loader not in ("auto", "memory", "stream"):
            raise ValueError(f"loader must be auto, memory or stream, got {self.loader!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not -1 <= self.input_jpeg_quality <= 100:
            raise ValueError(f"input_jpeg_quality must be -1 (detect), 0 (off) or 1-100, got {self.input_jpeg_quality}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the form stored in checkpoints and model.json)."""
        d = asdict(self)
        d["architecture_args"] = dict(self.architecture_args)
        d["extra_eval"] = list(self.extra_eval)
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "augment" in values and isinstance(values["augment"], Mapping):
            values["augment"] = AugmentConfig(**values["augment"])
        if "reencode" in values and isinstance(values["reencode"], Mapping):
            values["reencode"] = ReencodeConfig(**values["reencode"])
        if "extra_eval" in values:
            values["extra_eval"] = tuple(values["extra_eval"])
        return cls(**values)


# Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = {"epochs", "device", "threads", "checkpoint_dir", "cache_dir", "early_stop_patience", "loader",
                     "stream_above", "workers",
                     # chosen or scored after training, from the best epoch's weights: the weights do not depend on them
                     "min_recall", "specificity", "calibrate", "extra_eval"}


class Reporter(Protocol):
    """Receives progress; the CLI shows it as a progress bar with live metrics."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, metrics: Mapping[str, float]) -> None: ...

    def epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None: ...


class LogReporter:
    """Logs one line per epoch (and every ``every`` steps)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self._step = 0

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._step = 0
        logger.info("epoch %d/%d: %d steps", epoch, epochs, steps)

    def step(self, metrics: Mapping[str, float]) -> None:
        self._step += 1
        if self.every and self._step % self.every == 0:
            logger.info("  step %d: %s", self._step, _fmt(metrics))

    def epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        logger.info("epoch %d done: %s", epoch, _fmt(metrics))


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def input_spec(architecture: str, size: int) -> InputSpec:
    """Channels and normalisation each architecture expects on [0, 1] images."""
    if architecture == "efficientnet_lite0":  # TensorFlow Lite training: (x - 127) / 128 on 0..255 pixels
        return InputSpec(size=(size, size), channels=1, mean=(0.5,), std=(0.5,))
    if architecture == "resnet50":  # torchvision ImageNet statistics on a grey image repeated over RGB
        return InputSpec(size=(size, size), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return InputSpec(size=(size, size), channels=1, mean=(0.0,), std=(1.0,))  # rescales inside the model


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; make torch deterministic where it can be."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        # float32 convolutions and products in full precision on CUDA, not TF32: the validation probabilities that
        # set the temperature and the threshold then match the bundle's Predictor on the CPU (within 1e-4)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What ran an epoch, for the model card: ``cuda (NVIDIA H200)`` or ``cpu (2 cores, 2 threads)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def git_revision() -> str:
    """``git rev-parse HEAD`` of the source tree, with ``+dirty`` when it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def checkpoint_dir(cfg: TrainConfig, out: Path) -> Path:
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else Path(cfg.cache_dir) / "checkpoints" / out.name


def build_model(cfg: TrainConfig, num_outputs: int) -> XrayNet:
    """The network with its initial weights and frozen leading modules."""
    spec = input_spec(cfg.architecture, cfg.input_size)
    net = build_network(cfg.architecture, num_outputs=num_outputs, in_channels=spec.channels,
                        **dict(cfg.architecture_args))
    load_initial_weights(net, cfg.architecture, cfg.init)
    for module in list(net.features.children())[: cfg.freeze]:
        module.requires_grad_(False)
    return net


def set_train_mode(net: XrayNet, freeze: int) -> None:
    """``train()``, except frozen modules stay in eval mode (their batch-norm statistics stay fixed)."""
    net.train()
    for module in list(net.features.children())[:freeze]:
        module.eval()


def _reencoded(step: int, pixels: np.ndarray, cfg: ReencodeConfig, seed: int, epoch: int,
               jpeg_quality: int) -> np.ndarray:
    """Training batch ``step`` of ``epoch``, re-encoded with randomness drawn from (seed, epoch, step) alone, so
    a batch is the same whichever DataLoader worker makes it."""
    return reencode_batch(pixels, cfg, np.random.default_rng([seed, epoch, step]), jpeg_quality)


def predict_logits(net: XrayNet, inputs: np.ndarray | StreamedInputs, indices: Sequence[int] | np.ndarray,
                   spec: InputSpec, device: torch.device, batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """(len(indices), targets) logits in eval mode, through :func:`to_tensor` like the Predictor."""
    net.eval()
    out = []
    indices = np.asarray(indices, dtype=np.int64)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    with torch.inference_mode():
        for _, pixels in iter_batches(inputs, batches, workers):
            out.append(net(to_tensor(list(pixels), spec).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def finding_columns(targets: Sequence[str]) -> np.ndarray:
    """Boolean mask of the targets that are findings (every target but "No Finding")."""
    return np.array([t != NO_FINDING for t in targets], dtype=bool)


def _val_scores(logits: np.ndarray, labels: np.ndarray, findings: np.ndarray) -> tuple[float, float]:
    """Unweighted BCE over all targets, and the mean AUROC of the ``findings`` columns with both classes
    (for one target: its AUROC). These choose the best epoch."""
    from sklearn.metrics import roc_auc_score

    z, y = logits.astype(np.float64), labels
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    aucs = [roc_auc_score(y[:, j], z[:, j]) for j in np.flatnonzero(findings) if 0 < y[:, j].sum() < len(y)]
    return loss, float(np.mean(aucs)) if aucs else float("nan")


@dataclass
class FitResult:
    """A trained network (at its best epoch) and how it got there."""

    net: XrayNet
    history: list[dict[str, float]]
    best_epoch: int
    device: torch.device


class TrainingDiverged(ValueError):
    """The training loss or the validation logits stopped being finite numbers."""


def model_preprocess(cfg: TrainConfig) -> ModelPreprocess:
    """The bundle's binding preprocessing (recorded in model.json; inference makes its inputs the same way)."""
    return ModelPreprocess(contrast=cfg.contrast, jpeg_quality=cfg.input_jpeg_quality)


def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, ImageSet, Split, np.ndarray | StreamedInputs]:
    """Scan the data, split it by patient and load the cached model inputs (or stream them, for large sets).

    The returned settings have ``input_jpeg_quality`` resolved: -1 becomes what :func:`jpeg_quality_of` reads
    off the training pictures."""
    images = scan(cfg.data, cfg.layout, cfg.split)
    split = patient_split(images, cfg.val_fraction, cfg.seed)
    size = (cfg.input_size, cfg.input_size)
    if cfg.input_jpeg_quality < 0:
        quality = jpeg_quality_of(images, size)
        logger.info("training pictures: %s", f"JPEG quality {quality} at the model's size" if quality else
                    "not all JPEG files of one quality at the model's size: no JPEG step in the model input")
        cfg = dataclasses.replace(cfg, input_jpeg_quality=quality)
    if cfg.loader == "stream" or (cfg.loader == "auto" and len(images.samples) > cfg.stream_above):
        logger.info("streaming %d images through %d DataLoader workers", len(images.samples), cfg.workers)
        return cfg, images, split, StreamedInputs(images, model_preprocess(cfg), size)
    inputs = load_inputs(images, model_preprocess(cfg), size, Path(cfg.cache_dir) if cfg.cache_dir else None)
    return cfg, images, split, inputs


def train(cfg: TrainConfig, out: Path, reporter: Reporter | None = None, resume: bool = False,
          command: Sequence[str] | None = None) -> Path:
    """Train according to ``cfg`` and write the bundle to ``out``; returns ``out``.

    Raises
    ------
    ValueError
        For unusable data or settings, or a resume whose checkpoint was made with other settings.
    """
    started, revision = time.time(), git_revision()
    out = Path(out)
    seed_everything(cfg.seed, cfg.deterministic)
    cfg, images, split, inputs = prepare_data(cfg)
    result = fit(cfg, images, split, inputs, reporter=reporter, ckpt_dir=checkpoint_dir(cfg, out), resume=resume)
    return export_bundle(out, cfg, result.net, images, split, inputs, history=result.history,
                         best_epoch=result.best_epoch, device=result.device, started=started, command=command,
                         revision=revision)


def fit(
    cfg: TrainConfig,
    images: ImageSet,
    split: Split,
    inputs: np.ndarray | StreamedInputs,
    reporter: Reporter | None = None,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, Mapping[str, float]], None] | None = None,
) -> FitResult:
    """The training loop. Returns the network loaded with its best epoch's weights.

    With ``ckpt_dir``, ``last.pt`` and ``best.pt`` are written there after every epoch (and ``resume`` continues
    from ``last.pt``); without it the best weights are kept in memory. ``on_epoch(epoch, row)`` sees each
    epoch's validation scores (Optuna prunes trials from it).
    """
    reporter = reporter or LogReporter()
    seed_everything(cfg.seed, cfg.deterministic)
    revision = git_revision()
    device = pick_device(cfg.device)
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    spec = input_spec(cfg.architecture, cfg.input_size)
    labels = images.labels().astype(np.float32)
    train_idx, val_idx = np.asarray(split.train), np.asarray(split.val)
    findings = finding_columns(images.targets)
    factors = (repeat_factors(labels[train_idx][:, findings], cfg.repeat_threshold, cfg.max_repeat)
               if cfg.sampling == "repeat" else None)
    workers = cfg.workers if isinstance(inputs, StreamedInputs) else 0  # validation: decoding only
    batch_workers = min(cfg.workers, available_cores())  # training batches: decoding and re-encoding
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    # network, loss, optimiser, schedule
    net = build_model(cfg, num_outputs=len(images.targets)).to(device)
    weights = class_weights(labels[train_idx], cfg.max_class_weight) if cfg.class_weighting == "balanced" else None
    loss_fn = WeightedFocalLoss(gamma=cfg.focal_gamma if cfg.loss == "focal" else 0.0,
                                alpha=cfg.focal_alpha if cfg.loss == "focal" else None, weights=weights).to(device)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                                           patience=cfg.lr_patience, min_lr=cfg.min_lr)
    history: list[dict[str, float]] = []
    best: dict[str, float] = {"epoch": 0, "auroc": -1.0, "loss": float("inf")}
    best_weights: dict[str, torch.Tensor] = {}
    first_epoch = 1
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if resume and (ckpt_dir / "last.pt").is_file():
            state = torch.load(ckpt_dir / "last.pt", map_location=device, weights_only=False)
            _check_resumable(state["config"], cfg)
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            history, best, first_epoch = state["history"], state["best"], state["epoch"] + 1
            logger.info("resuming from %s after epoch %d", ckpt_dir / "last.pt", state["epoch"])
        elif resume:
            logger.warning("--resume: no %s yet, starting afresh", ckpt_dir / "last.pt")
    logger.info("training %s on %s: %d train / %d val images, %d trainable parameters", cfg.architecture, device,
                len(train_idx), len(val_idx), sum(p.numel() for p in net.parameters() if p.requires_grad))

    for epoch in range(first_epoch, cfg.epochs + 1):
        if best["epoch"] > 0 and epoch - best["epoch"] > cfg.early_stop_patience:
            logger.info("early stop: no better validation AUROC since epoch %d", best["epoch"])
            break
        t0 = time.time()
        torch.manual_seed(cfg.seed + epoch)  # dropout / stochastic depth of this epoch
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # augmentation of this epoch
        order = train_idx[epoch_indices(labels[train_idx][:, findings], cfg.sampling,
                                        np.random.default_rng([cfg.seed, epoch]), factors, cfg.no_finding_keep)]
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        batches = [b for b in batches if len(b) > 1]  # batch norm needs two images
        reporter.epoch_start(epoch, cfg.epochs, len(batches))
        set_train_mode(net, cfg.freeze)
        total, seen, correct = 0.0, 0, 0
        reencoded = functools.partial(_reencoded, cfg=cfg.reencode, seed=cfg.seed, epoch=epoch,
                                      jpeg_quality=cfg.input_jpeg_quality)
        for step, (idx, pixels) in enumerate(iter_batches(inputs, batches, batch_workers, transform=reencoded,
                                                          pin_memory=device.type == "cuda")):
            views = augment(torch.as_tensor(pixels)[:, None], cfg.augment, generator)
            x = to_tensor(list(views[:, 0].numpy()), spec).to(device, non_blocking=True)
            y = torch.from_numpy(labels[idx]).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged: the loss is {loss.item()} at epoch {epoch}, step {step + 1} (lr "
                    f"{optimizer.param_groups[0]['lr']:.3g}); lower the learning rate or change the loss settings")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(idx)
            seen += len(idx)
            correct += int(((logits.detach() > 0) == (y > 0.5)).all(dim=1).sum())
            reporter.step({"loss": total / seen, "acc": correct / seen})
        val_logits = predict_logits(net, inputs, val_idx, spec, device, workers=workers)
        if not np.isfinite(val_logits).all():
            raise TrainingDiverged(f"training diverged: the validation logits are not finite after epoch {epoch} "
                                   f"(lr {optimizer.param_groups[0]['lr']:.3g}); lower the learning rate")
        val_loss, val_auroc = _val_scores(val_logits, labels[val_idx], findings)
        scheduler.step(val_loss)
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_loss": val_loss, "val_auroc": val_auroc, "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.time() - t0, "device": device_name(device)}
        history.append(row)
        if np.isnan(val_auroc):  # a validation side with one class: fall back to the loss
            improved = val_loss < best["loss"]
        else:
            improved = val_auroc > best["auroc"] + 1e-4 or (abs(val_auroc - best["auroc"]) <= 1e-4
                                                            and val_loss < best["loss"])
        if improved:
            best = {"epoch": epoch, "auroc": val_auroc, "loss": val_loss}
        if ckpt_dir is not None:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "history": history, "best": best,
                     "config": cfg.to_dict(), "targets": list(images.targets),
                     "split": {"train": list(split.train), "val": list(split.val)}, "git_revision": revision}
            if improved:
                torch.save(state, ckpt_dir / "best.pt")
            torch.save(state, ckpt_dir / "last.pt")
        elif improved:
            best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        scores = {k: v for k, v in row.items() if k not in ("epoch", "device")}
        reporter.epoch_end(epoch, scores | {"best_epoch": best["epoch"]})
        if on_epoch is not None:
            on_epoch(epoch, row)

    if ckpt_dir is not None:
        best_weights = torch.load(ckpt_dir / "best.pt", map_location=device, weights_only=False)["model"]
    net.load_state_dict(best_weights)
    net.eval()
    return FitResult(net=net, history=history, best_epoch=int(best["epoch"]), device=device)


def _check_resumable(saved: Mapping[str, Any], cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and _jsonable(saved.get(k)) != _jsonable(now[k]))
    if changed:
        raise ValueError(f"cannot resume: the checkpoint was trained with other {changed}; "
                         "use the same settings or start afresh without --resume")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


@dataclass
class OperatingPoint:
    """Calibration, thresholds and validation metrics of a trained network (what export writes)."""

    temperatures: list[float]  # one per target
    thresholds: dict[str, float]
    probs: np.ndarray  # (validation images, targets) calibrated probabilities
    metrics: dict[str, Any]
    rule: str
    plots: dict[str, list[str]]
    extra: dict[str, Any] = field(default_factory=dict)
    extra_sets: list[tuple[str, ImageSet]] = field(default_factory=list)


def binary_operating_point(out: Path, cfg: TrainConfig, net: XrayNet, images: ImageSet, split: Split,
                           inputs: np.ndarray | StreamedInputs, device: torch.device) -> OperatingPoint:
    """Temperature, the Pneumonia threshold by the recall rule, metrics and plots; extra official splits."""
    spec = input_spec(cfg.architecture, cfg.input_size)
    val_idx = np.asarray(split.val)
    y_val = images.labels()[val_idx, 0]
    logits = predict_logits(net, inputs, val_idx, spec, device)[:, 0]
    temperature = fit_temperatures(logits[:, None], y_val[:, None])[0] if cfg.calibrate else 1.0
    probs = sigmoid(logits / temperature)
    threshold = round(youden_threshold(y_val, probs, cfg.min_recall), 6)  # the value stored is the value scored
    val_metrics = binary_metrics(y_val, probs, threshold)
    rule = (f"the best balanced accuracy (Youden's J) on validation among thresholds that keep Pneumonia recall >= "
            f"{cfg.min_recall}; the middle (in logit space) of the range of tied thresholds")
    logger.info("validation: accuracy %.4f AUROC %.4f at threshold %.4f (T=%.3f)", val_metrics["accuracy"],
                val_metrics["auroc"], threshold, temperature)

    plots = {"validation": write_plots(out, y_val, probs, val_metrics, "validation")}
    extra: dict[str, Any] = {}
    extra_sets = []
    for name in cfg.extra_eval:
        try:
            other = scan(cfg.data, images.layout, name)
        except ValueError:
            continue
        if {s.path for s in other.samples} & {s.path for s in images.samples}:
            continue  # the same folder (e.g. a data root that is itself one split)
        other_inputs = load_inputs(other, model_preprocess(cfg), spec.size, Path(cfg.cache_dir) if cfg.cache_dir else None)
        p = sigmoid(predict_logits(net, other_inputs, range(len(other.samples)), spec, device)[:, 0] / temperature)
        y = other.labels()[:, 0]
        if len(set(y.tolist())) == 2:
            key = f"{images.layout} official '{name}' split"
            extra[key] = binary_metrics(y, p, threshold)
            extra_sets.append((f"extra-{name}", other))  # never "train"/"val": those are the split
            plots[key] = write_plots(out, y, p, extra[key], f"{images.layout}_{name}")[:2]
            (out / f"{images.layout}_{name}_confusion.png").unlink(missing_ok=True)
    return OperatingPoint([temperature], {images.targets[0]: round(threshold, 6)}, probs[:, None], val_metrics, rule,
                          plots, extra, extra_sets)


def multilabel_operating_point(out: Path, cfg: TrainConfig, net: XrayNet, images: ImageSet, split: Split,
                               inputs: np.ndarray | StreamedInputs, device: torch.device) -> OperatingPoint:
    """Per-target temperatures, per-target thresholds at a fixed validation specificity, metrics, plots."""
    spec = input_spec(cfg.architecture, cfg.input_size)
    labels = images.labels()
    val_idx = np.asarray(split.val)
    y_val = labels[val_idx]
    workers = cfg.workers if isinstance(inputs, StreamedInputs) else 0
    logits = predict_logits(net, inputs, val_idx, spec, device, workers=workers)
    temperatures = fit_temperatures(logits, y_val) if cfg.calibrate else [1.0] * len(images.targets)
    probs = sigmoid(logits / np.asarray(temperatures))
    thresholds = [round(specificity_threshold(y_val[:, j], probs[:, j], cfg.specificity), 6)  # stored = scored
                  for j in range(probs.shape[1])]
    rules = ["specificity"] * len(thresholds)
    val_metrics = multilabel_metrics(y_val, probs, images.targets, thresholds, rules)
    rule = (f"per target, the threshold that keeps validation specificity {cfg.specificity} (the "
            f"{cfg.specificity} quantile of the probabilities of the validation images without that finding)")
    logger.info("validation: mean AUROC %.4f over %d findings, %.2f findings called per image (labels: %.2f)",
                val_metrics["mean_auroc"], val_metrics["findings_with_auroc"],
                val_metrics["findings_per_image_predicted"], val_metrics["findings_per_image_labels"])
    plots = {"validation": write_multilabel_plots(out, y_val, probs, thresholds, images.targets, "validation")}
    return OperatingPoint(temperatures, {t: round(v, 6) for t, v in zip(images.targets, thresholds, strict=True)},
                          probs, val_metrics, rule, plots)


def _class_counts(images: ImageSet, split: Split) -> dict[str, dict[str, int]]:
    """Per side: Normal/Pneumonia counts (one target) or positives per target (multi-label)."""
    labels = images.labels()
    counts = {}
    for side, idx in (("train", np.asarray(split.train)), ("val", np.asarray(split.val))):
        if len(images.targets) == 1:
            counts[side] = {"Normal": int((labels[idx, 0] == 0).sum()), "Pneumonia": int((labels[idx, 0] == 1).sum())}
        else:
            counts[side] = {t: int(labels[idx, j].sum()) for j, t in enumerate(images.targets)}
    return counts


def _image_sizes(images: ImageSet) -> dict[str, int]:
    """How many images of each source size (read from the PNG/JPEG header; DICOM files are not counted)."""
    from collections import Counter

    from PIL import Image

    sizes: Counter[str] = Counter()
    for sample in images.samples[:5000]:  # a record, not a census: large sets are sampled
        if sample.path.suffix.lower() in (".png", ".jpeg", ".jpg") and sample.path.is_file():
            with Image.open(sample.path) as img:
                sizes[f"{img.width}x{img.height}"] += 1
    return dict(sizes.most_common())


def export_bundle(
    out: Path,
    cfg: TrainConfig,
    net: XrayNet,
    images: ImageSet,
    split: Split,
    inputs: np.ndarray | StreamedInputs,
    history: Sequence[Mapping[str, Any]],
    best_epoch: int,
    device: torch.device,
    started: float,
    command: Sequence[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Write weights, model.json, split manifest, plots and model card; check that the Predictor agrees.

    ``revision`` is the git revision the run started from (default: the current one).
    """
    from safetensors.torch import save_file

    spec = input_spec(cfg.architecture, cfg.input_size)
    out.mkdir(parents=True, exist_ok=True)
    val_idx = np.asarray(split.val)
    point = (multilabel_operating_point if cfg.task == "multilabel" else binary_operating_point)(
        out, cfg, net, images, split, inputs, device)
    temperatures, probs, plots = point.temperatures, point.probs, point.plots

    weights_file = "weights.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / weights_file))
    (out / weights_file).chmod(0o644)  # safetensors writes 0600; a bundle is read by other users
    write_manifest(out / MANIFEST_NAME, images, split, extra=point.extra_sets)
    seconds = [h["seconds"] for h in history]
    meta: dict[str, Any] = {
        "name": cfg.name,
        "version": cfg.version,
        "task": cfg.task,
        "architecture": cfg.architecture,
        "architecture_args": dict(cfg.architecture_args),
        "targets": list(images.targets),
        "thresholds": point.thresholds,
        "temperature": temperatures,
        "input": {"size": list(spec.size), "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std)},
        "preprocessing": model_preprocess(cfg).to_meta(),
        "weights": {"file": weights_file},
        "provenance": {
            "data": str(cfg.data),
            "layout": images.layout,
            "split": images.split,
            "split_manifest": MANIFEST_NAME,
            "images": {"total": len(images.samples), "train": len(split.train), "val": len(split.val)},
            "class_counts": _class_counts(images, split),
            "image_sizes": _image_sizes(images),
            "command": " ".join(shlex.quote(a) for a in (command or sys.argv)),
            "git_revision": revision or git_revision(),
            "seed": cfg.seed,
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "seconds_per_epoch": round(float(np.mean(seconds)), 1) if seconds else 0.0,
            "total_minutes": round((time.time() - started) / 60.0, 1),  # this process: export only when resumed
            "training_minutes": round(float(np.sum(seconds)) / 60.0, 1),  # every epoch, also across resumptions
            # the epochs' devices (a resumed run may have trained elsewhere) and the one that exported the bundle
            "device": ", ".join(dict.fromkeys(h["device"] for h in history if "device" in h)) or device_name(device),
            "exported_on": device_name(device),
            "torch": torch.__version__,
            "config": cfg.to_dict(),
            "history": [dict(h) for h in history],
        },
        "metrics": {"threshold_rule": point.rule, "validation": point.metrics, "extra": point.extra, "plots": plots},
    }
    write_model_json(out, meta)
    written = json.loads((out / "model.json").read_text(encoding="utf-8"))  # the card shows what the JSON holds
    (out / "model_card.md").write_text(model_card(written, written["provenance"]["history"], plots),
                                       encoding="utf-8")

    # The Predictor must reproduce the evaluation's probabilities from the bundle alone.
    predictor = Predictor(read_bundle(out))
    check = val_idx[:256]
    got = np.array([p.probabilities for p in predictor.predict(
        [ModelInput(pixels=px, source_shape=px.shape) for px in inputs[check]])])
    gap = float(np.max(np.abs(got - probs[: len(check)]))) if len(check) else 0.0
    if gap > 1e-4:
        raise RuntimeError(f"the exported bundle disagrees with the evaluation by {gap:.2e} in probability")
    logger.info("bundle written to %s (Predictor agrees within %.1e)", out, gap)
    return out
