"""Tests for KTO (Ethayarajh et al. 2024) in direct_align.losses: values by hand, weights, the
clamped reference point, gradients, and labels. Expected values are computed with the math
module, never with the implementation."""

from __future__ import annotations

import math

import pytest
import torch

from direct_align.losses import LossError, preference_loss


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Three examples, log-ratios r = pi - r_ref of 1.0, -0.5, 0.25 (labels: yes, no, yes); the
# mismatched completions' log-ratios 0.5, 0.1, 0.3 give z0 = mean = 0.3.
KTO = dict(chosen_logps=t(-9.0, -10.5, -4.75), ref_chosen_logps=t(-10.0, -10.0, -5.0),
           rejected_logps=t(-11.5, -7.9, -6.7), ref_rejected_logps=t(-12.0, -8.0, -7.0),
           labels=torch.tensor([True, False, True]), beta=2.0)


def test_kto_value_by_hand() -> None:
    """L = λ_D (1 − σ(β(r − z0))) for desirable, λ_U (1 − σ(β(z0 − r))) for undesirable."""
    z0 = 0.3
    expected = [1 - sigmoid(2.0 * (1.0 - z0)), 1 - sigmoid(2.0 * (z0 + 0.5)), 1 - sigmoid(2.0 * (0.25 - z0))]
    loss, m = preference_loss("kto", **KTO)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert m["kl"] == pytest.approx(z0, rel=1e-6)
    # right: r above z0 for desirable (1.0 yes, 0.25 no), below for undesirable (-0.5 yes)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)
    assert m["rewards/chosen"] == pytest.approx(2.0 * (1.0 - 0.5 + 0.25) / 3, rel=1e-6)
    assert m["rewards/rejected"] == pytest.approx(2.0 * z0, rel=1e-6)
    assert m["desirable"] == pytest.approx(2 / 3)


def test_kto_weights_and_the_clamped_reference_point() -> None:
    weighted = preference_loss("kto", **KTO, desirable_weight=2.0, undesirable_weight=0.5)[0].item()
    # z0 = 0.3: r - z0 = 0.7, z0 - r = 0.8, r - z0 = -0.05
    expected = [2.0 * (1 - sigmoid(2.0 * 0.7)), 0.5 * (1 - sigmoid(2.0 * 0.8)), 2.0 * (1 - sigmoid(2.0 * -0.05))]
    assert weighted == pytest.approx(sum(expected) / 3, rel=1e-6)
    # a negative mean log-ratio of the mismatched completions is clamped: z0 = 0
    low = {**KTO, "rejected_logps": KTO["ref_rejected_logps"] - 1.0}
    loss, m = preference_loss("kto", **low)
    assert m["kl"] == 0.0
    assert loss.item() == pytest.approx((1 - sigmoid(2.0) + 1 - sigmoid(1.0) + 1 - sigmoid(0.5)) / 3, rel=1e-6)
    with pytest.raises(LossError, match="desirable_weight must be a finite number > 0"):
        preference_loss("kto", **KTO, desirable_weight=0.0)


def test_kto_gradient_moves_each_example_toward_its_label_and_not_through_z0() -> None:
    chosen = KTO["chosen_logps"].clone().requires_grad_()
    mismatched = KTO["rejected_logps"].clone().requires_grad_()
    loss, _ = preference_loss("kto", **{**KTO, "chosen_logps": chosen, "rejected_logps": mismatched})
    loss.backward()
    assert (chosen.grad[[0, 2]] < 0).all() and chosen.grad[1] > 0  # desirable up, undesirable down
    assert mismatched.grad is None or (mismatched.grad == 0).all()  # z0 is not differentiated


def test_kto_needs_labels_and_pairs_take_none() -> None:
    no_labels = {k: v for k, v in KTO.items() if k != "labels"}
    with pytest.raises(ValueError, match="needs labels"):
        preference_loss("kto", **no_labels)
    with pytest.raises(ValueError, match="takes pairs, not labels"):
        preference_loss("dpo", **KTO)
