"""The statistics of a policy's samples against its reference's, prompt by prompt.

Every function takes per-prompt numbers in the same prompt order: ``policy[i]`` and
``reference[i]`` answer prompt ``i``.

- **Win rate**: the share of prompts where the policy's sample gets the higher reward, a tie
  counting one half, with a 95% normal interval on that mean (prompts are independent draws).
- **Length control**: direct losses are known to lengthen responses (Park et al. 2024,
  "Disentangling Length from Quality in Direct Preference Optimization"), and a judge that likes
  longer answers then rewards length. Two readings remove it:

  * the *length-controlled win rate* of AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled
    AlpacaEval"): a logistic regression of each prompt's outcome on
    ``tanh(Δlen / sd(Δlen))`` — Δlen the policy's response tokens minus the reference's — read at
    Δlen = 0, i.e. σ(intercept): the win rate of a policy that answered at the reference's length;
  * the *length-controlled reward gain*: the policy's mean reward gain minus the part a
    least-squares line of reward on response tokens (fitted on both models' samples) attributes
    to the change in length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class WinRate:
    """The policy's win rate over the reference on ``prompts`` prompts, with a 95% interval."""

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int

    @property
    def prompts(self) -> int:
        return self.wins + self.ties + self.losses


def outcomes(policy: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per prompt: 1 when the policy's reward is higher, 0.5 on a tie, 0 when lower."""
    if len(policy) != len(reference):
        raise ValueError(f"{len(policy)} policy rewards against {len(reference)} reference rewards")
    return [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference)]


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> WinRate:
    """The mean of :func:`outcomes` and its 95% interval mean ± 1.96·s/√n (s: the outcomes'
    sample standard deviation), clipped to [0, 1]; with one prompt the interval is [0, 1]."""
    w = outcomes(policy, reference)
    n = len(w)
    if n == 0:
        raise ValueError("no prompts to compare")
    rate = sum(w) / n
    if n == 1:
        low, high = 0.0, 1.0
    else:
        half = Z95 * math.sqrt(sum((x - rate) ** 2 for x in w) / (n - 1) / n)
        low, high = max(0.0, rate - half), min(1.0, rate + half)
    return WinRate(rate, low, high, wins=w.count(1.0), ties=w.count(0.5), losses=w.count(0.0))


def length_feature(length_diff: Sequence[float]) -> torch.Tensor:
    """``tanh(Δlen / sd(Δlen))`` ``[N]`` (float64), AlpacaEval 2's length term; zeros when the
    differences do not vary."""
    d = torch.tensor(length_diff, dtype=torch.float64)
    sd = d.std(correction=0) if len(d) > 1 else torch.tensor(0.0, dtype=torch.float64)
    return torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)


def logistic_fit(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3,
                 steps: int = 50) -> tuple[float, float]:  # fmt: skip
    """(a, b) maximising Σ y log σ(a + b x) + (1 − y) log(1 − σ(a + b x)) − l2·n·(a² + b²)/2,
    by Newton's method; ``x``, ``y`` ``[N]``, ``y`` in [0, 1] (a tie is one half). The small
    ridge keeps (a, b) finite when one side wins every prompt."""
    features = torch.stack([torch.ones_like(x), x], dim=1)  # [N, 2]
    theta = torch.zeros(2, dtype=torch.float64)
    ridge = l2 * len(x) * torch.eye(2, dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(features @ theta)
        grad = features.T @ (y - p) - ridge @ theta
        hessian = features.T @ (features * (p * (1 - p)).unsqueeze(1)) + ridge
        step = torch.linalg.solve(hessian, grad)
        theta = theta + step
        if step.abs().max() < 1e-10:
            break
    return theta[0].item(), theta[1].item()


def length_controlled_win_rate(policy: Sequence[float], reference: Sequence[float],
                               policy_len: Sequence[float], reference_len: Sequence[float],
                               ) -> tuple[float, float]:  # fmt: skip
    """(the win rate at matched length σ(a), the length coefficient b) of the logistic
    regression of :func:`outcomes` on :func:`length_feature` of the length differences. b > 0:
    the longer answer tends to win."""
    y = torch.tensor(outcomes(policy, reference), dtype=torch.float64)
    x = length_feature([p - r for p, r in zip(policy_len, reference_len)])
    a, b = logistic_fit(x, y)
    return 1.0 / (1.0 + math.exp(-a)), b


def reward_per_token(rewards: Sequence[float], lengths: Sequence[float]) -> float:
    """The least-squares slope of reward on response tokens (0 when the lengths do not vary)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    n = torch.tensor(lengths, dtype=torch.float64)
    spread = ((n - n.mean()) ** 2).sum()
    return (((n - n.mean()) * (r - r.mean())).sum() / spread).item() if spread > 0 else 0.0


def length_controlled_gain(policy: Sequence[float], reference: Sequence[float],
                           policy_len: Sequence[float], reference_len: Sequence[float],
                           ) -> tuple[float, float]:  # fmt: skip
    """(the reward gain with the length change's share removed, the slope used): mean(policy) −
    mean(reference) − slope · (mean(policy_len) − mean(reference_len)), the slope from
    :func:`reward_per_token` over both models' samples together."""
    slope = reward_per_token([*policy, *reference], [*policy_len, *reference_len])
    gain = sum(policy) / len(policy) - sum(reference) / len(reference)
    longer = sum(policy_len) / len(policy_len) - sum(reference_len) / len(reference_len)
    return gain - slope * longer, slope
