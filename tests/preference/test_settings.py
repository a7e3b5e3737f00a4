"""Settings of `train`: the loss options each loss accepts."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from direct_align.losses import LOSSES, preference_loss
from direct_align.preference.settings import TrainConfig, balance_kto, loss_kwargs

# ----------------------------------------------------------------------------- loss_kwargs


@pytest.mark.parametrize(
    ("loss", "expected"),
    [("dpo", {"label_smoothing": 0.1}), ("robust", {"label_smoothing": 0.1}),
     ("simpo", {"gamma": 0.3, "label_smoothing": 0.1}), ("orpo", {}), ("ipo", {}),
     ("hinge", {})],
)  # fmt: skip
def test_loss_kwargs(loss: str, expected: dict[str, float]) -> None:
    cfg = TrainConfig(loss=loss, label_smoothing=0.1, gamma=0.3)
    assert loss_kwargs(cfg) == expected
    # Whatever it returns, preference_loss accepts.
    one = torch.tensor([-3.0, -4.0])
    value, _ = preference_loss(loss, chosen_logps=one, rejected_logps=one - 1,
                               chosen_lengths=torch.tensor([2.0, 3.0]),
                               rejected_lengths=torch.tensor([2.0, 2.0]), beta=0.2,
                               **loss_kwargs(cfg))  # fmt: skip
    assert math.isfinite(value.item())


def test_loss_kwargs_covers_every_registered_loss() -> None:
    for name, spec in LOSSES.items():  # (KTO's undesirable weight is unset until balanced)
        assert set(loss_kwargs(TrainConfig(loss=name, undesirable_weight=1.0))) == set(spec.options)


def test_kto_weights_balance_the_two_kinds_unless_given(caplog) -> None:
    labels = [True] * 30 + [False] * 90
    balanced = balance_kto(TrainConfig(loss="kto", desirable_weight=2.0), labels)
    assert balanced.undesirable_weight == pytest.approx(2.0 * 30 / 90)
    assert loss_kwargs(balanced) == {"desirable_weight": 2.0, "undesirable_weight": balanced.undesirable_weight}
    with caplog.at_level(logging.WARNING, logger="direct_align"):
        given = balance_kto(TrainConfig(loss="kto", undesirable_weight=1.0), labels)
    assert given.undesirable_weight == 1.0  # given weights are kept, with a warning
    assert "λ_D·n_D / λ_U·n_U = 0.333 is outside [1, 4/3]" in caplog.text
