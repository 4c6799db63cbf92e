"""Hyper-parameter search with Optuna, stored in SQLite so an interrupted study resumes.

Search space (define-by-run):

- ``lr``: log-uniform 1e-4 .. 3e-3
- ``batch_size``: 16, 32 or 64
- ``focal_gamma``: 0 .. 3; ``focal_alpha``: off, or 0.25 .. 0.75
- ``sampling``: ``undersample`` (no class weights), or ``none`` with balanced class weights capped at
  ``max_class_weight`` (1 .. 10)
- ``min_recall`` (the recall floor of the operating threshold rule): 0.90 .. 0.99
- ``freeze`` (EfficientNet-Lite0 only; leading feature modules kept frozen): 0, 2 or 4

Multi-label (``task = "multilabel"``, e.g. ``--config training/configs/multilabel.toml``): the same learning
rate, batch size, focal alpha/gamma and frozen depth; ``sampling`` is ``repeat`` (with ``repeat_threshold``
0.02 .. 0.3 and ``no_finding_keep`` 0.2 .. 1) or ``none``; balanced class weights always, capped at
``max_class_weight`` (1 .. 10); ``specificity`` (the validation specificity of the per-target thresholds)
0.85 .. 0.98.

Each trial trains on the training side of the patient-wise split (optionally a patient subset) and is scored
on the validation side. Objective (maximised): balanced accuracy (mean of Normal and Pneumonia recall) on one
half of the validation patients, at the threshold the trial's rule picks on the other half, so the threshold
is never scored on the images that chose it; multi-label: the mean F1 over the findings with positives on the
scoring half, at the per-target specificity thresholds chosen on the other half. Validation AUROC (multi-label: mean over
the findings) is reported after each epoch (the median pruner stops weak trials early) and stored as a user
attribute with the other scores.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets import ImageSet
from training.evaluate import multilabel_metrics, sigmoid, specificity_threshold, youden_threshold
from training.splits import Split
from training.train import (
    TrainConfig,
    TrainingDiverged,
    finding_columns,
    fit,
    input_spec,
    predict_logits,
    prepare_data,
)

logger = logging.getLogger(__name__)

# EfficientNet-Lite0 modules kept frozen: all trained, the stem + first stage frozen, the stem + three stages frozen
FREEZE_CHOICES = (0, 2, 4)


def patient_subset(images: ImageSet, positions: tuple[int, ...], fraction: float, seed: int) -> tuple[int, ...]:
    """The images of a seeded ``fraction`` of the patients among ``positions`` (whole patients, at least one)."""
    patients = sorted({images.samples[i].patient_id for i in positions})
    count = max(1, round(fraction * len(patients)))
    keep = set(np.random.default_rng(seed).permutation(patients)[:count].tolist())
    return tuple(i for i in positions if images.samples[i].patient_id in keep)


def suggest(trial: Any, base: TrainConfig) -> TrainConfig:
    """The trial's TrainConfig: ``base`` with the searched fields replaced."""
    if base.task == "multilabel":
        return _suggest_multilabel(trial, base)
    sampling = trial.suggest_categorical("sampling", ["undersample", "none"])
    changes = _suggest_common(trial, base, sampling, "min_recall", (0.90, 0.99))
    if sampling == "none":
        changes["class_weighting"] = "balanced"
        changes["max_class_weight"] = trial.suggest_float("max_class_weight", 1.0, 10.0)
    else:
        changes["class_weighting"] = "none"
    return dataclasses.replace(base, **changes)


def _suggest_common(trial: Any, base: TrainConfig, sampling: str, rule: str, bounds: tuple[float, float]
                    ) -> dict[str, Any]:
    """Learning rate, batch size, focal gamma/alpha, the threshold rule's parameter and (EfficientNet-Lite0) the
    frozen depth, in the study's order."""
    changes: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64]),
        "loss": "focal",
        "focal_gamma": trial.suggest_float("focal_gamma", 0.0, 3.0),
        "sampling": sampling,
        rule: trial.suggest_float(rule, *bounds),
    }
    use_alpha = trial.suggest_categorical("use_focal_alpha", [False, True])
    changes["focal_alpha"] = trial.suggest_float("focal_alpha", 0.25, 0.75) if use_alpha else None
    if base.architecture == "efficientnet_lite0":
        changes["freeze"] = trial.suggest_categorical("freeze", list(FREEZE_CHOICES))
    return changes


def _suggest_multilabel(trial: Any, base: TrainConfig) -> TrainConfig:
    sampling = trial.suggest_categorical("sampling", ["repeat", "none"])
    changes = _suggest_common(trial, base, sampling, "specificity", (0.85, 0.98))
    changes["class_weighting"] = "balanced"
    changes["max_class_weight"] = trial.suggest_float("max_class_weight", 1.0, 10.0)
    if sampling == "repeat":
        changes["repeat_threshold"] = trial.suggest_float("repeat_threshold", 0.02, 0.3, log=True)
        changes["no_finding_keep"] = trial.suggest_float("no_finding_keep", 0.2, 1.0)
    return dataclasses.replace(base, **changes)


