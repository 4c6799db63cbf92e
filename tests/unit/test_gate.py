"""The learned input gate (xraybatch/gate.py): reading the gate block, scores with known values, verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_bundle
from xraybatch.errors import ModelError
from xraybatch.gate import PARTS, REASON, Gate, Score, judge, load_gates, pool, read_gate
from xraybatch.infer import Features, Predictor
from xraybatch.models.registry import read_bundle, sha256_of, write_model_json
from xraybatch.settings import GateConfig

CHANNELS = 32  # the tiny separable CNN's last width
FEATURES = len(PARTS) * CHANNELS  # global, top, bottom, left and right pools of each channel


def write_gate_block(bundle: Path, tensors: dict[str, np.ndarray], scores: list[dict[str, object]],
                     **block: object) -> Path:
    """Add a gate block and gate.safetensors to a bundle, as `xraybatch train gate` writes them."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()},
              str(bundle / "gate.safetensors"))
    meta = json.loads((bundle / "model.json").read_text())
    meta["gate"] = {"format": 1, "file": "gate.safetensors", "sha256": sha256_of(bundle / "gate.safetensors"),
                    "pooling": "global+halves", "channels": CHANNELS, "scores": scores, **block}
    write_model_json(bundle, meta)
    return bundle


def known_tensors(k: int = 4) -> dict[str, np.ndarray]:
    """z = f - 1; distance = |z[:k]| (the global pools of the first k channels, identity precision);
    classifier logit = z[0] - 2."""
    coef = np.zeros(FEATURES)
    coef[0] = 1.0
    return {
        "center": np.ones(FEATURES), "scale": np.ones(FEATURES), "components": np.eye(k, FEATURES),
        "mean": np.zeros(k), "precision": np.eye(k), "coef": coef, "intercept": np.array([-2.0]),
    }


SCORES = [{"name": "distance", "kind": "mahalanobis", "threshold": 3.0, "definition": "test"},
          {"name": "classifier", "kind": "logistic", "threshold": 0.5, "definition": "test"}]


@pytest.fixture
def gated_bundle(tmp_path: Path) -> Path:
    return write_gate_block(make_tiny_bundle(tmp_path / "gated"), known_tensors(), SCORES)


def activations(rows: list[list[float]], h: int = 3, w: int = 2) -> torch.Tensor:
    """(N, C, h, w) activations whose spatial mean is ``rows`` (each map varies around its mean)."""
    x = torch.tensor(rows, dtype=torch.float32)[:, :, None, None].repeat(1, 1, h, w)
    wobble = torch.linspace(-1, 1, h * w).view(1, 1, h, w)
    return x + wobble - wobble.mean()


def features_of(values: dict[int, float]) -> list[float]:
    row = [1.0] * CHANNELS
    for i, v in values.items():
        row[i] = v
    return row


def test_pool_gives_the_whole_map_and_its_halves() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]).view(1, 1, 3, 2)  # 3 rows, 2 columns
    # global; top = rows 0-1, bottom = rows 1-2 (the middle row in both); left = column 0, right = column 1
    assert pool(x).tolist() == [[4.0, 2.5, 5.25, 3.0, 5.0]]
    y = torch.randn(2, 3, 7, 7)
    import torch.nn.functional as F

    halves = [F.adaptive_avg_pool2d(y, (2, 1)), F.adaptive_avg_pool2d(y, (1, 2))]
    expected = torch.cat([y.mean(dim=(2, 3)), halves[0][:, :, 0, 0], halves[0][:, :, 1, 0], halves[1][:, :, 0, 0],
                          halves[1][:, :, 0, 1]], dim=1)
    assert np.allclose(pool(y), expected.numpy(), atol=1e-6)
    assert np.allclose(pool(y.numpy()), pool(y))
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        pool(y[0])


def test_scores_have_the_known_values(gated_bundle: Path) -> None:
    gate = read_gate(read_bundle(gated_bundle))
    assert gate is not None and gate.channels == CHANNELS
    assert [s.name for s in gate.scores] == ["distance", "classifier"]
    rows = [features_of({}), features_of({0: 4.0, 1: 5.0}), features_of({1: 3.0, 2: -1.0, 3: 1.0, 9: 50.0})]
    scores = gate.score(activations(rows))
    # row 0: z = 0; row 1: z0 = 3, z1 = 4 -> distance 5, logit 1; row 2: z1 = 2, z2 = -2 (z9 is not projected)
    assert np.allclose(scores, [[0.0, -2.0], [5.0, 1.0], [np.sqrt(8.0), -2.0]], atol=1e-6)
    assert gate.passes(scores).tolist() == [True, False, True]
    assert gate.passes(np.array([[3.0, 0.5], [3.0001, 0.0], [np.nan, 0.0]])).tolist() == [True, False, False]


