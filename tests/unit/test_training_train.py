"""One epoch of training end to end: bundle export/load, Predictor agreement, resume, evaluate, CLI help."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from training.cli import train as train_group
from training.splits import read_manifest
from training.synthetic import write_kermany
from training.train import TrainConfig
from xraybatch.infer import Predictor
from xraybatch.models.registry import read_bundle

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


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kermany(tmp_path_factory.mktemp("kermany"), per_class=16, size=40, splits=("train", "val"))


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _train(data: Path, out: Path, config: Path, cache: Path, *extra: str) -> None:
    result = CliRunner().invoke(train_group, [
        "binary", "--data", str(data), "--out", str(out), "--config", str(config), "--cache-dir", str(cache),
        "--epochs", "1", *extra,
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_one_epoch_writes_a_loadable_bundle(data: Path, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _train(data, out, config, tmp_path / "cache")
    for name in ("model.json", "weights.safetensors", "split_manifest.csv", "model_card.md",
                 "validation_roc.png", "validation_calibration.png", "validation_confusion.png"):
        assert (out / name).is_file(), name
    spec = read_bundle(out)
    assert spec.task == "binary" and spec.targets == ("Pneumonia",) and spec.architecture == "separable_cnn"
    assert spec.architecture_args == {"widths": [8, 16], "dropout": 0.1}
    meta = spec.meta
    prov = meta["provenance"]
    assert prov["command"] == (f"xraybatch train binary --data {data} --out {out} --config {config} "
                               f"--epochs 1 --cache-dir {tmp_path / 'cache'}")
    assert prov["split_manifest"] == "split_manifest.csv" and prov["epochs_run"] == 1
    assert prov["git_revision"] and prov["seed"] == TrainConfig().seed
    assert prov["device"].startswith("cpu (") and prov["exported_on"] == prov["device"]
    assert [h["device"] for h in prov["history"]] == [prov["device"]]
    assert TrainConfig.from_dict(prov["config"]).input_size == 32
    val = meta["metrics"]["validation"]
    assert set(val["per_class"]) == {"Normal", "Pneumonia"}
    assert sum(c["support"] for c in val["per_class"].values()) == prov["images"]["val"]
    assert meta["thresholds"]["Pneumonia"] == pytest.approx(val["threshold"])
    assert "kermany official 'val' split" in meta["metrics"]["extra"]
    card = (out / "model_card.md").read_text()
    assert "Command: `xraybatch train binary" in card and "| Pneumonia |" in card and "support" in card
    # The manifest has every training image once, and the official val split as its own side.
    rows = read_manifest(out / "split_manifest.csv")
    assert {r["split"] for r in rows} == {"train", "val", "extra-val"}
    assert sum(r["split"] == "extra-val" for r in rows) == 32
    assert all(r["file"].startswith("val/") for r in rows if r["split"] == "extra-val")


def test_evaluate_reproduces_the_bundle_metrics(data: Path, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _train(data, out, config, tmp_path / "cache")
    runner = CliRunner()
    result = runner.invoke(train_group, ["evaluate", str(out), "--data", str(data), "--split", "manifest-val",
                                         "--cache-dir", str(tmp_path / "cache"), "--report", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    val = read_bundle(out).meta["metrics"]["validation"]
    assert f"accuracy {val['accuracy']:.4f}, AUROC {val['auroc']:.4f}" in result.output
    assert (tmp_path / "r.md").is_file() and (tmp_path / "r_manifest_val_roc.png").is_file()
    other = runner.invoke(train_group, ["evaluate", str(out), "--data", str(data), "--split", "val"])
    assert other.exit_code == 0 and "n=32" in other.output


def test_predictor_matches_training_inputs(data: Path, config: Path, tmp_path: Path) -> None:
    from training.datasets import load_inputs, scan
    from xraybatch.domain import ModelInput
    from xraybatch.models.registry import ModelPreprocess

    out = tmp_path / "bundle"
    _train(data, out, config, tmp_path / "cache")
    predictor = Predictor(read_bundle(out))
    images = scan(data, "kermany", "val")
    inputs = load_inputs(images, ModelPreprocess(), (32, 32))
    probs = [p.probabilities[0] for p in predictor.predict([ModelInput(x, x.shape) for x in inputs])]
    assert all(0.0 <= p <= 1.0 for p in probs)


def test_resume_continues_exactly(data: Path, config: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(data, straight, config, tmp_path / "cache", "--epochs", "2", "--checkpoint-dir", str(tmp_path / "c1"))
    _train(data, resumed, config, tmp_path / "cache", "--checkpoint-dir", str(tmp_path / "c2"))
    _train(data, resumed, config, tmp_path / "cache", "--epochs", "2", "--resume",
           "--checkpoint-dir", str(tmp_path / "c2"))
    a = json.loads((straight / "model.json").read_text())
    b = json.loads((resumed / "model.json").read_text())
    assert len(b["provenance"]["history"]) == 2
    for x, y in zip(a["provenance"]["history"], b["provenance"]["history"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
    assert a["weights"]["sha256"] == b["weights"]["sha256"]


def test_a_run_trained_elsewhere_is_exported_here_with_its_devices_on_record(data: Path, config: Path,
                                                                            tmp_path: Path) -> None:
    """A GPU machine trains, this one exports: --resume of the finished checkpoint runs no epoch, and the card
    names the device of the epochs and the exporting one; what is only scored after training may differ."""
    ckpt = tmp_path / "c"
    _train(data, tmp_path / "there", config, tmp_path / "cache", "--checkpoint-dir", str(ckpt))
    for name in ("last.pt", "best.pt"):  # as a checkpoint from a GPU machine would read
        state = torch.load(ckpt / name, map_location="cpu", weights_only=False)
        state["history"] = [dict(h, device="cuda (Test GPU)") for h in state["history"]]
        state["config"]["extra_eval"] = []
        torch.save(state, ckpt / name)
    out = tmp_path / "here"
    _train(data, out, config, tmp_path / "cache", "--checkpoint-dir", str(ckpt), "--resume")
    meta = read_bundle(out).meta
    prov = meta["provenance"]
    assert prov["epochs_run"] == 1 and prov["device"] == "cuda (Test GPU)"
    assert prov["exported_on"].startswith("cpu (")
    assert "kermany official 'val' split" in meta["metrics"]["extra"]  # scored here, though not there
    card = (out / "model_card.md").read_text()
    assert f"on cuda (Test GPU) (exported on {prov['exported_on']})" in card
    assert "resumed from its checkpoint" in card


def test_resume_refuses_other_settings(data: Path, config: Path, tmp_path: Path) -> None:
    _train(data, tmp_path / "b", config, tmp_path / "cache", "--checkpoint-dir", str(tmp_path / "c"))
    result = CliRunner().invoke(train_group, [
        "binary", "--data", str(data), "--out", str(tmp_path / "b"), "--config", str(config), "--epochs", "2",
        "--cache-dir", str(tmp_path / "cache"), "--checkpoint-dir", str(tmp_path / "c"), "--resume", "--lr", "0.1",
    ])
    assert result.exit_code == 1 and "cannot resume" in result.output and "'lr'" in result.output


@pytest.mark.parametrize("command", [[], ["binary"], ["tune"], ["evaluate"]])
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(train_group, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output


def test_bad_settings_are_click_errors(tmp_path: Path, data: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('no_such_setting = 1\n')
    result = CliRunner().invoke(train_group, ["binary", "--data", str(data), "--out", str(tmp_path / "o"),
                                              "--config", str(bad)])
    assert result.exit_code == 1 and "Error: invalid training settings" in result.output


def test_train_binary_starts_from_the_recipe_the_shipped_bundle_was_trained_with() -> None:
    """`xraybatch train binary --data ../shared/data/kermany` (no --config, no flags) resolves to the settings in
    the shipped bundle's model.json, but for those a run may change without changing the weights."""
    from training.cli import CONFIGS, resolve_config
    from training.train import RESUMABLE_CHANGES
    from xraybatch.models.registry import SHIPPED_BUNDLES

    now = resolve_config(Path("../shared/data/kermany"), None, {"version": None}, CONFIGS / "binary.toml").to_dict()
    meta = json.loads((SHIPPED_BUNDLES / "pneumonia-binary" / "model.json").read_text(encoding="utf-8"))
    shipped = meta["provenance"]["config"]
    assert sorted(now) == sorted(shipped)
    differ = sorted(k for k in now if k not in RESUMABLE_CHANGES and json.dumps(now[k]) != json.dumps(shipped[k])
                    and k != "input_jpeg_quality")
    assert differ == []
    assert (now["input_jpeg_quality"], shipped["input_jpeg_quality"]) == (-1, 75)  # read off the pictures
    assert now["version"] == meta["version"]
    assert TrainConfig.from_dict({k: v for k, v in now.items() if k != "data"}) != TrainConfig()  # not the defaults


