"""Tests for direct_align.losses: hand-derived values, gradients, metrics, stability, errors.

Expected values are derived by hand (in comments) and computed with the math module, never with
the implementation. softplus(x) = log(1 + e^x), so -log sigma(z) = softplus(-z).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from direct_align.losses import LOSSES, LossError, LossSpec, _log1mexp, preference_loss

REWARD_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected"}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def labels_for(name: str, n: int) -> torch.Tensor | None:
    """Alternating labels for an unpaired loss (kto), None for the paired ones."""
    return torch.arange(n) % 2 == 0 if LOSSES[name].unpaired else None


def loss_of(name: str, **kw) -> float:
    return preference_loss(name, **kw)[0].item()


# A shared example: pi_c = -10, pi_r = -14, r_c = -11, r_r = -12, so the chosen log-ratio is 1,
# the rejected log-ratio is -2 and h = 3. With beta = 0.5, beta * h = 1.5.
EX = dict(chosen_logps=t(-10.0), rejected_logps=t(-14.0), ref_chosen_logps=t(-11.0),
          ref_rejected_logps=t(-12.0), beta=0.5)


# ----------------------------------------------------------------------------- registry

def test_registry_contents() -> None:
    assert set(LOSSES) == {"dpo", "ipo", "hinge", "robust", "orpo", "simpo", "kto"}
    assert {n: s.default_beta for n, s in LOSSES.items()} == {
        "dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "robust": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
    assert {n for n, s in LOSSES.items() if s.unpaired} == {"kto"}
    assert LOSSES["kto"].options == ("desirable_weight", "undesirable_weight")
    assert {n for n, s in LOSSES.items() if s.reference_free} == {"orpo", "simpo"}
    assert {n for n, s in LOSSES.items() if s.needs_lengths} == {"ipo", "orpo", "simpo"}
    assert LOSSES["simpo"].options == ("gamma", "label_smoothing")
    assert LOSSES["dpo"].options == ("label_smoothing",)
    assert LOSSES["orpo"].options == ()
    assert all(isinstance(s, LossSpec) and s.summary for s in LOSSES.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        LOSSES["dpo"].default_beta = 1.0  # type: ignore[misc]


# ----------------------------------------------------------------------------- values

def test_dpo_zero_margin_is_log2() -> None:
    # h = 0 -> -log sigma(0) = log 2, whatever beta.
    kw = dict(chosen_logps=t(-5.0, -7.0), rejected_logps=t(-6.0, -3.0),
              ref_chosen_logps=t(-5.0, -7.0), ref_rejected_logps=t(-6.0, -3.0))
    assert loss_of("dpo", **kw, beta=0.1) == pytest.approx(math.log(2.0), rel=1e-6)
    assert loss_of("dpo", **kw, beta=3.0) == pytest.approx(math.log(2.0), rel=1e-6)


def test_dpo_value_and_rewards() -> None:
    # beta * h = 1.5 -> loss = softplus(-1.5); rewards = 0.5 * 1 and 0.5 * (-2).
    loss, m = preference_loss("dpo", **EX)
    assert loss.item() == pytest.approx(softplus(-1.5), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.5)
    assert m["rewards/rejected"] == pytest.approx(-1.0)
    assert m["rewards/margins"] == pytest.approx(1.5)
    assert m["logps/chosen"] == -10.0 and m["logps/rejected"] == -14.0


def test_conservative_dpo() -> None:
    # eps = 0.2: 0.8 * softplus(-1.5) + 0.2 * softplus(1.5).
    expected = 0.8 * softplus(-1.5) + 0.2 * softplus(1.5)
    assert loss_of("dpo", **EX, label_smoothing=0.2) == pytest.approx(expected, rel=1e-6)


def test_reference_free_dpo() -> None:
    # No refs: h = pi_c - pi_r = -10 - (-14) = 4, beta * h = 2 -> softplus(-2); rewards = beta*pi.
    loss, m = preference_loss("dpo", chosen_logps=t(-10.0), rejected_logps=t(-14.0), beta=0.5)
    assert loss.item() == pytest.approx(softplus(-2.0), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(-5.0)
    assert m["rewards/rejected"] == pytest.approx(-7.0)


def test_rpo_adds_the_chosen_per_token_nll() -> None:
    # EX: DPO softplus(-1.5); chosen sum -10 over 5 tokens -> NLL 2; alpha 0.5 adds 1.0
    lengths = {"chosen_lengths": t(5.0), "rejected_lengths": t(7.0)}
    loss, m = preference_loss("dpo", **EX, **lengths, rpo_alpha=0.5)
    assert loss.item() == pytest.approx(softplus(-1.5) + 1.0, rel=1e-6)
    assert m["rpo_nll"] == pytest.approx(2.0)
    assert m["rewards/margins"] == pytest.approx(1.5)  # the implicit rewards are DPO's
    chosen = t(-10.0).requires_grad_()
    preference_loss("dpo", **{**EX, "chosen_logps": chosen}, **lengths, rpo_alpha=0.5)[0].backward()
    # d/dc [softplus(-beta (c - r - ref))] = -beta sigma(-1.5); d/dc [0.5 * -c / 5] = -0.1
    sigma = 1 / (1 + math.exp(1.5))
    assert chosen.grad.item() == pytest.approx(-0.5 * sigma - 0.1, rel=1e-5)
    with pytest.raises(ValueError, match="rpo_alpha needs pairs and chosen_lengths"):
        preference_loss("dpo", **EX, rpo_alpha=0.5)


@pytest.mark.parametrize(("beta", "expected"), [(0.1, 0.5), (0.2, 0.0), (0.4, 0.0)])
def test_hinge(beta: float, expected: float) -> None:
    # No refs, h = -3 - (-8) = 5: beta = 0.1 -> max(0, 1 - 0.5) = 0.5;
    # beta = 0.2 -> max(0, 1 - 1) = 0; beta = 0.4 -> max(0, 1 - 2) = 0.
    kw = dict(chosen_logps=t(-3.0), rejected_logps=t(-8.0))
    assert loss_of("hinge", **kw, beta=beta) == pytest.approx(expected, abs=1e-6)


def test_hinge_negative_margin() -> None:
    # EX with chosen and rejected swapped: h = -3, beta * h = -1.5 -> max(0, 1 + 1.5) = 2.5.
    kw = dict(EX, chosen_logps=t(-14.0), rejected_logps=t(-10.0), ref_chosen_logps=t(-12.0),
              ref_rejected_logps=t(-11.0))
    assert loss_of("hinge", **kw) == pytest.approx(2.5, rel=1e-6)


def test_ipo_uses_per_token_averages() -> None:
    # chosen: (pi_c - r_c) / |y_c| = (-4 - -8) / 4 = 1; rejected: (-6 - -6) / 3 = 0; h_avg = 1.
    kw = dict(chosen_logps=t(-4.0), rejected_logps=t(-6.0), ref_chosen_logps=t(-8.0),
              ref_rejected_logps=t(-6.0), chosen_lengths=torch.tensor([4]),
              rejected_lengths=torch.tensor([3]))
    # beta = 0.5: target 1 / (2 * 0.5) = 1 = h_avg -> 0.
    assert loss_of("ipo", **kw, beta=0.5) == pytest.approx(0.0, abs=1e-12)
    # beta = 0.25: target 2 -> (1 - 2)^2 = 1 (sequence sums would give (4 - 2)^2 = 4).
    loss, m = preference_loss("ipo", **kw, beta=0.25)
    assert loss.item() == pytest.approx(1.0, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.25) and m["rewards/rejected"] == 0.0


def test_robust_equals_dpo_at_zero_noise() -> None:
    batch = dict(chosen_logps=t(-3.0, -9.0, -1.0), rejected_logps=t(-4.0, -2.0, -1.0),
                 ref_chosen_logps=t(-3.5, -8.0, -2.0), ref_rejected_logps=t(-3.0, -3.0, -1.0))
    assert loss_of("robust", **batch) == pytest.approx(loss_of("dpo", **batch), rel=1e-7)


def test_robust_value() -> None:
    # eps = 0.2, beta * h = 1.5: [0.8 * softplus(-1.5) - 0.2 * softplus(1.5)] / 0.6.
    expected = (0.8 * softplus(-1.5) - 0.2 * softplus(1.5)) / 0.6
    assert loss_of("robust", **EX, label_smoothing=0.2) == pytest.approx(expected, rel=1e-6)


ORPO = dict(chosen_logps=t(-1.0), rejected_logps=t(-8.0), chosen_lengths=torch.tensor([2]),
            rejected_lengths=torch.tensor([4]), beta=0.1)


def test_orpo_value_and_extras() -> None:
    # a_c = -1 / 2 = -0.5, a_r = -8 / 4 = -2; log odds(a) = a - log(1 - e^a).
    odds_c = -0.5 - math.log(1.0 - math.exp(-0.5))
    odds_r = -2.0 - math.log(1.0 - math.exp(-2.0))
    delta = odds_c - odds_r
    # L = -a_c + 0.1 * (-log sigma(delta)) = 0.5 + 0.1 * softplus(-delta).
    loss, m = preference_loss("orpo", **ORPO)
    assert loss.item() == pytest.approx(0.5 + 0.1 * softplus(-delta), rel=1e-6)
    assert m["nll_loss"] == pytest.approx(0.5)
    assert m["log_odds_chosen"] == pytest.approx(delta, rel=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(-softplus(-delta), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(-0.05) and m["rewards/rejected"] == pytest.approx(-0.2)
    assert set(m) >= REWARD_KEYS


def test_simpo_value() -> None:
    # beta = 2, a_c = -3 / 3 = -1, a_r = -8 / 4 = -2: z = 2 * -1 - 2 * -2 - 0.5 = 1.5.
    kw = dict(chosen_logps=t(-3.0), rejected_logps=t(-8.0), chosen_lengths=torch.tensor([3.0]),
              rejected_lengths=torch.tensor([4.0]), beta=2.0)
    loss, m = preference_loss("simpo", **kw)
    assert loss.item() == pytest.approx(softplus(-1.5), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(-2.0) and m["rewards/margins"] == pytest.approx(2.0)
    # gamma = 1.0 -> z = 1; label smoothing 0.1 -> 0.9 * softplus(-1) + 0.1 * softplus(1).
    expected = 0.9 * softplus(-1.0) + 0.1 * softplus(1.0)
    assert loss_of("simpo", **kw, gamma=1.0, label_smoothing=0.1) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_losses_ignore_refs(name: str) -> None:
    with_refs = loss_of(name, **ORPO, ref_chosen_logps=t(-100.0), ref_rejected_logps=t(5.0))
    assert with_refs == loss_of(name, **ORPO)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if not s.unpaired))
def test_gradient_raises_chosen_lowers_rejected(name: str) -> None:
    # Margins are small (h = 0.5, h_avg = 0.125) so hinge and IPO are still active.
    chosen = t(-6.0, -9.0).requires_grad_()
    rejected = t(-6.5, -9.5).requires_grad_()
    ref_c, ref_r = t(-6.0, -9.0).requires_grad_(), t(-6.0, -9.0).requires_grad_()
    loss, _ = preference_loss(name, chosen_logps=chosen, rejected_logps=rejected,
                              ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                              chosen_lengths=torch.tensor([4, 4]),
                              rejected_lengths=torch.tensor([4, 4]), beta=LOSSES[name].default_beta)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert (chosen.grad < 0).all(), chosen.grad
    assert (rejected.grad > 0).all(), rejected.grad
    assert ref_c.grad is None and ref_r.grad is None  # the reference is treated as constant


# ----------------------------------------------------------------------------- metrics

def test_metrics_names_and_accuracy() -> None:
    # Chosen log-ratios 1, 0, -1, 2; rejected 0, 0, 0, 1: wins on rows 0 and 3, tie on row 1
    # (a tie is not a win), loss on row 2 -> accuracy 0.5.
    chosen, ref = t(-1.0, -2.0, -4.0, -1.0), t(-2.0, -2.0, -3.0, -3.0)
    loss, m = preference_loss("dpo", chosen_logps=chosen, rejected_logps=t(-5.0, -5.0, -5.0, -4.0),
                              ref_chosen_logps=ref, ref_rejected_logps=t(-5.0, -5.0, -5.0, -5.0),
                              beta=1.0)
    assert set(m) == REWARD_KEYS
    assert all(isinstance(v, float) for v in m.values())
    assert m["rewards/accuracies"] == 0.5
    assert m["rewards/chosen"] == pytest.approx(0.5) and m["rewards/rejected"] == pytest.approx(0.25)
    assert m["rewards/margins"] == pytest.approx(0.25)
    assert m["logps/chosen"] == pytest.approx(-2.0) and m["logps/rejected"] == pytest.approx(-4.75)
    assert loss.requires_grad is False  # no input required grad


# ----------------------------------------------------------------------------- stability

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_inputs_match_fp32(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    sums = [-(torch.rand(16, generator=gen) * 300 + 1) for _ in range(4)]
    lengths = torch.randint(5, 200, (16,), generator=gen), torch.randint(5, 200, (16,), generator=gen)

    def run(tensors: list[torch.Tensor]) -> torch.Tensor:
        c, r, rc, rr = tensors
        return preference_loss(name, chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc,
                               ref_rejected_logps=rr, chosen_lengths=lengths[0],
                               rejected_lengths=lengths[1], beta=LOSSES[name].default_beta,
                               labels=labels_for(name, 16))[0]

    low = run([s.to(torch.bfloat16) for s in sums])
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # Computed in fp32: the same as fp32 on the bf16-rounded values, and close to the originals.
    rounded = run([s.to(torch.bfloat16).float() for s in sums])
    assert low.item() == pytest.approx(rounded.item(), rel=1e-6)
    assert low.item() == pytest.approx(run(sums).item(), rel=0.05, abs=0.05)


def test_log1mexp_accuracy() -> None:
    for x in (-1e-6, -1e-3, -0.5, -math.log(2.0), -1.0, -5.0, -30.0):
        expected = math.log(-math.expm1(x))
        assert _log1mexp(torch.tensor([x])).item() == pytest.approx(expected, rel=1e-5)
    # At and above 0 it is clamped strictly below 0: finite.
    assert torch.isfinite(_log1mexp(t(0.0, 1e-3, -1e-30))).all()


@pytest.mark.parametrize("avg", [0.0, -1e-9, -1e-4, -50.0, -1e4])
def test_orpo_extreme_average_logps_are_finite(avg: float) -> None:
    chosen = torch.tensor([avg * 10, -2.0 * 10]).requires_grad_()
    rejected = torch.tensor([-3.0 * 10, avg * 10]).requires_grad_()
    lengths = torch.tensor([10, 10])
    loss, m = preference_loss("orpo", chosen_logps=chosen, rejected_logps=rejected,
                              chosen_lengths=lengths, rejected_lengths=lengths)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(math.isfinite(v) for v in m.values())
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_huge_margins_are_finite(name: str, margin: float) -> None:
    chosen = torch.tensor([-1.0, -1.0 - margin]).requires_grad_()
    rejected = torch.tensor([-1.0 - margin, -1.0]).requires_grad_()
    options = {"label_smoothing": 0.1} if "label_smoothing" in LOSSES[name].options else {}
    loss, m = preference_loss(name, chosen_logps=chosen, rejected_logps=rejected,
                              chosen_lengths=torch.tensor([1, 1]),
                              rejected_lengths=torch.tensor([1, 1]), labels=labels_for(name, 2),
                              **options)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in m.values())
    assert torch.isfinite(chosen.grad).all()
    if LOSSES[name].unpaired:  # the mismatched completions only set KTO's detached z0
        assert rejected.grad is None
    else:
        assert torch.isfinite(rejected.grad).all()


def test_dpo_huge_margin_limits() -> None:
    # beta * h = +1000 -> loss ~ 0; beta * h = -1000 -> loss ~ 1000 (softplus(1000) = 1000).
    big = loss_of("dpo", chosen_logps=t(0.0), rejected_logps=t(-1e4))
    assert big == pytest.approx(0.0, abs=1e-6)
    assert loss_of("dpo", chosen_logps=t(-1e4), rejected_logps=t(0.0)) == pytest.approx(1000.0)


# ----------------------------------------------------------------------------- errors

BASE = dict(chosen_logps=t(-1.0), rejected_logps=t(-2.0))
LENGTHS = dict(chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([3]))


def test_unknown_loss_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'cpo'.*dpo.*simpo"):
        preference_loss("cpo", **BASE)


@pytest.mark.parametrize("name", ["ipo", "orpo", "simpo"])
def test_missing_lengths(name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}' needs chosen_lengths"):
        preference_loss(name, **BASE)
    with pytest.raises(ValueError, match=f"'{name}' needs"):
        preference_loss(name, **BASE, chosen_lengths=torch.tensor([3]))


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan, math.inf])
def test_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be"):
        preference_loss("dpo", **BASE, beta=beta)


def test_unknown_kwarg_names_loss_and_kwarg() -> None:
    with pytest.raises(ValueError, match="'dpo' has no option 'gamma'"):
        preference_loss("dpo", **BASE, gamma=0.5)
    with pytest.raises(ValueError, match="'orpo' has no option 'label_smoothing'"):
        preference_loss("orpo", **BASE, **LENGTHS, label_smoothing=0.1)


def test_only_one_ref_given() -> None:
    with pytest.raises(ValueError, match="both"):
        preference_loss("dpo", **BASE, ref_chosen_logps=t(-1.0))
    with pytest.raises(ValueError, match="both"):
        preference_loss("orpo", **BASE, **LENGTHS, ref_rejected_logps=t(-1.0))


@pytest.mark.parametrize(("name", "eps"), [("dpo", 0.5), ("robust", 0.7), ("simpo", -0.1)])
def test_label_smoothing_range(name: str, eps: float) -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(name, **BASE, **LENGTHS, label_smoothing=eps)


def test_bad_shapes_and_lengths() -> None:
    with pytest.raises(ValueError, match="shape"):
        preference_loss("dpo", chosen_logps=t(-1.0, -2.0), rejected_logps=t(-1.0))
    with pytest.raises(ValueError, match="1-D"):
        preference_loss("dpo", chosen_logps=torch.zeros(2, 2), rejected_logps=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="> 0"):
        preference_loss("simpo", **BASE, chosen_lengths=torch.tensor([0]),
                        rejected_lengths=torch.tensor([2]))


def test_errors_are_config_errors() -> None:
    from direct_align.errors import ConfigError

    with pytest.raises(ConfigError):
        preference_loss("nope", **BASE)
    assert issubclass(LossError, ValueError)
