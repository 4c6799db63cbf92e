"""``xraybatch train gate`` (training/gate.py): what it builds, how it chooses thresholds, what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import make_tiny_bundle
from training import gate as tg
from training.datasets import scan
from training.splits import patient_split, write_manifest
from training.synthetic import write_kermany
from xraybatch.gate import read_gate
from xraybatch.models.registry import read_bundle


def test_transforms_turn_flip_invert_and_crop_stored_values() -> None:
    x = np.arange(12, dtype=np.uint16).reshape(3, 4) + 100
    assert np.array_equal(tg.transform_pixels(x, "rot90"), np.rot90(x))
    assert np.array_equal(tg.transform_pixels(x, "rot180"), x[::-1, ::-1])
    assert np.array_equal(tg.transform_pixels(x, "flipud"), x[::-1])
    assert np.array_equal(tg.transform_pixels(x, "fliplr"), x[:, ::-1])
    brighter = tg.transform_pixels(x, "gamma:0.5")  # same range and order, other contrast
    assert brighter.dtype == x.dtype and (brighter.min(), brighter.max()) == (x.min(), x.max())
    assert np.all(np.diff(brighter.ravel()) >= 0) and brighter[1, 1] > x[1, 1]
    inverted = tg.transform_pixels(x, "invert")
    assert inverted.dtype == x.dtype and inverted.min() == x.min() and inverted[0, 0] == x.max()
    big = np.zeros((200, 300), np.uint8)
    crop = tg.transform_pixels(big, "crop:5")
    assert 0.2 * 200 <= crop.shape[0] <= 0.45 * 200 and crop.shape == tg.transform_pixels(big, "crop:5").shape
    with pytest.raises(ValueError, match="unknown transform 'spin'"):
        tg.transform_pixels(x, "spin")


@pytest.mark.parametrize("kind", tg.GENERATED_KINDS)
def test_generated_pictures_are_12_bit_and_reproducible(kind: str) -> None:
    a, b = tg.generated_picture(f"{kind}:3", size=64), tg.generated_picture(f"{kind}:3", size=64)
    assert a.dtype == np.uint16 and a.shape == (64, 64) and np.array_equal(a, b)
    assert a.max() == 4095 and a.min() == 0  # full range: never a constant picture
    assert not np.array_equal(a, tg.generated_picture(f"{kind}:4", size=64))


def test_thresholds_keep_every_chest_of_the_fit_with_the_margin() -> None:
    scores = np.array([[1.0, -5.0], [3.0, -1.0], [2.0, -3.0], [50.0, 9.0], [4.0, -6.0]])
    groups = ["chest:val:a", "chest:val:b", "chest:val:a", "negative:val:noise", "chest:train:a"]
    # highest chest (training side 4 / validation side -1) + 0.5 x (that - the validation median (2, -3))
    assert np.allclose(tg.choose_thresholds(scores, groups, 0.5), [5.0, 0.0])
    assert np.allclose(tg.choose_thresholds(scores, groups, 0.0), [4.0, -1.0])
    with pytest.raises(ValueError, match="no validation chest"):
        tg.choose_thresholds(scores, ["negative:val:x"] * 5, 0.5)


def test_fit_scores_separate_synthetic_chests_from_negatives() -> None:
    rng = np.random.default_rng(0)
    chests = rng.normal(size=(300, 40))
    negatives = rng.normal(size=(120, 40)) + np.r_[np.full(5, 3.0), np.zeros(35)]
    features = np.concatenate([chests, negatives, rng.normal(size=(50, 40)), rng.normal(size=(30, 40)) + 4.0])
    groups = (["chest:train:x"] * 300 + ["negative:train:rot90"] * 120 + ["chest:val:x"] * 50
              + ["negative:val:rot90"] * 30)
    fitted = tg.fit_scores(features, groups, tg.GateFitConfig(components=8, classifier_c=1.0))
    assert fitted.tensors["components"].shape == (8, 40) and fitted.tensors["coef"].shape == (40,)
    from xraybatch.gate import Gate, Score

    gate = Gate("t", 8, tuple(Score(s["name"], s["kind"], np.inf) for s in fitted.scores), fitted.tensors)
    scores = gate.score_features(features)
    thresholds = tg.choose_thresholds(scores, groups, 0.5)
    refused = ~np.all(scores <= thresholds, axis=1)
    assert not refused[420:470].any()  # every validation chest passes
    assert refused[470:].mean() > 0.9  # held-out negatives are refused
    assert "Ledoit-Wolf" in fitted.scores[0]["definition"] and "rot90" in fitted.scores[1]["definition"]


@pytest.fixture
def kermany_bundle(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny bundle, a synthetic Kermany-layout root and its split manifest."""
    root = write_kermany(tmp_path / "kermany", per_class=12, size=64, seed=3)
    images = scan(root, "kermany", "train")
    manifest = tmp_path / "split_manifest.csv"
    write_manifest(manifest, images, patient_split(images, 0.25, seed=1))
    return make_tiny_bundle(tmp_path / "bundle"), root, manifest