def multilabel_objective_scores(labels: np.ndarray, probs: np.ndarray, part_a: np.ndarray, part_b: np.ndarray,
                                specificity: float, targets: tuple[str, ...]) -> dict[str, float]:
    """Per-target thresholds by the rule on ``part_a``; mean F1 over the findings with positives in ``part_b``."""
    thresholds = [specificity_threshold(labels[part_a, j], probs[part_a, j], specificity)
                  for j in range(labels.shape[1])]
    scored = multilabel_metrics(labels[part_b], probs[part_b], targets, thresholds)["per_target"]
    findings = finding_columns(targets)
    f1 = [scored[t]["f1"] for j, t in enumerate(targets) if findings[j] and scored[t]["support_pos"] > 0]
    return {"mean_f1": float(np.mean(f1)) if f1 else float("nan"),
            "auroc": multilabel_metrics(labels, probs, targets)["mean_auroc"]}


def halves(split: Split, patients: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions within ``split.val`` of two patient-disjoint halves (threshold half, scoring half)."""
    rng = np.random.default_rng(seed)
    unique = sorted(set(patients))
    chosen = set(rng.permutation(unique)[: len(unique) // 2].tolist())
    in_a = np.array([p in chosen for p in patients])
    return np.flatnonzero(in_a), np.flatnonzero(~in_a)


def objective_scores(labels: np.ndarray, probs: np.ndarray, part_a: np.ndarray, part_b: np.ndarray,
                     min_recall: float) -> dict[str, float]:
    """Threshold by the rule on ``part_a``; balanced accuracy (and both recalls) of ``part_b`` at it."""
    from sklearn.metrics import roc_auc_score

    threshold = youden_threshold(labels[part_a], probs[part_a], min_recall)
    y, pred = labels[part_b].astype(bool), probs[part_b] >= threshold
    recall_pos = float(pred[y].mean()) if y.any() else float("nan")
    recall_neg = float((~pred[~y]).mean()) if (~y).any() else float("nan")
    return {"balanced_accuracy": (recall_pos + recall_neg) / 2.0, "threshold": threshold,
            "pneumonia_recall": recall_pos, "normal_recall": recall_neg, "auroc": float(roc_auc_score(labels, probs))}


def run_study(base: TrainConfig, storage: Path, study_name: str, trials: int, timeout: float | None = None,
              subset: float = 1.0) -> Any:
    """Run ``trials`` more trials of the study in ``storage`` (created or resumed); returns the study."""
    import optuna

    if not 0.0 < subset <= 1.0:
        raise ValueError(f"subset must be in (0, 1], got {subset}")
    base, images, split, inputs = prepare_data(base)
    if subset < 1.0:
        split = Split(patient_subset(images, split.train, subset, base.seed),
                      patient_subset(images, split.val, subset, base.seed), split.seed, split.val_fraction)
    val_idx = np.asarray(split.val)
    multilabel = base.task == "multilabel"
    labels = images.labels()[val_idx] if multilabel else images.labels()[val_idx, 0]
    part_a, part_b = halves(split, [images.samples[i].patient_id for i in val_idx], base.seed)
    spec = input_spec(base.architecture, base.input_size)

    def objective(trial: Any) -> float:
        cfg = suggest(trial, base)

        def report(epoch: int, row: Any) -> None:
            trial.report(row["val_auroc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            result = fit(cfg, images, split, inputs, ckpt_dir=None, on_epoch=report)
        except TrainingDiverged as err:  # a bad corner of the search space, not the end of the study
            trial.set_user_attr("diverged", str(err))
            logger.warning("trial %d: %s; pruned", trial.number, err)
            raise optuna.TrialPruned() from err
        logits = predict_logits(result.net, inputs, val_idx, spec, result.device)
        if multilabel:
            scores = multilabel_objective_scores(labels, sigmoid(logits), part_a, part_b, cfg.specificity,
                                                 images.targets)
        else:
            scores = objective_scores(labels, sigmoid(logits[:, 0]), part_a, part_b, cfg.min_recall)
        for key, value in scores.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("best_epoch", result.best_epoch)
        logger.info("trial %d: %s", trial.number, scores)
        return scores["mean_f1" if multilabel else "balanced_accuracy"]

    storage.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=study_name, storage=f"sqlite:///{storage.resolve()}", direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base.seed), pruner=optuna.pruners.MedianPruner(n_startup_trials=3),
    )
    study.set_user_attr("base_config", base.to_dict())
    study.optimize(objective, n_trials=trials, timeout=timeout)
    return study


def best_config(study: Any, base: TrainConfig) -> TrainConfig:
    """``base`` with the best trial's parameters applied."""
    import optuna

    return suggest(optuna.trial.FixedTrial(study.best_trial.params), base)


def toml_changes(cfg: TrainConfig, base: TrainConfig) -> list[str]:
    """TOML lines for the fields where ``cfg`` differs from ``base`` (for ``--config``)."""
    lines = []
    for f in dataclasses.fields(cfg):
        value, before = getattr(cfg, f.name), getattr(base, f.name)
        if value == before:
            continue
        if value is None:
            lines.append(f"# {f.name}: unset (remove it from the file)")
        elif isinstance(value, bool):
            lines.append(f"{f.name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{f.name} = {value!r}")
        else:
            lines.append(f'{f.name} = "{value}"')
    return lines
