"""Multi-label (NIH ChestX-ray14) training: label parsing, repeat-factor sampling, weighted focal loss over 15
targets, per-target thresholds, the shared temperature, patient-wise splits (also on the full NIH table),
streaming, and one tiny epoch through `xraybatch train multilabel`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import SHARED_DATA
from training.cli import train as train_group
from training.datasets import (
    ImageSet,
    Sample,
    StreamedInputs,
    iter_batches,
    load_inputs,
    nih_labels,
    scan_nih,
)
from training.evaluate import (
    fit_temperature,
    fit_temperatures,
    multilabel_metrics,
    sigmoid,
    specificity_threshold,
    youden_threshold,
)
from training.losses import WeightedFocalLoss, class_weights, epoch_indices, repeat_factors
from training.splits import check_disjoint, patient_split
from training.synthetic import write_nih
from training.train import TrainConfig
from xraybatch.domain import ModelInput
from xraybatch.infer import Predictor
from xraybatch.models.findings import NIH_TARGETS
from xraybatch.models.registry import ModelPreprocess, read_bundle

TINY = """
task = "multilabel"
layout = "nih"
architecture = "separable_cnn"
architecture_args = {widths = [8, 16], dropout = 0.1}
init = "none"
input_size = 32
freeze = 0
batch_size = 8
lr = 0.003
val_fraction = 0.3
threads = 1
extra_eval = []
calibrate = false  # one epoch on 18 images: a fitted temperature would squash every probability onto 0.5
"""


@pytest.fixture(scope="module")
def nih(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nih(tmp_path_factory.mktemp("nih"), patients=20, per_patient=3, size=40)


# --- labels -----------------------------------------------------------------------------------------------

def test_nih_labels_in_nih_order() -> None:
    assert len(NIH_TARGETS) == 15 and NIH_TARGETS[-1] == "No Finding" and NIH_TARGETS[12] == "Pleural_Thickening"
    assert nih_labels("No Finding") == (0,) * 14 + (1,)
    both = nih_labels("Effusion|Infiltration|Hernia")
    assert [t for t, v in zip(NIH_TARGETS, both) if v] == ["Effusion", "Infiltration", "Hernia"]
    assert nih_labels("Pneumonia", ("Pneumonia",)) == (1,)


@pytest.mark.parametrize("cell", ["Efusion", "No Finding|Effusion", "", "Fracture"])
def test_nih_labels_reject_unknown_or_contradictory(cell: str) -> None:
    with pytest.raises(ValueError, match="NIH Finding Labels"):
        nih_labels(cell)


def test_scan_nih_multi_finding_rows_and_missing_images(nih: Path) -> None:
    images = scan_nih(nih, "train_val")
    labels = images.labels()
    assert images.targets == NIH_TARGETS and labels.shape[1] == 15
    by_name = {s.path.name: s.labels for s in images.samples}
    # write_nih: findings cycle over No Finding, Effusion, Pneumonia|Infiltration, Cardiomegaly by (patient + k)
    assert by_name["00000001_000.png"][NIH_TARGETS.index("Effusion")] == 1
    multi = by_name["00000001_001.png"]
    assert multi[NIH_TARGETS.index("Pneumonia")] == multi[NIH_TARGETS.index("Infiltration")] == 1 and sum(multi) == 2
    assert by_name["00000004_000.png"] == (0,) * 14 + (1,)
    assert all(s.path.is_file() for s in images.samples)
    assert not any(s.patient_id == "nih:3" for s in images.samples)  # listed but absent on disk
    full = scan_nih(nih, "train_val", on_disk_only=False)
    assert len(full.samples) == len(images.samples) + 3 and {s.sha256 for s in full.samples} >= {""}


# --- sampling and loss ------------------------------------------------------------------------------------

def test_repeat_factors_by_hand() -> None:
    # 10 images, 2 findings: A in 5 (f = 0.5), B in 1 (f = 0.1); threshold 0.4
    findings = np.zeros((10, 2), dtype=int)
    findings[:5, 0] = 1
    findings[9, 1] = 1
    findings[0, 1] = 1  # image 0 carries both
    r = repeat_factors(findings, threshold=0.4, max_repeat=10.0)
    # f_B = 0.2: sqrt(0.4 / 0.2) = 1.414; f_A = 0.5: max(1, sqrt(0.8)) = 1
    assert r[0] == pytest.approx(math.sqrt(2)) and r[9] == pytest.approx(math.sqrt(2))
    assert r[1] == 1.0 and r[5] == 1.0
    assert repeat_factors(findings, threshold=4.0, max_repeat=2.0).max() == 2.0
    with pytest.raises(ValueError):
        repeat_factors(findings, threshold=0.0)


def test_repeat_sampling_oversamples_rare_and_undersamples_no_finding() -> None:
    findings = np.zeros((1000, 3), dtype=int)
    findings[:20, 0] = 1  # rare: f = 0.02
    findings[20:400, 1] = 1  # common
    # 600 images without any finding ("No Finding")
    factors = repeat_factors(findings, threshold=0.1, max_repeat=3.0)
    assert factors[0] == pytest.approx(math.sqrt(5)) and factors[100] == 1.0 and factors[900] == 1.0
    counts = np.zeros(1000)
    for epoch in range(50):
        idx = epoch_indices(findings, "repeat", np.random.default_rng([7, epoch]), factors, keep_empty=0.25)
        counts += np.bincount(idx, minlength=1000)
    assert counts[:20].mean() / 50 == pytest.approx(math.sqrt(5), rel=0.08)
    assert counts[20:400].mean() / 50 == 1.0
    assert counts[400:].mean() / 50 == pytest.approx(0.25, rel=0.1)
    a = epoch_indices(findings, "repeat", np.random.default_rng([7, 3]), factors, keep_empty=0.25)
    b = epoch_indices(findings, "repeat", np.random.default_rng([7, 3]), factors, keep_empty=0.25)
    assert np.array_equal(a, b)  # deterministic from seed + epoch


def test_focal_loss_with_capped_class_weights_over_targets() -> None:
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 1]])
    w = class_weights(labels, max_weight=1.5)
    # target 0: 1 of 4 positive -> n/(2 pos) = 2 capped to 1.5; negatives 4/6
    assert w[0].tolist() == pytest.approx([4 / 6, 1.5])
    assert w[2].tolist() == pytest.approx([1.5, 4 / 6])
    logits = torch.tensor([[0.4, -1.0, 2.0]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    gamma, alpha = 2.0, 0.25
    by_hand = 0.0
    for z, t, (wn, wp) in zip([0.4, -1.0, 2.0], [1, 0, 1], w.tolist()):
        p = 1 / (1 + math.exp(-z))
        pt = p if t else 1 - p
        by_hand += -(wp if t else wn) * (alpha if t else 1 - alpha) * (1 - pt) ** gamma * math.log(pt)
    got = WeightedFocalLoss(gamma=gamma, alpha=alpha, weights=w)(logits, y)
    assert got.item() == pytest.approx(by_hand / 3, rel=1e-6)


def test_multilabel_config_rejects_single_target_balancing() -> None:
    with pytest.raises(ValueError, match="multilabel uses 'repeat'"):
        TrainConfig(task="multilabel", sampling="undersample")
    with pytest.raises(ValueError, match="task must be"):
        TrainConfig(task="segmentation")
    assert TrainConfig(task="multilabel", sampling="repeat").task == "multilabel"


# --- thresholds and calibration ---------------------------------------------------------------------------

def test_youden_threshold_by_hand_and_recall_floor() -> None:
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    # best J = 0.8 - 0 at thresholds in (0.4, 0.6]: the middle of that range in logit space
    t = youden_threshold(y, p, min_recall=0.5)
    assert 0.4 < t <= 0.6 and t == pytest.approx(sigmoid(np.array((np.log(0.4 / 0.6) + np.log(0.6 / 0.4)) / 2)))
    # a recall floor of 1.0 forces the positive at 0.35 in: the threshold moves into (0.3, 0.35]
    t_all = youden_threshold(y, p, min_recall=1.0)
    assert 0.3 < t_all <= 0.35 and (p[y == 1] >= t_all).all()
    with pytest.raises(ValueError):
        youden_threshold(np.ones(3), np.ones(3))


def test_specificity_threshold_calls_the_chosen_share_of_negatives() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(400)].astype(int)
    p = np.r_[rng.uniform(0.3, 1.0, 20), rng.uniform(0.0, 0.6, 400)]
    t = specificity_threshold(y, p, 0.95)
    assert (p[y == 0] >= t).mean() <= 0.05 + 1 / 400
    assert (p[y == 0] >= t).mean() >= 0.05 - 1 / 400  # not far stricter than asked either
    assert specificity_threshold(y, p, 0.99) > t
    with pytest.raises(ValueError):
        specificity_threshold(np.ones(3), np.ones(3), 0.95)


def test_per_target_temperatures_fall_back_to_the_shared_one_with_few_positives() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0, 4, size=(4000, 3))
    y = (rng.random(z.shape) < sigmoid(z / np.array([1.0, 3.0, 1.0]))).astype(int)
    y[:, 2] = 0
    y[:5, 2] = 1  # five positives: no temperature of its own
    temps = fit_temperatures(z, y)
    assert temps[0] == pytest.approx(1.0, rel=0.1) and temps[1] == pytest.approx(3.0, rel=0.1)
    assert temps[2] == fit_temperature(z, y)


def test_multilabel_metrics_report_findings_per_image_and_intervals() -> None:
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]] * 10)
    probs = np.clip(labels * 0.6 + 0.2, 0, 1)
    metrics = multilabel_metrics(labels, probs, ("Atelectasis", "Hernia", "No Finding"), [0.5, 0.9, 0.5])
    assert metrics["findings_per_image_labels"] == pytest.approx(1.0)  # (1 + 1 + 0 + 2) / 4, No Finding left out
    assert metrics["findings_per_image_predicted"] == pytest.approx(0.5)  # only Atelectasis passes its threshold
    low, high = metrics["per_target"]["Atelectasis"]["auroc_ci95"]
    assert low == high == 1.0 and metrics["mean_auroc_ci95"] == (1.0, 1.0)


def test_shared_temperature_recovers_the_true_one() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, size=(3000, 5))
    y = (rng.random(z.shape) < sigmoid(z / 2.5)).astype(int)
    t = fit_temperature(z, y)  # every logit of every target at once: one temperature
    assert t == pytest.approx(2.5, rel=0.1)


# --- splits -----------------------------------------------------------------------------------------------

def _multilabel_set(n_patients: int = 120, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(n_patients):
        for k in range(int(rng.integers(1, 4))):
            labels = [int(rng.random() < f) for f in (0.3, 0.1, 0.03)]
            samples.append(Sample(Path(f"/d/{p}_{k}.png"), (*labels, int(not any(labels))), f"nih:{p}", f"h{p}{k}"))
    return ImageSet(Path("/d"), "nih", "train_val", ("Atelectasis", "Effusion", "Hernia", "No Finding"),
                    tuple(samples))


@pytest.mark.parametrize("seed", [0, 3])
def test_multilabel_split_is_patient_wise_with_rare_positives_in_validation(seed: int) -> None:
    images = _multilabel_set(seed=seed)
    split = patient_split(images, 0.2, seed)
    check_disjoint(images, split)
    train = {images.samples[i].patient_id for i in split.train}
    assert not train & {images.samples[i].patient_id for i in split.val}
    labels = images.labels()
    assert labels[list(split.val), 2].sum() >= 1  # the rarest finding is stratified into validation
    assert 0.15 < len(split.val) / len(images.samples) < 0.3


@pytest.mark.shared_data
def test_full_nih_table_splits_patient_wise_at_real_scale() -> None:
    root = SHARED_DATA / "nih_cxr14"
    if not (root / "metadata" / "Data_Entry_2017_v2020.csv").is_file():
        pytest.skip(f"{root} is absent: the shared data folder is not next to this checkout")
    lists = {s: (root / "metadata" / f"{s}_list.txt").read_text().split() for s in ("train_val", "test")}
    train_val = scan_nih(root, "train_val", on_disk_only=False)
    test = scan_nih(root, "test", on_disk_only=False)
    assert len(train_val.samples) == len(lists["train_val"]) == 86524
    assert len(test.samples) == len(lists["test"]) == 25596
    assert not {s.patient_id for s in train_val.samples} & {s.patient_id for s in test.samples}
    split = patient_split(train_val, 0.15, TrainConfig().seed)
    assert len(split.train) + len(split.val) == 86524 and not set(split.train) & set(split.val)
    check_disjoint(train_val, split)  # no patient on both sides
    assert 0.14 < len(split.val) / 86524 < 0.17
    val_pos = train_val.labels()[list(split.val)].sum(axis=0)
    assert (val_pos > 0).all()  # every target, Hernia included, has validation positives


# --- streaming and one tiny epoch -------------------------------------------------------------------------

def test_streamed_inputs_equal_the_cached_array(nih: Path, tmp_path: Path) -> None:
    images = scan_nih(nih, "train_val")
    cached = load_inputs(images, ModelPreprocess(), (32, 32), tmp_path)
    streamed = StreamedInputs(images, ModelPreprocess(), (32, 32))
    batches = [np.array([0, 3, 5]), np.array([1, 2])]
    got = list(iter_batches(streamed, batches, workers=1))
    assert [g[0].tolist() for g in got] == [[0, 3, 5], [1, 2]]
    assert np.array_equal(got[0][1], cached[[0, 3, 5]]) and np.array_equal(streamed[4], cached[4])


def test_one_epoch_multilabel_bundle(nih: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(train_group, [
        "multilabel", "--data", str(nih), "--out", str(out), "--config", str(config),
        "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--loader", "stream", "--workers", "0",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "validation mean AUROC" in result.output
    spec = read_bundle(out)
    assert spec.task == "multilabel" and spec.targets == NIH_TARGETS
    assert len(spec.thresholds) == 15 and len(set(spec.temperature)) == 1
    meta = spec.meta
    assert meta["provenance"]["config"]["sampling"] == "repeat"  # the shipped recipe's, from multilabel.toml
    per_target = meta["metrics"]["validation"]["per_target"]
    assert list(per_target) == list(NIH_TARGETS)
    assert all({"auroc", "support_pos", "threshold", "precision", "recall", "f1", "rule"} <= set(m)
               for m in per_target.values())
    card = (out / "model_card.md").read_text()
    assert "| Pleural_Thickening |" in card and "validation_roc.png" in card and "specificity" in card
    assert (out / "validation_roc.png").is_file() and (out / "split_manifest.csv").is_file()
    pixels = np.full((32, 32), 0.5, dtype=np.float32)
    (pred,) = Predictor(spec).predict([ModelInput(pixels=pixels, source_shape=pixels.shape)])
    assert pred.targets == NIH_TARGETS and len(pred.probabilities) == len(pred.thresholds) == 15
    # `evaluate` scores the bundle's validation side through the Predictor and agrees with model.json
    scored = CliRunner().invoke(train_group, ["evaluate", str(out), "--data", str(nih), "--split", "manifest-val",
                                              "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert scored.exit_code == 0, scored.output + repr(scored.exception)
    mean = meta["metrics"]["validation"]["mean_auroc"]
    assert f"mean AUROC {mean:.4f}" in scored.output and "Pleural_Thickening" in scored.output


def test_resnet50_builds_for_fifteen_targets_on_tiny_input() -> None:
    from training.train import build_model

    cfg = TrainConfig(task="multilabel", sampling="repeat", architecture="resnet50", init="none", input_size=32,
                      freeze=0)
    net = build_model(cfg, num_outputs=15).eval()
    with torch.inference_mode():
        out = net(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 15)


def test_tune_one_multilabel_trial(nih: Path, tmp_path: Path) -> None:
    import optuna

    config = tmp_path / "tiny.toml"
    config.write_text(TINY + 'sampling = "repeat"\nclass_weighting = "balanced"\nepochs = 1\n')
    storage = tmp_path / "study.sqlite"
    result = CliRunner().invoke(train_group, [
        "tune", "--data", str(nih), "--storage", str(storage), "--config", str(config), "--study-name", "m",
        "--cache-dir", str(tmp_path / "cache"), "--trials", "1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "mean F1 over findings" in result.output
    trial = optuna.load_study(study_name="m", storage=f"sqlite:///{storage}").trials[0]
    assert {"lr", "batch_size", "focal_gamma", "max_class_weight", "specificity", "sampling"} <= set(trial.params)
    assert {"mean_f1", "auroc"} <= set(trial.user_attrs)


def test_evaluate_a_binary_bundle_on_nih_data_scores_the_pneumonia_column(nih: Path, tmp_path: Path) -> None:
    from tests.conftest import make_tiny_bundle
    from training.datasets import scan
    from training.evaluate import evaluate_bundle

    bundle = make_tiny_bundle(tmp_path / "tiny-binary", size=32)
    images = scan(nih, "nih", "train_val")
    pneumonia = int(images.labels()[:, NIH_TARGETS.index("Pneumonia")].sum())
    assert 0 < pneumonia < len(images.samples) and pneumonia != int(images.labels()[:, 0].sum())
    metrics = evaluate_bundle(bundle, nih, layout="nih", split="train_val", threads=1)
    assert metrics["per_class"]["Pneumonia"]["support"] == pneumonia
