"""Evaluation: metrics with per-class support and bootstrap intervals, threshold rules, calibration, plots, card.

Calibration: per target, the temperature T minimising the validation negative log-likelihood of
``sigmoid(logit / T)`` (it does not change the ranking, so AUROC is unaffected). A target with fewer than
:data:`MIN_TEMPERATURE_POSITIVES` validation positives gets the temperature fitted on every target's logits at
once: with a handful of positives a temperature of its own would be fitted to noise.

Operating threshold rule (binary): the threshold with the best balanced accuracy (Youden's J = recall +
specificity - 1) on validation among those that keep Pneumonia recall >= ``min_recall`` (default 0.95). On an
easy validation set many thresholds tie; the run of tied thresholds (J within :data:`J_TOLERANCE` of the best)
is split in the middle, in logit space, rather than taken at one of its ends, so the threshold does not sit on
the last validation case of either class.

Operating threshold rule (multi-label, per target): a fixed specificity. The threshold is the ``specificity``
quantile (default 0.95) of the validation probabilities of the images *without* that finding, so each finding
is called on about 5% of the images that do not have it, whatever its prevalence. This rests on the negatives
(hundreds per finding), not on the handful of positives an F1 optimum would be fitted to, and it keeps the
number of findings per image near what the data holds: the model card reports the expected number of positive
findings per validation image beside the number of findings the labels give.

Confidence intervals: 95% percentile intervals over :data:`BOOTSTRAP_ROUNDS` bootstrap resamples of the
validation images (seeded), for AUROC, accuracy and per-class recall.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CLASS_NAMES = ("Normal", "Pneumonia")
MIN_THRESHOLD_POSITIVES = 3  # fewer validation positives: prevalence-based threshold instead of F1-optimal
MIN_TEMPERATURE_POSITIVES = 10  # fewer validation positives: the shared temperature instead of a target's own
J_TOLERANCE = 0.002  # binary rule: thresholds whose Youden's J is this close to the best count as tied
BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 20240601


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising the mean NLL of ``sigmoid(logit / T)`` (grid + refine)."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()

    def nll(t: float) -> float:
        s = z / t
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    best = float(grid[int(np.argmin([nll(t) for t in grid]))])
    fine = best * np.exp(np.linspace(-0.02, 0.02, 41))
    return round(float(np.clip(fine[int(np.argmin([nll(t) for t in fine]))], 0.05, 20.0)), 4)


def fit_temperatures(logits: np.ndarray, labels: np.ndarray,
                     min_positives: int = MIN_TEMPERATURE_POSITIVES) -> list[float]:
    """Per-target temperatures (module docstring): a target's own, or the shared one when it has few positives."""
    z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    y = np.asarray(labels, dtype=np.float64).reshape(z.shape)
    shared = fit_temperature(z, y)
    out = []
    for j in range(z.shape[1]):
        pos = int(y[:, j].sum())
        out.append(fit_temperature(z[:, j], y[:, j]) if min(pos, len(y) - pos) >= min_positives else shared)
    return out


def youden_threshold(labels: np.ndarray, probs: np.ndarray, min_recall: float = 0.95) -> float:
    """The binary operating threshold of the module docstring's rule (best Youden's J with a recall floor)."""
    y = np.asarray(labels).ravel().astype(bool)
    p = np.asarray(probs, dtype=np.float64).ravel()
    if not y.any() or y.all():
        raise ValueError("cannot choose a threshold without both classes in validation")
    if not 0.0 < min_recall <= 1.0:
        raise ValueError(f"min_recall must be in (0, 1], got {min_recall}")
    candidates = np.unique(p)  # ascending; "positive" means p >= candidate
    recall = np.array([(p[y] >= t).mean() for t in candidates])
    specificity = np.array([(p[~y] < t).mean() for t in candidates])
    j = np.where(recall >= min_recall - 1e-9, recall + specificity - 1.0, -np.inf)
    tied = j >= j.max() - J_TOLERANCE
    # The run of consecutive tied candidates that holds the highest best one (ties between runs: the higher
    # thresholds, the safer side when normals score higher than in validation).
    last = int(np.flatnonzero(j >= j.max() - 1e-12)[-1])
    first = last
    while first > 0 and tied[first - 1]:
        first -= 1
    while last + 1 < len(candidates) and tied[last + 1]:
        last += 1
    # Every threshold in (the candidate below the run, the run's highest candidate] gives a tied result.
    low = float(candidates[first - 1]) if first > 0 else float(candidates[first])
    high = float(candidates[last])
    if not high > low:
        return high
    eps = 1e-7
    lo, hi = np.clip([low, high], eps, 1 - eps)
    middle = float(sigmoid(np.array((np.log(lo / (1 - lo)) + np.log(hi / (1 - hi))) / 2.0)))
    return float(np.clip(middle, np.nextafter(low, 1.0), high))


