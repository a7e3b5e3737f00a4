"""The arithmetic of RLHF-PPO on per-token tensors: KL estimates, rewards, GAE, clipped losses.

Every function here is pure and works on ``[B, R]`` tensors of response positions (``B``
responses, ``R`` the longest response) with a ``mask`` ``[B, R]`` that is 1 on real tokens (up to
and including EOS) and 0 on the padding after them. References:

- Schulman et al. 2017, *Proximal Policy Optimization Algorithms* (clipped objective).
- Schulman et al. 2016, *High-Dimensional Continuous Control Using GAE* (advantages).
- Ziegler et al. 2019, *Fine-Tuning Language Models from Human Preferences* (per-token KL
  penalty, reward at the end, adaptive KL coefficient).
- Huang et al. 2024, *The N+ Implementation Details of RLHF with PPO* (value clipping, whitening,
  missing-EOS penalty).
- Schulman 2020, *Approximating KL Divergence* (the k1/k2/k3 estimators).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (a scalar)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Count, sum and sum of squares of ``x`` over the positions where ``mask`` is 1 (in float64):
    statistics that add up, so those of several processes' tensors are their sums."""
    x, mask = x.double(), mask.double()
    return {"count": mask.sum().item(), "sum": (x * mask).sum().item(),
            "sumsq": (x * x * mask).sum().item()}  # fmt: skip


def mean_var(moments: dict[str, float], *, unbiased: bool = False) -> tuple[float, float]:
    """Mean and variance from :func:`masked_moments` (summed over processes or not):
    Σx/n and (Σx² − n·mean²)/(n − 1 if ``unbiased`` else n)."""
    n = moments["count"]
    mean = moments["sum"] / max(n, 1.0)
    var = max(moments["sumsq"] - n * mean * mean, 0.0) / max(n - unbiased, 1.0)
    return mean, var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  moments: dict[str, float] | None = None) -> torch.Tensor:  # fmt: skip
    """``x`` scaled to unit variance (and zero mean unless not ``shift_mean``) over the masked
    positions; masked-out positions come back as 0. ``moments``: the statistics to whiten with
    (default: ``masked_moments(x, mask)``; with several processes, those of all of them)."""
    mean, var = mean_var(masked_moments(x, mask) if moments is None else moments)
    out = (x - mean) * (var + 1e-8) ** -0.5
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from log-probs of tokens sampled from π, ``[B, R]``.

    With r = π_ref/π at the sampled token: ``k1`` = −log r (unbiased, can be negative);
    ``k2`` = (log r)²/2 (biased, low variance); ``k3`` = (r − 1) − log r (unbiased and ≥ 0).
    """
    log_ratio = ref_logp - logp  # log r
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose from {KL_ESTIMATORS}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:  # fmt: skip
    """Per-token rewards ``[B, R]``: −kl_coef·KL at every token, plus the sequence's score
    ``scores`` ``[B]`` at its last real token (Ziegler et al. 2019)."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # [B]
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Generalised advantage estimates and returns, both ``[B, R]``.

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, where V and A past the last real
    token are 0 (the episode ends with the response). Returns are A + V, the value targets.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


@dataclass
class LossStats:
    """Diagnostics of one minibatch's losses (floats, for logging)."""

    clipfrac: float  # share of tokens whose ratio was clipped
    approx_kl: float  # k3 estimate of KL(π_old‖π_new): how far the epoch moved the policy
    value_clipfrac: float


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, float, float]:  # fmt: skip
    """The clipped surrogate loss (a scalar to minimise), its clip fraction and approximate KL.

    Per token, with ρ = π/π_old: max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), averaged over real tokens.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask).item()
        approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, mask).item()
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, float]:  # fmt: skip
    """The clipped value loss ½·max((V − G)², (V_clip − G)²) over real tokens, and the share of
    tokens where the clipped term was the larger, with V_clip = V_old + clip(V − V_old, ±ε)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask).item()
    return loss, clipfrac


class KLController:
    """The KL coefficient β: fixed, or adaptive toward a target KL per response (Ziegler et al.
    2019, §2.2): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon) after each rollout of n
    responses, so β grows while the policy drifts faster than the target and shrinks otherwise."""

    def __init__(self, init: float, *, target: float | None = None, horizon: int = 10_000) -> None:
        self.value = init
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