def test_verdict_names_the_failing_score_and_threshold(gated_bundle: Path) -> None:
    gate = read_gate(read_bundle(gated_bundle))
    assert gate is not None
    refused = gate.verdict(np.array([5.0, -2.0]))
    assert not refused.passed
    assert refused.text == f"{REASON} (distance 5.00 > threshold 3.00; gate of tiny-binary@0.0.1-test)"
    by_classifier = gate.verdict(np.array([1.0, 1.25]))
    assert "(classifier 1.25 > threshold 0.50;" in by_classifier.text
    passed = gate.verdict(np.array([1.0, -2.0]))
    assert passed.passed and passed.text == ("input gate of tiny-binary@0.0.1-test: distance 1.00 <= 3.00, "
                                             "classifier -2.00 <= 0.50")


def test_a_bundle_without_a_gate_block_has_no_gate(tiny_bundle: Path) -> None:
    assert read_gate(read_bundle(tiny_bundle)) is None


def _edit_block(bundle: Path, **changes: object) -> None:
    meta = json.loads((bundle / "model.json").read_text())
    meta["gate"].update(changes)
    write_model_json(bundle, meta)


@pytest.mark.parametrize(("changes", "match"), [
    ({"format": 2}, "has format 2, this xraybatch reads 1"),
    ({"scores": []}, "lists no scores"),
    ({"scores": [{"name": "d", "kind": "knn", "threshold": 1.0}]}, "kind 'knn', known"),
    ({"scores": [{"name": "d", "kind": "mahalanobis", "threshold": float("nan")}]}, "not a finite number"),
    ({"scores": [{"name": "d", "kind": "mahalanobis"}]}, r"malformed \(KeyError"),
    ({"channels": 16}, r"tensor 'center' has shape \(160,\).*expected \(80,\)"),
    ({"pooling": "global"}, "has pooling 'global', this xraybatch computes 'global\\+halves'"),
    ({"file": "absent.safetensors"}, "absent.safetensors, which is missing"),
    ({"sha256": "0" * 64}, "sha256 of gate.safetensors differs"),
])
def test_a_malformed_gate_stops_the_load_with_the_remedy(gated_bundle: Path, changes: dict[str, object],
                                                         match: str) -> None:
    _edit_block(gated_bundle, **changes)
    with pytest.raises(ModelError, match=match) as info:
        read_gate(read_bundle(gated_bundle))
    assert "refit it with `xraybatch train gate`" in str(info.value)


def test_missing_tensors_are_named(tmp_path: Path) -> None:
    tensors = known_tensors()
    del tensors["precision"]
    bundle = write_gate_block(make_tiny_bundle(tmp_path / "b"), tensors, SCORES)
    with pytest.raises(ModelError, match=r"lacks tensors \['precision'\]; refit it"):
        read_gate(read_bundle(bundle))


def test_a_gate_fitted_on_other_channels_fails_at_start_up(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b", name="wide")
    tensors = {"center": np.zeros(320), "scale": np.ones(320), "coef": np.zeros(320), "intercept": np.zeros(1)}
    write_gate_block(bundle, tensors, [SCORES[1]])
    _edit_block(bundle, channels=64)
    predictor = Predictor(read_bundle(bundle))
    with pytest.raises(ModelError, match="fitted on 64 feature channels, the network gives 32; refit"):
        load_gates([predictor], GateConfig())


def test_load_gates_follows_the_bundles_and_the_setting(gated_bundle: Path, tiny_bundle: Path) -> None:
    predictors = [Predictor(read_bundle(gated_bundle)), Predictor(read_bundle(tiny_bundle))]
    gates = load_gates(predictors, GateConfig())
    assert isinstance(gates[0], Gate) and gates[1] is None
    assert load_gates(predictors, GateConfig(enabled=False)) == [None, None]


def _features(rows: list[list[float]]) -> Features:
    return Features(activations=activations(rows), logits=torch.zeros(len(rows), 1))


def test_judge_refuses_by_the_first_failing_gate_and_notes_the_passing_scores() -> None:
    t = known_tensors()
    first = Gate("a@1", CHANNELS, (Score("distance", "mahalanobis", 3.0),), t)
    second = Gate("b@1", CHANNELS, (Score("classifier", "logistic", 0.5),), t)
    rows = [features_of({}), features_of({1: 9.0}), features_of({0: 3.8})]
    verdicts = judge([first, None, second], [_features(rows), _features(rows), _features(rows)])
    assert [v.passed for v in verdicts] == [True, False, False]
    assert verdicts[0].text == "input gate of a@1: distance 0.00 <= 3.00; input gate of b@1: classifier -2.00 <= 0.50"
    assert "(distance 8.00 > threshold 3.00; gate of a@1)" in verdicts[1].text
    assert "(classifier 0.80 > threshold 0.50; gate of b@1)" in verdicts[2].text
    assert [v.text for v in judge([None], [_features(rows)])] == ["", "", ""]