def specificity_threshold(labels: np.ndarray, probs: np.ndarray, specificity: float = 0.95) -> float:
    """The multi-label rule: the ``specificity`` quantile of the probabilities of the images without the finding.

    An image is positive at ``p >= threshold``; the threshold is just above that quantile, so at most
    ``1 - specificity`` of the validation negatives are called positive.
    """
    y = np.asarray(labels).ravel().astype(bool)
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.all():
        raise ValueError("cannot choose a specificity threshold without negative validation examples")
    if not 0.0 < specificity < 1.0:
        raise ValueError(f"specificity must be in (0, 1), got {specificity}")
    return float(np.nextafter(np.quantile(p[~y], specificity, method="higher"), 1.0))


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, statistic: Any, rounds: int = BOOTSTRAP_ROUNDS,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of ``statistic(labels, probs)`` over bootstrap resamples of the images.

    Resamples where the statistic is undefined (one class only) are skipped; ``(nan, nan)`` when none is left.
    """
    y, p = np.asarray(labels), np.asarray(probs)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        idx = rng.integers(0, len(y), len(y))
        try:
            v = float(statistic(y[idx], p[idx]))
        except ValueError:
            continue
        if not np.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return round(float(low), 4), round(float(high), 4)


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(set(np.asarray(y).ravel().tolist())) < 2:
        raise ValueError("one class")
    return float(roc_auc_score(y, p))


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy, AUROC, per-class precision/recall/F1 with support, confusion matrix, Brier score, ECE."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y = np.asarray(labels).ravel().astype(int)
    p = np.asarray(probs, dtype=np.float64).ravel()
    pred = (p >= threshold).astype(int)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    cm = confusion_matrix(y, pred, labels=[0, 1])
    auroc = float(roc_auc_score(y, p)) if len(set(y)) == 2 else float("nan")
    per_class = {
        name: {"precision": round(float(prec[i]), 4), "recall": round(float(rec[i]), 4),
               "f1": round(float(f1[i]), 4), "support": int(support[i])}
        for i, name in enumerate(CLASS_NAMES)
    }
    ci = {
        "auroc": bootstrap_ci(y, p, _auroc),
        "accuracy": bootstrap_ci(y, p, lambda yy, pp: float(((pp >= threshold) == (yy == 1)).mean())),
        "recall_Pneumonia": bootstrap_ci(y, p, lambda yy, pp: _recall(yy == 1, pp >= threshold)),
        "recall_Normal": bootstrap_ci(y, p, lambda yy, pp: _recall(yy == 0, pp < threshold)),
    }
    return {
        "n": len(y),
        "threshold": round(float(threshold), 6),
        "accuracy": round(float((pred == y).mean()), 4),
        "auroc": round(auroc, 4),
        "ci95": ci,
        "predicted_positive_rate": round(float(pred.mean()), 4),
        "prevalence": round(float(y.mean()), 4),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(CLASS_NAMES), "rows_true_cols_pred": cm.tolist()},
        "brier": round(float(np.mean((p - y) ** 2)), 4),
        "ece": round(expected_calibration_error(y, p), 4),
    }


def _recall(truth: np.ndarray, called: np.ndarray) -> float:
    if not truth.any():
        raise ValueError("no positives")
    return float((called & truth).sum() / truth.sum())


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, targets: Sequence[str],
                       thresholds: Sequence[float] | None = None, rules: Sequence[str] | None = None
                       ) -> dict[str, Any]:
    """Per-target AUROC with positive support (and precision/recall/F1 at ``thresholds``), the mean AUROC.

    ``mean_auroc`` averages the findings (every target but "No Finding") that have both classes; the
    "No Finding" AUROC is reported on its own row.
    """
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    from xraybatch.models.findings import NO_FINDING

    labels = np.asarray(labels).reshape(len(labels), -1).astype(int)
    probs = np.asarray(probs, dtype=np.float64).reshape(labels.shape)
    out: dict[str, Any] = {"n": len(labels), "per_target": {}}
    aucs = []
    for j, target in enumerate(targets):
        y = labels[:, j]
        auc = float(roc_auc_score(y, probs[:, j])) if 0 < y.sum() < len(y) else float("nan")
        row: dict[str, Any] = {"auroc": round(auc, 4), "auroc_ci95": bootstrap_ci(y, probs[:, j], _auroc),
                               "support_pos": int(y.sum()), "n": len(y)}
        if thresholds is not None:
            pred = (probs[:, j] >= thresholds[j]).astype(int)
            prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=[1], zero_division=0)
            row |= {"threshold": round(float(thresholds[j]), 6), "precision": round(float(prec[0]), 4),
                    "recall": round(float(rec[0]), 4), "f1": round(float(f1[0]), 4),
                    "predicted_pos": int(pred.sum())}
            if rules is not None:
                row["rule"] = rules[j]
        out["per_target"][target] = row
        if not np.isnan(auc) and target != NO_FINDING:
            aucs.append(auc)
    out["mean_auroc"] = round(float(np.mean(aucs)), 4) if aucs else float("nan")
    out["findings_with_auroc"] = len(aucs)
    findings = [j for j, t in enumerate(targets) if t != NO_FINDING]
    out["mean_auroc_ci95"] = bootstrap_ci(labels[:, findings], probs[:, findings], _mean_auroc)
    out["findings_per_image_labels"] = round(float(labels[:, findings].sum(axis=1).mean()), 3)
    if thresholds is not None:
        called = probs[:, findings] >= np.asarray(thresholds, dtype=np.float64)[findings]
        out["findings_per_image_predicted"] = round(float(called.sum(axis=1).mean()), 3)
    out["brier"] = round(float(np.mean((probs - labels) ** 2)), 4)
    out["ece"] = round(expected_calibration_error(labels.ravel(), probs.ravel()), 4)
    return out


def _mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean AUROC over the columns that have both classes in this resample (ValueError when none has)."""
    aucs = [_auroc(y[:, j], p[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    if not aucs:
        raise ValueError("no column with both classes")
    return float(np.mean(aucs))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by bin size."""
    y = np.asarray(labels).ravel().astype(float)
    p = np.asarray(probs, dtype=np.float64).ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(y[mask].mean() - p[mask].mean())
    return float(total / max(len(y), 1))


def plot_roc(labels: np.ndarray, probs: np.ndarray, threshold: float, path: Path, title: str) -> None:
    """ROC curve PNG with the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, probs)
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    op_fpr, op_tpr = pred[~y].mean(), pred[y].mean()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {roc_auc_score(labels, probs):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([op_fpr], [op_tpr], c="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - Normal recall (false positive rate)", ylabel="Pneumonia recall (sensitivity)", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_roc_grid(labels: np.ndarray, probs: np.ndarray, thresholds: Sequence[float], targets: Sequence[str],
                  path: Path, title: str) -> None:
    """One small ROC panel per target (AUROC, positives and the operating point in each title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    cols = 4
    rows = -(-len(targets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=80, squeeze=False)
    for j, ax in enumerate(axes.ravel()):
        if j >= len(targets):
            ax.axis("off")
            continue
        y, p = np.asarray(labels[:, j]).astype(bool), np.asarray(probs[:, j])
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            pred = p >= thresholds[j]
            ax.plot(fpr, tpr, lw=2)
            ax.scatter([pred[~y].mean()], [pred[y].mean()], c="red", zorder=3)
            name = f"{targets[j]}\nAUROC {roc_auc_score(y, p):.3f}, {int(y.sum())} pos"
        else:
            name = f"{targets[j]}\n{int(y.sum())} pos: no ROC"
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_calibration(labels: np.ndarray, probs: np.ndarray, path: Path, title: str, bins: int = 10) -> None:
    """Reliability diagram PNG: observed Pneumonia fraction against mean predicted probability per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    frac, mean = calibration_curve(labels, probs, n_bins=bins, strategy="uniform")
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    ax.plot(mean, frac, marker="o", lw=2, label=f"model (ECE {expected_calibration_error(labels, probs):.3f})")
    ax.hist(probs, bins=bins, range=(0, 1), weights=np.full(len(probs), 1.0 / len(probs)), alpha=0.25,
            label="share of images")
    ax.set(xlabel="predicted probability", ylabel="observed fraction positive", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(matrix: Sequence[Sequence[int]], path: Path, title: str) -> None:
    """Confusion matrix PNG (rows: truth, columns: prediction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4, 3.6), dpi=100)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(out_dir: Path, labels: np.ndarray, probs: np.ndarray, metrics: dict[str, Any], prefix: str) -> list[str]:
    """ROC, calibration and confusion-matrix PNGs named ``<prefix>_*.png``; returns the file names."""
    names = [f"{prefix}_roc.png", f"{prefix}_calibration.png", f"{prefix}_confusion.png"]
    what = prefix.replace("_", " ")
    plot_roc(labels, probs, metrics["threshold"], out_dir / names[0], f"ROC ({what}, n={len(labels)})")
    plot_calibration(labels, probs, out_dir / names[1], f"Calibration ({what})")
    plot_confusion(metrics["confusion_matrix"]["rows_true_cols_pred"], out_dir / names[2], f"Confusion ({what})")
    return names


def write_multilabel_plots(out_dir: Path, labels: np.ndarray, probs: np.ndarray, thresholds: Sequence[float],
                           targets: Sequence[str], prefix: str) -> list[str]:
    """Per-target ROC panels and one reliability diagram over all targets; returns the file names."""
    names = [f"{prefix}_roc.png", f"{prefix}_calibration.png"]
    what = prefix.replace("_", " ")
    plot_roc_grid(labels, probs, thresholds, targets, out_dir / names[0], f"ROC per target ({what}, n={len(labels)})")
    plot_calibration(np.ravel(labels), np.ravel(probs), out_dir / names[1], f"Calibration, all targets ({what})")
    return names


def multilabel_table(metrics: dict[str, Any]) -> str:
    """Markdown table of per-target AUROC, threshold, precision/recall/F1 and support, plus the means."""
    rows = [("| target | AUROC (95% CI) | threshold (rule) | precision | recall | F1 | val positives / n "
            "| predicted positive |"), "|---|---|---|---|---|---|---|---|"]
    for name, m in metrics["per_target"].items():
        rows.append(f"| {name} | {m['auroc']:.4f}{_ci(m.get('auroc_ci95'))} | {m['threshold']:.4f} "
                    f"({m.get('rule', '')}) | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} "
                    f"| {m['support_pos']} / {m['n']} | {m['predicted_pos']} |")
    rows.append(f"\nMean AUROC over the {metrics['findings_with_auroc']} findings with both classes in validation "
                f"(\"No Finding\" excluded): **{metrics['mean_auroc']:.4f}**{_ci(metrics.get('mean_auroc_ci95'))} "
                f"(n = {metrics['n']}). Brier {metrics['brier']:.4f}, ECE {metrics['ece']:.4f} (all targets pooled).")
    if "findings_per_image_predicted" in metrics:
        rows.append(f"\nFindings called per validation image at these thresholds: "
                    f"**{metrics['findings_per_image_predicted']:.2f}** on average; the labels hold "
                    f"{metrics['findings_per_image_labels']:.2f} findings per image.")
    return "\n".join(rows)


def _ci(interval: Sequence[float] | None) -> str:
    """`` (low-high)`` for a bootstrap interval, empty when there is none."""
    if not interval or interval[0] != interval[0]:
        return ""
    return f" ({interval[0]:.3f}-{interval[1]:.3f})"


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of per-class precision/recall/F1/support plus accuracy and AUROC."""
    rows = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, m in metrics["per_class"].items():
        rows.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    ci = metrics.get("ci95", {})
    rows.append(f"\nAccuracy **{metrics['accuracy']:.4f}**{_ci(ci.get('accuracy'))}, AUROC **{metrics['auroc']:.4f}**"
                f"{_ci(ci.get('auroc'))} (n = {metrics['n']}, threshold {metrics['threshold']:.4f}), Brier "
                f"{metrics['brier']:.4f}, ECE {metrics['ece']:.4f}. Bootstrap 95% intervals in brackets; recall "
                f"Pneumonia{_ci(ci.get('recall_Pneumonia'))}, Normal{_ci(ci.get('recall_Normal'))}.")
    if "predicted_positive_rate" in metrics:
        rows.append(f"\nCalled positive: {metrics['predicted_positive_rate']:.1%} of the images; prevalence "
                    f"{metrics['prevalence']:.1%}.")
    cm = metrics["confusion_matrix"]["rows_true_cols_pred"]
    rows.append(f"\nConfusion matrix (rows true, columns predicted; Normal, Pneumonia): {cm}")
    return "\n".join(rows)


def _ran_on(prov: Mapping[str, Any]) -> str:
    """Where the epochs ran, and where the bundle was exported when that differs (older bundles: device + threads)."""
    if "exported_on" not in prov:
        return f"{prov['device']} ({prov['threads']} threads)"
    if prov["exported_on"] == prov["device"]:
        return prov["device"]
    return f"{prov['device']} (exported on {prov['exported_on']})"


def model_card(meta: dict[str, Any], history: Sequence[Mapping[str, Any]], plots: Mapping[str, list[str]]) -> str:
    """The Markdown model card written into the bundle (binary or multi-label, from ``meta["task"]``)."""
    prov = meta["provenance"]
    metrics = meta["metrics"]
    cfg = prov["config"]
    multilabel = meta["task"] == "multilabel"
    net = (f"Architecture `{meta['architecture']}` {meta['architecture_args']}, input {meta['input']['size'][0]}x"
           f"{meta['input']['size'][1]}, {meta['input']['channels']} channel(s), normalised with mean "
           f"{meta['input']['mean']} and std {meta['input']['std']}, initialised from `{cfg['init']}`.")
    if multilabel:
        what = (f"Multi-label classifier of frontal chest radiographs: {len(meta['targets'])} outputs, the NIH "
                f"ChestX-ray14 findings and `No Finding`, in this order: {', '.join(meta['targets'])}. "
                f"`sigmoid(logit / T)` is each probability, with a temperature T per target (table below); a "
                f"target is positive at or above its own threshold. {net}")
        source = ("NIH ChestX-ray14 (Wang et al., CVPR 2017; NIH Clinical Center, adults, PA and AP), only the "
                  "images of the official train_val list present on disk")
        counts = (f"- Positives per target (train): {prov['class_counts']['train']}; (validation): "
                  f"{prov['class_counts']['val']}.")
    else:
        what = (f"Binary classifier of frontal chest radiographs: output `{meta['targets'][0]}` (one logit; "
                f"`sigmoid(logit / {meta['temperature'][0]})` is the probability, positive at >= "
                f"{meta['thresholds'][meta['targets'][0]]:.4f}). {net}")
        source = "Kermany et al., Cell 2018 (pediatric AP chest radiographs, CC BY 4.0)"
        counts = (f"- Class counts (train): {prov['class_counts']['train']}; (validation): "
                  f"{prov['class_counts']['val']}.")
    lines = [
        f"# Model card: {meta['name']} {meta['version']}",
        "",
        "**AI generated results, not for diagnostic use.** Research software; not a medical device.",
        "",
        "## What it does",
        what,
        "",
        "## Training data",
        (f"- Data: `{prov['data']}` (layout `{prov['layout']}`, {prov['images']['total']} images). "
        f"{source} for the shipped model."),
        (f"- Patient-wise split (seed {cfg['seed']}, validation fraction {cfg['val_fraction']}): "
        f"{prov['images']['train']} train / {prov['images']['val']} validation images; patients and byte-identical "
        f"duplicates never cross sides. Manifest: `{prov['split_manifest']}` (one row per file with sha256)."),
        counts,
        (f"- Preprocessing (binding at inference): {meta['preprocessing']}, through "
        "`xraybatch.preprocess.model_input_8bit` / `model_input`, the functions inference runs."),
        "",
        *_revision_lines(prov),
        "## How it was trained",
        f"- Command: `{prov['command']}`",
        (f"- Reproduce from a clean checkout: `make install`, then `xraybatch train {cfg['task']} --data "
         f"../shared/data/{'nih_cxr14' if multilabel else 'kermany'} --out BUNDLE` from the repository root; the "
         f"recipe is `training/configs/{cfg['task']}.toml`, which `train {cfg['task']}` starts from. Randomness "
         "comes from the seed and the epoch only (same machine, same numbers; CUDA and the CPU differ in the last "
         "bits, so not bit for bit across them); the input cache is rebuilt when missing."),
        (f"- Git revision: `{prov['git_revision']}`; seed {cfg['seed']}; {prov['epochs_run']} epochs run "
        f"(best epoch {prov['best_epoch']}), {prov['seconds_per_epoch']:.0f} s per epoch on {_ran_on(prov)}, "
        + (f"{prov['training_minutes']:.1f} min of training epochs" if "training_minutes" in prov else
           f"{prov['total_minutes']:.1f} min in total")
        + (" (resumed from its checkpoint: the command above is the resumption that exported the bundle)"
           if "--resume" in prov.get("command", "") else "") + "."),
        (f"- Loss `{cfg['loss']}` (focal gamma {cfg['focal_gamma']}, alpha {cfg['focal_alpha']}), class weighting "
        f"`{cfg['class_weighting']}` (max weight {cfg['max_class_weight']}), sampling `{cfg['sampling']}`"
        + (f" (repeat threshold {cfg.get('repeat_threshold')}, max repeat {cfg.get('max_repeat')}, share of "
           f"No-Finding-only images kept per epoch {cfg.get('no_finding_keep')})" if cfg["sampling"] == "repeat"
           else "")
        + f"; AdamW lr {cfg['lr']}, weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}; ReduceLROnPlateau "
        f"(factor {cfg['lr_factor']}, patience {cfg['lr_patience']}); early stopping patience "
        f"{cfg['early_stop_patience']}; re-encoding {cfg.get('reencode', 'none')}; augmentation {cfg['augment']}."),
        "",
        "## Operating threshold" + ("s" if multilabel else ""),
    ]
    if multilabel:
        lines += [
            (f"Rule: {metrics['threshold_rule']}. Chosen on the validation split only. Temperatures per target: "
             + ", ".join(f"{t} {v}" for t, v in zip(meta["targets"], meta["temperature"], strict=True))
             + f" (targets with fewer than {MIN_TEMPERATURE_POSITIVES} validation positives share one)."),
            "",
            "## Validation metrics (per finding, with support)",
            multilabel_table(metrics["validation"]),
            "",
        ]
        names = plots.get("validation", [])
        if names:
            lines += [f"![Validation ROC per target]({names[0]})", "", f"![Validation calibration]({names[1]})", ""]
    else:
        lines += [
            (f"Rule: {metrics['threshold_rule']}. Chosen on the validation split only: "
             f"**{metrics['validation']['threshold']:.4f}** (temperature {meta['temperature'][0]})."),
            "",
            "## Validation metrics",
            metrics_table(metrics["validation"]),
            "",
        ]
        names = plots.get("validation", [])
        if names:
            lines += [(f"![Validation ROC]({names[0]}) ![Validation calibration]({names[1]}) "
                       f"![Validation confusion]({names[2]})"), ""]
        for name, m in metrics.get("extra", {}).items():
            lines += [f"## {name} (not used for any choice)", metrics_table(m), ""]
            names = plots.get(name, [])
            if names:
                lines += [f"![{name} ROC]({names[0]}) ![{name} calibration]({names[1]})", ""]
    from training.consistency import spread_card_lines

    lines += spread_card_lines(metrics)  # "Encoding consistency", once `xraybatch train consistency` measured it
    auroc_name = "val mean AUROC (findings)" if multilabel else "val AUROC"
    lines += [
        "## Training history",
        f"| epoch | train loss | val loss | {auroc_name} | lr | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h['val_auroc']:.4f} | {h['lr']:.2e} "
              f"| {h['seconds']:.0f} |" for h in history]
    lines += ["", "## Limits"]
    lines += _multilabel_limits(meta) if multilabel else [
        ("- Trained on pediatric (1-5 years) AP radiographs from one centre (Guangzhou); adults, PA views, other "
        "devices and other populations are out of distribution. The training JPEGs were squashed to 224x224, "
        "so inputs are stretched to a square in production too."),
        ("- Validation is a held-out part of the official training split (same source); expect lower figures on "
        "other data, including Kermany's official test split. Reference: Kermany et al. report accuracy 0.928 "
        "and AUROC 0.968 on their test split."),
        "- Bacterial and viral pneumonia are one class. The model does not localise; Grad-CAM maps are a hint.",
    ]
    lines.append("")
    return "\n".join(lines)


def _multilabel_limits(meta: dict[str, Any]) -> list[str]:
    prov, val = meta["provenance"], meta["metrics"]["validation"]
    few = [t for t, m in val["per_target"].items() if m["support_pos"] < 10]
    fallback = [t for t, m in val["per_target"].items() if m.get("rule") == "prevalence"]
    sizes = prov.get("image_sizes", {})
    lines = [
        (f"- Data is scarce: {prov['images']['total']} training images of the 112,120 in NIH ChestX-ray14 "
         f"({prov['images']['train']} train / {prov['images']['val']} validation), by source size {sizes}. The "
         "64 px images are upsampled to the model input and carry little detail."),
        (f"- Validation support is tiny: {', '.join(few) or 'none'} have fewer than 10 validation positives, so their "
         "AUROC, precision, recall and F1 have wide confidence intervals (one image moves them by several points). "
         + (f"The thresholds of {', '.join(fallback)} are prevalence-based (fewer than {MIN_THRESHOLD_POSITIVES} "
            "validation positives)." if fallback else
            "Every threshold rests on the validation negatives (a fixed specificity), not on these few positives."
            if all(m.get("rule") == "specificity" for m in val["per_target"].values()) else
            f"Every threshold is F1-based (each target had at least {MIN_THRESHOLD_POSITIVES} validation "
            "positives).")),
        ("- NIH labels were mined from radiology reports by NLP (estimated > 90% accurate overall, much less for "
         "some findings); the validation side is part of the official train_val list, and the official test list "
         "(held out) may score differently. Reference: CheXNet reports a mean AUROC of 0.841 trained on the full "
         "set (~78,000 training images)."),
        ("- Adults from one hospital (NIH Clinical Center); PA and AP views. Other devices and populations are out "
         "of distribution. Probabilities are temperature-scaled on validation (per target); with "
         "repeat-factor sampling and class weights they still lean towards positives for rare findings."),
        "- The model does not localise; Grad-CAM maps of the positive findings are a hint only.",
    ]
    history = prov.get("history", [])
    curve = [h["val_auroc"] for h in history if h["val_auroc"] == h["val_auroc"]]
    if len(curve) > 1:
        lines.insert(2, (
            f"- The best epoch was chosen on the same validation images whose metrics are shown: the validation mean "
            f"AUROC moved between {min(curve):.3f} and {max(curve):.3f} from epoch to epoch, and the reported "
            f"{val['mean_auroc']:.3f} is the maximum of that noisy curve, so expect less on new images."))
    busy = [t for t, m in val["per_target"].items() if t != "No Finding" and m.get("predicted_pos", 0) > val["n"] / 4]
    if busy:
        lines.insert(3, (
            f"- The threshold rule picks low thresholds where the "
            f"ranking is weak: {', '.join(busy)} are called positive on more than a quarter of the validation images. "
            "Read the probabilities, not only the present/absent calls."))
    return lines


def evaluate_bundle(
    bundle: Path,
    data: Path,
    layout: str = "auto",
    split: str = "test",
    report: Path | None = None,
    threads: int = 2,
    cache_dir: Path | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Metrics of a bundle on labelled data, computed with the production :class:`Predictor`.

    Binary bundles: :func:`binary_metrics`; multi-label bundles: :func:`multilabel_metrics` at the bundle's
    thresholds (e.g. an NIH download's official ``test`` list).

    ``split="manifest-val"`` scores the validation side recorded in the bundle's split manifest.

    Raises
    ------
    ValueError
        When the data has a single class or no labels of the bundle's target (binary), or other targets than
        the bundle (multi-label).
    """
    from training.datasets import load_inputs, scan
    from training.splits import split_from_manifest
    from xraybatch.domain import ModelInput
    from xraybatch.infer import Predictor, set_threads
    from xraybatch.models.registry import read_bundle

    spec = read_bundle(bundle)
    set_threads(threads)
    predictor = Predictor(spec)
    preprocess = spec.preprocess
    if split == "manifest-val":
        prov = spec.meta.get("provenance", {})
        images = scan(data, layout if layout != "auto" else prov.get("layout", "auto"), prov.get("split", "train"))
        images = images.subset(split_from_manifest(images, bundle / prov.get("split_manifest", "")).val)
    else:
        images = scan(data, layout, split)
    inputs = load_inputs(images, preprocess, spec.input.size, cache_dir)
    probs = []
    for start in range(0, len(inputs), batch_size):
        batch = [ModelInput(pixels=px, source_shape=px.shape) for px in inputs[start:start + batch_size]]
        probs += [p.probabilities for p in predictor.predict(batch)]
    if spec.task == "multilabel":
        if images.targets != spec.targets:
            raise ValueError(f"{data} has targets {list(images.targets)}, the bundle {list(spec.targets)}")
        labels, pm = images.labels(), np.asarray(probs)
        metrics = multilabel_metrics(labels, pm, spec.targets, spec.thresholds)
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            names = write_multilabel_plots(report.parent, labels, pm, spec.thresholds, spec.targets,
                                           f"{report.stem}_{split}".replace("-", "_"))
            text = [f"# {spec.model_id} on {data} ({split})", "", multilabel_table(metrics), ""]
            text += [f"![ROC per target]({names[0]}) ![calibration]({names[1]})", ""]
            report.write_text("\n".join(text), encoding="utf-8")
        return metrics
    if spec.targets[0] not in images.targets:
        raise ValueError(f"{data} has no {spec.targets[0]!r} labels (targets {list(images.targets)})")
    y = images.labels()[:, images.targets.index(spec.targets[0])]  # NIH data: the Pneumonia column
    if len(set(y.tolist())) != 2:
        raise ValueError(f"{data} ({split}) has only one class; metrics need Normal and Pneumonia images")
    p = np.asarray(probs)[:, 0]
    metrics = binary_metrics(y, p, spec.thresholds[0])
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        names = write_plots(report.parent, y, p, metrics, f"{report.stem}_{split}".replace("-", "_"))
        text = [f"# {spec.model_id} on {data} ({split})", "", metrics_table(metrics), ""]
        text += [f"![ROC]({names[0]}) ![calibration]({names[1]}) ![confusion]({names[2]})", ""]
        report.write_text("\n".join(text), encoding="utf-8")
    return metrics


def _revision_lines(prov: Mapping[str, Any]) -> list[str]:
    """The card's "Revisions" section: changes made to the bundle after training (``provenance.revisions``)."""
    revisions = prov.get("revisions") or []
    if not revisions:
        return []
    lines = ["## Revisions after training"]
    lines += [f"- {r['version']} ({r['date']}): {r['change']}" for r in revisions]
    return [*lines, ""]


def refresh_model_card(bundle: Path) -> Path:
    """Re-render ``model_card.md`` of a bundle from its ``model.json`` (and the plots beside it)."""
    import json

    meta = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    plots = dict(meta["metrics"].get("plots", {}))
    if not plots:  # bundles written before the plot names were recorded
        plots["validation"] = [f"validation_{k}.png" for k in ("roc", "calibration", "confusion")]
        layout = meta["provenance"]["layout"]
        for key in meta["metrics"].get("extra", {}):
            name = key.split("'")[1] if "'" in key else key
            plots[key] = [f"{layout}_{name}_roc.png", f"{layout}_{name}_calibration.png"]
    path = bundle / "model_card.md"
    path.write_text(model_card(meta, meta["provenance"]["history"], plots), encoding="utf-8")
    if "gate" in meta:  # the input gate's section, which `train gate` wrote, is rendered from its block too
        from training.gate import write_card_section

        write_card_section(bundle, meta["gate"])
    return path
