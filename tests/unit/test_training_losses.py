"""Focal loss against values computed by hand, class weights, under/over-sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import WeightedFocalLoss, class_weights, epoch_indices


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_focal_loss_by_hand() -> None:
    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    targets = torch.tensor([[1.0], [1.0], [0.0]])
    gamma, alpha = 2.0, 0.25
    # p_t: sigmoid(2); sigmoid(-1); 1 - sigmoid(0.5); alpha_t: 0.25, 0.25, 0.75
    pts = [_sig(2.0), _sig(-1.0), 1.0 - _sig(0.5)]
    alphas = [0.25, 0.25, 0.75]
    expected = sum(-a * (1 - p) ** gamma * math.log(p) for p, a in zip(pts, alphas)) / 3
    got = WeightedFocalLoss(gamma=gamma, alpha=alpha)(logits, targets)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # a hand-checked number: sigmoid(2) = 0.880797, (1 - 0.880797)^2 * -ln(0.880797) * 0.25 = 0.00045
    single = WeightedFocalLoss(gamma=2.0, alpha=0.25)(torch.tensor([[2.0]]), torch.tensor([[1.0]]))
    assert single.item() == pytest.approx(0.000450, abs=2e-6)


def test_focal_with_class_weights_and_gamma_zero_is_weighted_bce() -> None:
    logits = torch.tensor([[0.3, -2.0], [1.5, 0.1]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = torch.tensor([[0.5, 2.0], [1.0, 3.0]])  # per target: (negative, positive)
    got = WeightedFocalLoss(gamma=0.0, weights=weights)(logits, targets)
    by_hand = [
        2.0 * -math.log(_sig(0.3)),  # target 0, positive
        1.0 * -math.log(1 - _sig(-2.0)),  # target 1, negative
        0.5 * -math.log(1 - _sig(1.5)),  # target 0, negative
        3.0 * -math.log(_sig(0.1)),  # target 1, positive
    ]
    assert got.item() == pytest.approx(sum(by_hand) / 4, rel=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert WeightedFocalLoss(gamma=0.0)(logits, targets).item() == pytest.approx(bce.item(), rel=1e-6)


def test_focal_down_weights_easy_examples() -> None:
    easy, hard = torch.tensor([[4.0]]), torch.tensor([[-1.0]])
    y = torch.ones(1, 1)
    focal, bce = WeightedFocalLoss(gamma=2.0), WeightedFocalLoss(gamma=0.0)
    assert focal(easy, y) / bce(easy, y) < focal(hard, y) / bce(hard, y)


def test_class_weights_balanced_and_capped() -> None:
    labels = np.array([[1]] * 30 + [[0]] * 10)
    w = class_weights(labels, max_weight=10.0)
    assert w.shape == (1, 2)
    assert w[0, 0].item() == pytest.approx(40 / 20)  # negatives: n / (2 * 10)
    assert w[0, 1].item() == pytest.approx(40 / 60)
    capped = class_weights(np.array([[1]] * 99 + [[0]]), max_weight=5.0)
    assert capped[0, 0].item() == 5.0


@pytest.mark.parametrize("bad", [{"gamma": -1.0}, {"alpha": 1.5}])
def test_focal_rejects_bad_parameters(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WeightedFocalLoss(**bad)


def test_sampling_modes() -> None:
    labels = np.array([1] * 30 + [0] * 10)
    rng = np.random.default_rng(0)
    under = epoch_indices(labels, "undersample", rng)
    over = epoch_indices(labels, "oversample", rng)
    plain = epoch_indices(labels, "none", rng)
    assert len(under) == 20 and labels[under].sum() == 10 and len(set(under)) == 20
    assert len(over) == 60 and labels[over].sum() == 30 and set(over) == set(range(40))
    assert sorted(plain) == list(range(40))
    with pytest.raises(ValueError, match="sampling"):
        epoch_indices(labels, "smote", rng)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0, 2.0])
def test_focal_gradient_is_finite_for_sure_predictions(gamma: float) -> None:
    """A confidently right prediction has p_t = 1 in float32; (1 - p_t) ** gamma must not give NaN gradients."""
    logits = torch.tensor([[40.0], [-40.0], [0.3]], requires_grad=True)
    targets = torch.tensor([[1.0], [0.0], [1.0]])
    loss = WeightedFocalLoss(gamma=gamma, alpha=0.4)(logits, targets)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and torch.isfinite(loss)
    p = _sig(0.3)  # the two sure ones contribute (almost) nothing
    assert loss.item() == pytest.approx(-0.4 * (1 - p) ** gamma * math.log(p) / 3, rel=1e-5)
