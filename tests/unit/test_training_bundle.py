"""Smoke tests of the shipped binary bundle: format, provenance, manifest, Predictor, metrics on real data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from xraybatch.domain import ModelInput
from xraybatch.infer import Predictor
from xraybatch.models.registry import SHIPPED_BUNDLES, read_bundle, verify_weights

BUNDLE = SHIPPED_BUNDLES / "pneumonia-binary"
KERMANY = Path(__file__).resolve().parents[3] / "shared" / "data" / "kermany"


def test_bundle_format_and_provenance() -> None:
    spec = read_bundle(BUNDLE)
    verify_weights(spec)
    assert spec.task == "binary" and spec.targets == ("Pneumonia",)
    assert spec.architecture == "efficientnet_lite0" and spec.input.size == (224, 224)
    assert sum(f.stat().st_size for f in BUNDLE.iterdir()) < 25 * 2**20
    meta = spec.meta
    prov = meta["provenance"]
    assert prov["command"].startswith("xraybatch train binary --data ")
    assert prov["git_revision"] and prov["seed"] and prov["epochs_run"] >= 1 and prov["seconds_per_epoch"] > 0
    assert meta["preprocessing"]["contrast"] == "equalise" and spec.preprocess.contrast == "equalise"
    assert meta["metrics"]["encoding_spread"]  # measured through run-folder, in the card too
    val = meta["metrics"]["validation"]
    assert sum(c["support"] for c in val["per_class"].values()) == val["n"] == prov["images"]["val"]
    assert spec.thresholds == (val["threshold"],)
    for name in ("model_card.md", "validation_roc.png", "validation_calibration.png", prov["split_manifest"]):
        assert (BUNDLE / name).is_file(), name
    card = (BUNDLE / "model_card.md").read_text()
    assert prov["command"] in card and prov["git_revision"] in card and "| Normal |" in card


def test_manifest_is_patient_disjoint() -> None:
    with open(BUNDLE / "split_manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    sides = {side: [r for r in rows if r["split"] == side] for side in ("train", "val")}
    for key in ("patient_id", "sha256"):
        assert not {r[key] for r in sides["train"]} & {r[key] for r in sides["val"]}
    meta = read_bundle(BUNDLE).meta
    assert len(sides["train"]) == meta["provenance"]["images"]["train"]
    assert len(sides["val"]) == meta["provenance"]["images"]["val"]


def test_predictor_runs() -> None:
    from training.synthetic import chest_picture
    from xraybatch.preprocess import model_input_8bit

    predictor = Predictor(read_bundle(BUNDLE))
    picture = chest_picture(300, True, np.random.default_rng(0))
    spec = read_bundle(BUNDLE)
    model_input = model_input_8bit(picture, spec.preprocess, spec.input.size)
    (prediction,) = predictor.predict([ModelInput(model_input.pixels, model_input.source_shape)])
    assert prediction.targets == ("Pneumonia",) and 0.0 <= prediction.probabilities[0] <= 1.0


@pytest.mark.shared_data
@pytest.mark.skipif(not (KERMANY / "val").is_dir(), reason="../shared/data/kermany is absent")
def test_official_val_split_matches_the_model_card(tmp_path: Path) -> None:
    """The 16 full-resolution official val images, through the Predictor, give the metrics in model.json."""
    from training.evaluate import evaluate_bundle

    metrics = evaluate_bundle(BUNDLE, KERMANY, layout="kermany", split="val", cache_dir=None)
    recorded = read_bundle(BUNDLE).meta["metrics"]["extra"]["kermany official 'val' split"]
    assert metrics["confusion_matrix"] == recorded["confusion_matrix"]
    assert metrics["auroc"] == pytest.approx(recorded["auroc"], abs=1e-4)
    assert metrics["brier"] == pytest.approx(recorded["brier"], abs=1e-4)