def test_cli_module_is_cheap_to_import() -> None:
    import subprocess
    import sys

    code = "import sys, training.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_inputs_are_normalised_like_inference() -> None:
    from training.train import input_spec
    from xraybatch.infer import to_tensor

    spec = input_spec("efficientnet_lite0", 32)
    x = to_tensor(np.full((1, 32, 32), 0.75, dtype=np.float32), spec)
    assert x.shape == (1, 1, 32, 32) and torch.allclose(x, torch.tensor(0.5))


def test_rich_progress_bar_shows_live_metrics() -> None:
    import io

    from rich.console import Console

    from training.cli import _RichReporter

    buffer = io.StringIO()
    reporter = _RichReporter(Console(file=buffer, force_terminal=True, width=120))
    reporter.epoch_start(1, 3, steps=2)
    reporter.step({"loss": 0.5, "acc": 0.75})
    reporter.step({"loss": 0.4, "acc": 0.8})
    reporter.epoch_end(1, {"val_auroc": 0.9})
    text = buffer.getvalue()
    assert "epoch 1: val_auroc 0.9" in text and "loss 0.4000" in text


def test_model_card_can_be_rebuilt_from_model_json(data: Path, config: Path, tmp_path: Path) -> None:
    from training.evaluate import refresh_model_card

    out = tmp_path / "bundle"
    _train(data, out, config, tmp_path / "cache")
    before = (out / "model_card.md").read_text()
    (out / "model_card.md").unlink()
    assert refresh_model_card(out).read_text() == before


