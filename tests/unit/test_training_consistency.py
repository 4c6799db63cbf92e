"""The encoding-consistency evaluation: spread statistics on known numbers, and end to end through run-folder."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import make_tiny_bundle
from training.cli import train as train_group
from training.consistency import (
    TARGET_MAX_LOSSLESS,
    measure_bundle,
    sample,
    spread_card_lines,
    spread_table,
    summarise,
    write_card,
)
from training.encodings import ENCODINGS
from training.synthetic import write_kermany
from xraybatch.errors import ModelError
from xraybatch.models.registry import read_bundle, verify_weights

TINY = """
architecture = "separable_cnn"
architecture_args = {widths = [8, 16], dropout = 0.1}
init = "none"
input_size = 32
freeze = 0
batch_size = 8
lr = 0.003
val_fraction = 0.3
threads = 1

[reencode]
probability = 0.0
"""


def test_summarise_known_spreads() -> None:
    # 3 pictures x 6 encodings (the last lossy) x 2 targets.
    p = np.full((3, 6, 2), 0.5)
    p[0, :, 0] = [0.50, 0.51, 0.50, 0.50, 0.52, 0.70]  # lossless spread 0.02, all 0.20
    p[1, :, 0] = [0.10, 0.10, 0.10, 0.10, 0.10, 0.10]
    p[2, :, 0] = [0.30, 0.31, 0.30, 0.30, 0.30, 0.30]  # 0.01 both
    p[:, :, 1] = 0.9
    p[2, 3, 1] = 0.6  # lossless 0.3 on target 1, picture 2
    report = summarise(p, ["A", "B"], ENCODINGS)
    a, b = report["targets"]["A"], report["targets"]["B"]
    assert a["lossless"] == {"max": 0.02, "median": 0.01} and a["all"] == {"max": 0.2, "median": 0.01}
    assert b["lossless"] == {"max": 0.3, "median": 0.0}
    assert report["overall"]["lossless"]["max"] == 0.3 and report["overall"]["all"]["max"] == 0.3
    assert report["overall"]["lossless"]["median"] == 0.005  # of the six picture x target spreads
    deviation = report["deviation_from_reference"]["per_encoding"]
    assert deviation["mono2-8bit"]["max"] == 0.0 and deviation["mono2-8bit-jpeg90"]["max"] == 0.2
    assert deviation["mono1-15bit-j2k"]["max"] == 0.3
    assert report["meets_target"] is False and report["pictures"] == {"lossless": 3, "all": 3}


def test_summarise_leaves_out_pictures_with_a_missing_file() -> None:
    p = np.full((2, 6, 1), 0.4)
    p[1, 5, 0] = np.nan  # the lossy file of picture 1 has no result
    p[1, 0, 0] = 0.41
    report = summarise(p, ["A"], ENCODINGS)
    assert report["pictures"] == {"lossless": 2, "all": 1}
    assert report["overall"]["lossless"]["max"] == 0.01 and report["overall"]["all"]["max"] == 0.0
    assert report["meets_target"] is True
    with pytest.raises(ValueError, match="probabilities must be"):
        summarise(np.zeros((2, 5, 1)), ["A"], ENCODINGS)


def test_sample_is_seeded_and_keeps_order() -> None:
    items = list(range(50))
    first = sample(items, 5, seed=7)
    assert first == sample(items, 5, seed=7) and first == sorted(first) and len(set(first)) == 5
    assert first != sample(items, 5, seed=8)
    assert sample(items, 80, seed=0) == items and sample(items, None, seed=0) == items
    with pytest.raises(ValueError, match="at least 1"):
        sample(items, 0, seed=0)


def test_card_section_only_when_measured() -> None:
    assert spread_card_lines({}) == []
    report = summarise(np.full((1, 6, 1), 0.3), ["Pneumonia"], ENCODINGS)
    report |= {"encodings": [{"name": e.name, "lossless": e.lossless} for e in ENCODINGS],
               "sample": {"n": 1, "seed": 0}, "measured_with": "xraybatch run-folder", "measured_at": "now",
               "target_max_lossless": TARGET_MAX_LOSSLESS}
    text = "\n".join(spread_card_lines({"encoding_spread": report}))
    assert text.startswith("## Encoding consistency") and "**met**" in text
    assert "| Pneumonia | 0.0000 | 0.0000 | 0.0000 | 0.0000 |" in text and spread_table(report) in text


# -- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kermany(tmp_path_factory.mktemp("kermany"), per_class=12, size=40)


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch bundle trained with the default (equalised) preprocessing, with its split manifest."""
    root = tmp_path_factory.mktemp("trained")
    config = root / "tiny.toml"
    config.write_text(TINY)
    out = root / "bundle"
    result = CliRunner().invoke(train_group, [
        "binary", "--data", str(data), "--out", str(out), "--config", str(config), "--cache-dir", str(root / "c"),
        "--epochs", "1",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert read_bundle(out).preprocess.contrast == "equalise"
    return out


def test_equalised_bundle_gives_one_answer_per_picture_and_the_card_says_so(trained: Path, data: Path,
                                                                            tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in trained.iterdir():
        (bundle / f.name).write_bytes(f.read_bytes())
    before = json.loads((bundle / "model.json").read_text())
    out = tmp_path / "spread.json"
    result = CliRunner().invoke(train_group, [
        "consistency", str(bundle), "--data", str(data), "--n", "2", "--threads", "1", "--json", str(out),
        "--write-card",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (report,) = json.loads(out.read_text())
    assert report["counts"] == {"done": 2 * len(ENCODINGS)} and report["not_done"] == []
    assert report["sample"]["n"] == 2 and report["pictures"] == {"lossless": 2, "all": 2}
    assert report["overall"]["lossless"]["max"] <= 1e-5 and report["meets_target"] is True
    assert report["overall"]["all"]["max"] >= report["overall"]["lossless"]["max"]
    assert "meets the lossless target" in result.output and "| Pneumonia |" in result.output

    after = json.loads((bundle / "model.json").read_text())
    assert after["metrics"]["encoding_spread"] == report
    assert {k: v for k, v in after.items() if k != "metrics"} == {k: v for k, v in before.items() if k != "metrics"}
    assert {k: v for k, v in after["metrics"].items() if k != "encoding_spread"} == before["metrics"]
    verify_weights(read_bundle(bundle))
    card = (bundle / "model_card.md").read_text()
    assert "## Encoding consistency" in card and "| Pneumonia |" in card and "## Training history" in card


def test_display_bundle_spread_is_measured(tmp_path: Path) -> None:
    """A format-1 bundle ("display" preprocessing) answers differently per encoding: the evaluation shows it.

    The pictures have little contrast (values 100-150), so the percentile window of the 8-bit file and the
    full-range window of the 12-bit one differ most; a random network reacts little to its input, so its input
    std is made small. The equalised bundle above stays at float noise (<= 1e-5) on the same kind of run.
    """
    from PIL import Image

    from training.synthetic import chest_picture

    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        picture = (100 + chest_picture(64, i % 2 == 0, rng).astype(np.float64) * 50 / 255).astype(np.uint8)
        Image.fromarray(picture).save(data / "val" / f"p{i}.png")
        files.append(data / "val" / f"p{i}.png")
    bundle = make_tiny_bundle(tmp_path / "display", size=32, contrast="display")
    meta = json.loads((bundle / "model.json").read_text())
    meta["input"]["std"] = [0.05]
    (bundle / "model.json").write_text(json.dumps(meta))
    assert read_bundle(bundle).preprocess.contrast == "display"
    with open(bundle / "split_manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "file", "patient_id", "sha256", "Pneumonia"])
        for f in files:
            writer.writerow(["val", f.relative_to(data).as_posix(), f.stem, hashlib.sha256(f.read_bytes()).hexdigest(), 0])
    report = measure_bundle(bundle, data, n=3, seed=1, threads=1)
    assert report["counts"] == {"done": 3 * len(ENCODINGS)} and report["sample"]["n"] == 3
    assert report["overall"]["lossless"]["max"] > 5e-4 and report["overall"]["lossless"]["median"] > 5e-4
    worst = report["worst"]["lossless"]
    assert worst["target"] == "Pneumonia" and worst["spread"] == report["overall"]["lossless"]["max"]
    deviation = report["deviation_from_reference"]["per_encoding"]
    assert deviation["mono1-15bit-j2k"]["max"] <= 1e-5  # no VOI either: the same percentile window
    assert deviation["mono1-12bit-window"]["max"] > 5e-4


def test_write_card_refuses_damaged_weights(trained: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in trained.iterdir():
        (bundle / f.name).write_bytes(f.read_bytes())
    weights = bundle / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    before = (bundle / "model.json").read_text()
    with pytest.raises(ModelError, match="sha256"):
        write_card(bundle, {"overall": {}})
    assert (bundle / "model.json").read_text() == before


def test_wrong_data_root_names_the_remedy(trained: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(train_group, ["consistency", str(trained), "--data", str(tmp_path)])
    assert result.exit_code == 1 and "Error: validation file" in result.output and "--data" in result.output