def _cfg(margin: float = 0.5) -> tg.GateFitConfig:
    return tg.GateFitConfig(components=4, margin=margin, negatives_per_transform=4, val_negatives_per_transform=2,
                            generated=2)


def test_a_must_reject_image_that_passes_stops_the_fit_and_nothing_is_written(
        kermany_bundle: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, root, manifest = kermany_bundle
    before = (bundle / "model.json").read_text()
    val_file = next(iter(sorted((root / "train" / "NORMAL").iterdir())))
    with pytest.raises(ValueError, match="would let must-reject cases through.*nothing was written"):
        # a chest radiograph given as must-reject scores like the chests it is among
        tg.fit_gate(bundle, [root], [manifest], val_images=[val_file], reject=[val_file], cfg=_cfg(),
                    cache_dir=tmp_path / "cache")
    assert (bundle / "model.json").read_text() == before and not (bundle / "gate.safetensors").exists()


def test_the_command_writes_a_gate_the_pipeline_reads(kermany_bundle: tuple[Path, Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from training.cli import train

    bundle, root, manifest = kermany_bundle
    monkeypatch.setattr(tg, "non_chest_items", lambda group="": [])  # fewer images: the test stays fast
    result = CliRunner().invoke(train, [
        "gate", str(bundle), "--data", str(root), "--manifest", str(manifest), "--components", "4",
        "--negatives", "4", "--generated", "2", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "input gate written (gate.safetensors); false-reject rate on validation 0.0000" in result.output
    assert "must reject noise: generated noise" in result.output
    block = json.loads((bundle / "model.json").read_text())["gate"]
    command = block["provenance"]["command"]
    assert command[:4] == ["xraybatch", "train", "gate", str(bundle)]
    assert command[command.index("--data"):command.index("--data") + 2] == ["--data", str(root)]  # one per value
    assert block["provenance"]["config"]["margin"] == tg.GateFitConfig().margin == 1.0
    assert block["report"]["val_chests"]["refused"] == 0 and block["false_reject_rate_validation"] == 0.0
    assert all(case["refused"] for case in block["report"]["test_cases"].values())
    assert [s["name"] for s in block["scores"]] == ["distance", "classifier"]
    gate = read_gate(read_bundle(bundle))
    assert gate is not None and gate.channels == 32
    assert (bundle / "gate.safetensors").stat().st_mode & 0o777 == (bundle / "model.json").stat().st_mode & 0o777
    # The thresholds are those of the rule on the chests' scores, recomputed here.
    items = [i for i in tg.build_items([root], [manifest], [], [], [], 4, 2, 2) if i.group.startswith("chest:")]
    scores = gate.score_features(tg.extract_features(read_bundle(bundle), items, tmp_path / "cache"))
    assert np.allclose([s.threshold for s in gate.scores], tg.choose_thresholds(scores, [i.group for i in items], 1.0),
                       atol=1e-4)
    card = (bundle / "model_card.md").read_text()
    assert card.count("## Input gate") == 1 and "Must-reject cases" in card
    # Fitting again replaces the gate and the card's section (features come from the cache).
    assert CliRunner().invoke(train, ["gate", str(bundle), "--data", str(root), "--manifest", str(manifest),
                                      "--components", "4", "--negatives", "4", "--generated", "2",
                                      "--cache-dir", str(tmp_path / "cache")]).exit_code == 0
    assert (bundle / "model_card.md").read_text().count("## Input gate") == 1


def test_fit_gate_reports_every_group_and_case(kermany_bundle: tuple[Path, Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bundle, root, manifest = kermany_bundle
    monkeypatch.setattr(tg, "non_chest_items", lambda group="": [])
    spec = read_bundle(bundle)
    items = tg.build_items([root], [manifest], [], [], [], 4, 2, 2)
    groups = {i.group for i in items}
    assert {"chest:train:kermany", "chest:val:kermany", "negative:train:rot90", "negative:train:flipud",
            "negative:train:crop", "negative:train:noise", "negative:val:gradient", "check:val:fliplr:kermany",
            "check:val:invert:kermany", "reject:noise", "reject:gradient"} <= groups
    assert not any(g.endswith((":invert", ":fliplr")) for g in groups if g.startswith("negative"))
    # A --turn chest is a validation chest (once, also when given as --val-images) and two must-reject cases.
    chest = min((root / "train" / "NORMAL").iterdir())
    turned = tg.build_items([root], [manifest], [chest], [], [chest], 4, 2, 2)
    extra = [(i.group, i.transform) for i in turned if i.path == chest and not i.group.startswith(
        ("chest:train", "chest:val:kermany", "negative", "check"))]
    assert sorted(extra) == [("chest:val:files", ""), ("reject:rotated 90", "rot90"),
                             ("reject:upside down", "flipud")]
    features = tg.extract_features(spec, items, tmp_path / "cache")
    assert features.shape == (len(items), 5 * 32)
    cached = tg.extract_features(spec, items, tmp_path / "cache")  # from the cache, same numbers
    assert np.array_equal(features, cached)
