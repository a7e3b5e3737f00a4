"""PPO's arithmetic by hand: GAE, the clipped losses, the KL estimators, rewards, β control."""

from __future__ import annotations

import pytest
import torch

from direct_align.ppo.core import (
    KLController,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=1e-6)


def test_gae_by_hand_with_padding() -> None:
    """Row 0, γ = 1, λ = 0.5, r = [0, 0, 1], V = [0.5, 0.6, 0.7]:
    δ₂ = 1 − 0.7 = 0.3, A₂ = 0.3; δ₁ = 0.7 − 0.6 = 0.1, A₁ = 0.1 + 0.5·0.3 = 0.25;
    δ₀ = 0.6 − 0.5 = 0.1, A₀ = 0.1 + 0.5·0.25 = 0.225; returns A + V = [0.725, 0.85, 1.0].
    Row 1 ends after 2 tokens (the value 5 at the pad must be ignored), same γ and λ:
    δ₁ = 2 − 1 = 1, A₁ = 1; δ₀ = 1 − 1 = 0, A₀ = 0 + 0.5·1 = 0.5; returns [1.5, 2, 0]."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[0.225, 0.25, 0.3], [0.5, 1.0, 0.0]])
    close(returns, [[0.725, 0.85, 1.0], [1.5, 2.0, 0.0]])


def test_gae_discount_by_hand() -> None:
    """γ = 0.9, λ = 0.95, r = [0, 2], V = [1, 1]: δ₁ = 2 − 1 = 1, A₁ = 1;
    δ₀ = 0.9·1 − 1 = −0.1, A₀ = −0.1 + 0.9·0.95·1 = 0.755. λ = 1 gives the discounted return
    minus V: A₀ = 0.9·2 − 1 = 0.8."""
    rewards, values, mask = torch.tensor([[0.0, 2.0]]), torch.ones(1, 2), torch.ones(1, 2)
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    close(advantages, [[0.755, 1.0]])
    monte_carlo, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert monte_carlo[0, 0].item() == pytest.approx(0.8)
    assert returns[0].tolist() == pytest.approx([1.8, 2.0])


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    kl = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([10.0, 20.0]), kl, mask, kl_coef=0.1)
    close(rewards, [[-0.1, -0.2, 10 - 0.3], [-0.05, 20 - 0.05, 0.0]])


def test_policy_loss_clips_the_ratio_in_the_direction_of_the_advantage() -> None:
    """ε = 0.2. Token 0: A = 1, ρ = 1.5 > 1.2: clipped, loss −1.2, no gradient.
    Token 1: A = −1, ρ = 0.5 < 0.8: clipped, loss 0.8, no gradient.
    Token 2: A = 1, ρ = 0.5: the unclipped term is larger, loss −0.5, gradient −ρ·A/3 on its
    log-prob (the mean is over 3 tokens). Token 3: A = 1, ρ = 1.1, inside: loss −1.1."""
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.1]])
    logp = ratios.log().requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # token 3 is padding
    loss, clipfrac, approx_kl = policy_loss(logp, old, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5) / 3)
    loss.backward()
    close(logp.grad, [[0.0, 0.0, -0.5 / 3, 0.0]])
    assert clipfrac == pytest.approx(2 / 3)
    expected_kl = sum(r - 1 - torch.tensor(r).log().item() for r in (1 / 1.5, 2.0, 2.0)) / 3
    assert approx_kl == pytest.approx(expected_kl)


def test_value_loss_clips_around_the_old_values() -> None:
    """ε = 0.2, V_old = 0, G = 1. Token 0: V = 1 (moved too far): V_clip = 0.2, the clipped
    term (0.8)² beats (0)², loss ½·0.64, no gradient. Token 1: V = 0.1 (inside): ½·0.81,
    gradient (V − G)/2 = −0.45 (mean over 2 tokens)."""
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    loss, clipfrac = value_loss(values, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    loss.backward()
    close(values.grad, [[0.0, -0.45]])
    assert clipfrac == 0.5


def test_kl_estimators_are_unbiased_k3_nonnegative_and_zero_at_equality() -> None:
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = (p * (p / q).log()).sum().item()
    torch.manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[tokens], q.log()[tokens]
    k1, k3 = kl_estimate(logp, logq, "k1"), kl_estimate(logp, logq, "k3")
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k1 is negative where q > p
    assert kl_estimate(logp, logq, "k2").mean().item() == pytest.approx(
        (0.5 * (p.log() - q.log()) ** 2 * p).sum().item(), abs=0.01)  # fmt: skip
    for kind in ("k1", "k2", "k3"):
        assert kl_estimate(logp, logp, kind).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, logq, "k4")


def test_whitening_over_the_mask_only() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = masked_whiten(x, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(white**2, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert white[0, 3].item() == 0.0
    assert masked_whiten(x, mask, shift_mean=False)[0, :3].mean().item() == pytest.approx(2.0)


def test_adaptive_kl_coefficient_moves_toward_the_target_and_fixed_stays() -> None:
    adaptive = KLController(0.1, target=1.0, horizon=100)
    adaptive.update(kl=3.0, n=10)  # error clipped to +0.2: β·(1 + 0.2·10/100)
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(kl=0.5, n=10)  # error −0.5 clipped to −0.2
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = KLController(0.1)
    fixed.update(kl=3.0, n=10)
    assert fixed.value == 0.1
