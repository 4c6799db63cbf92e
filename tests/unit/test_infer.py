"""Bundles load with their sha256 checked; predictions are batched, targets-aligned and calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_bundle
from xraybatch.domain import ModelInput
from xraybatch.errors import ModelError
from xraybatch.infer import Predictor, to_tensor
from xraybatch.models.findings import NIH_TARGETS
from xraybatch.models.registry import find_bundles, read_bundle, sha256_of


def _inputs(n: int, size: int) -> list[ModelInput]:
    rng = np.random.default_rng(1)
    return [ModelInput(rng.random((size, size), dtype=np.float32), (size, size)) for _ in range(n)]


def test_batched_equals_one_by_one(tiny_bundles: Path) -> None:
    spec = read_bundle(tiny_bundles / "tiny-multilabel")
    predictor = Predictor(spec)
    inputs = _inputs(5, 48)
    together = predictor.predict(inputs)
    alone = [predictor.predict([i])[0] for i in inputs]
    assert together[0].targets == NIH_TARGETS and len(together[0].probabilities) == 15
    # the weights' checked sha256 goes with every prediction: it names the device of the outputs
    assert {p.weights_sha256 for p in together} == {sha256_of(spec.weights_file)}
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        assert all(0.0 <= p <= 1.0 for p in a.probabilities)


def test_temperature_and_thresholds_applied(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b", thresholds={"Pneumonia": 0.25})
    base = Predictor(read_bundle(bundle))
    features = base.forward(_inputs(3, 64))
    logits = features.logits[:, 0]
    meta = json.loads((bundle / "model.json").read_text())
    meta["temperature"] = [2.0]
    (bundle / "model.json").write_text(json.dumps(meta))
    calibrated = Predictor(read_bundle(bundle)).to_predictions(features)
    np.testing.assert_allclose([p.probabilities[0] for p in calibrated], torch.sigmoid(logits / 2).numpy(), atol=1e-6)
    assert [p.positive[0] for p in calibrated] == [p.probabilities[0] >= 0.25 for p in calibrated]


def test_to_tensor_normalises_and_repeats_channels(tiny_bundles: Path) -> None:
    spec = read_bundle(tiny_bundles / "tiny-multilabel").input
    batch = to_tensor([np.full((48, 48), 0.75, np.float32)], spec)
    assert batch.shape == (1, 3, 48, 48)
    torch.testing.assert_close(batch, torch.full((1, 3, 48, 48), 1.0))  # (0.75 - 0.5) / 0.25
    with pytest.raises(ValueError, match="images must be"):
        to_tensor([np.zeros((10, 10), np.float32)], spec)


def test_sha256_mismatch_is_refused(tiny_bundle: Path) -> None:
    weights = tiny_bundle / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 of weights.safetensors is .* reinstall the bundle"):
        Predictor(read_bundle(tiny_bundle))


def test_malformed_bundles(tmp_path: Path, tiny_bundle: Path) -> None:
    with pytest.raises(ModelError, match="model.json is missing"):
        read_bundle(tmp_path)
    meta = json.loads((tiny_bundle / "model.json").read_text())
    meta["targets"] = ["Pneumonia", "Dragons"]
    (tiny_bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"unknown targets \['Dragons'\]"):
        read_bundle(tiny_bundle)


def test_no_bundle_says_how_to_get_one(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no model bundle found .*`xraybatch train binary"):
        find_bundles((str(tmp_path / "empty"),))
    assert [s.name for s in find_bundles((str(make_tiny_bundle(tmp_path / "one")),))] == ["tiny-binary"]