def test_a_rebuilt_model_card_keeps_the_input_gate_section(tmp_path: Path) -> None:
    """`train consistency --write-card` re-renders the card: the gate section `train gate` wrote must stay."""
    import shutil

    from training.evaluate import refresh_model_card
    from xraybatch.models.registry import SHIPPED_BUNDLES

    bundle = tmp_path / "nih"
    bundle.mkdir()
    shutil.copy(SHIPPED_BUNDLES / "nih-multilabel" / "model.json", bundle / "model.json")
    gate = json.loads((bundle / "model.json").read_text())["gate"]
    card = refresh_model_card(bundle).read_text()
    assert card.count("## Input gate") == 1 and card.rstrip().endswith("(refused)")
    assert f"| classifier | {gate['scores'][1]['definition']} | {gate['scores'][1]['threshold']} |" in card
    assert refresh_model_card(bundle).read_text() == card  # idempotent
    assert card == (SHIPPED_BUNDLES / "nih-multilabel" / "model_card.md").read_text()


def test_a_diverging_run_stops_with_a_reason(data: Path, config: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from training import losses

    monkeypatch.setattr(losses.WeightedFocalLoss, "forward", lambda self, logits, targets: logits.sum() * float("nan"))
    result = CliRunner().invoke(train_group, [
        "binary", "--data", str(data), "--out", str(tmp_path / "b"), "--config", str(config),
        "--cache-dir", str(tmp_path / "cache"), "--epochs", "1"])
    assert result.exit_code == 1 and "training diverged: the loss is nan at epoch 1, step 1" in result.output
    assert not (tmp_path / "b" / "model.json").exists()
