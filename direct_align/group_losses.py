"""Group losses: each prompt's ``k`` judged samples at once, with their reward values.

The pair losses of :mod:`direct_align.losses` see one preferred and one dispreferred response;
these see every sample of a prompt and the judge's reward of each, so a sample that is a little
better than its siblings moves the policy a little, and one that is far better moves it far.
They are what online training (``train --online``) uses when ``--loss`` names one of them.

Every input is a ``[P, k]`` float32 tensor (P prompts, k samples each), row by row one prompt:

- ``logps``: the policy's log-prob sums of the samples (the only input that carries gradients);
- ``sampling_logps``: the same under the policy that sampled them (the round's start, π_t);
- ``ref_logps``: under the reference π_ref (zeros where a loss reads none);
- ``rewards``: the judge's reward of each sample.

Every loss returns ``(losses [P], metrics {name: [P]})``; :func:`group_loss` validates, casts,
calls and averages over prompts. Notation: ``a = logps - sampling_logps`` (log-ratio to the
sampling policy, 0 at the round's first step) and ``h = logps - ref_logps`` (to the reference).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from direct_align.losses import LossError

Tensor = torch.Tensor
#: (per-prompt losses [P], per-prompt metrics {name: [P]})
GroupTerms = tuple[Tensor, dict[str, Tensor]]
_COMMON = frozenset({"logps", "sampling_logps", "ref_logps", "rewards", "beta"})


def _pair_mask(k: int, device: torch.device) -> Tensor:
    """[k, k] True above the diagonal: each unordered pair (i < j) once."""
    return torch.ones(k, k, dtype=torch.bool, device=device).triu(1)


def _kl_penalised(rewards: Tensor, sampling_logps: Tensor, ref_logps: Tensor,
                  beta: float) -> Tensor:  # fmt: skip
    """``r - β (log π_t - log π_ref)``, [P, k]: the RLHF reward with a sequence-level KL penalty,
    evaluated at the sampling policy (a constant of the step, as in PPO's reward)."""
    return rewards - beta * (sampling_logps - ref_logps)


def rebel_loss(*, logps: Tensor, sampling_logps: Tensor, ref_logps: Tensor, rewards: Tensor,
               beta: float, eta: float = 1.0) -> GroupTerms:  # fmt: skip
    """REBEL (Gao et al. 2024, *REBEL: Reinforcement Learning via Regressing Relative Rewards*,
    Algorithm 1), over every pair of a prompt's k samples.

    The paper regresses, for two samples y, y' of the sampling policy π_t, the difference of
    their log-ratios to π_t onto the difference of their rewards:
    ``(1/η · [a(y) - a(y')] - [r(y) - r(y')])^2``; η is the step size of the mirror-descent
    update it approximates, π_{t+1} ∝ π_t exp(η r). For RLHF, as the paper's summarisation
    experiments do, the reward is the judge's minus a sequence-level KL penalty to the reference,
    ``r' = r - β (log π_t - log π_ref)``, β the KL coefficient of the RLHF objective (DPO's β).
    With k > 2 samples every pair i < j is one regression:
    L = mean_{i<j} ((a_i - a_j) / η - (r'_i - r'_j))^2, [P].
    Metrics: ``kl_penalty`` (the mean penalty subtracted), ``residual`` (mean |error|).
    """
    adjusted = _kl_penalised(rewards, sampling_logps, ref_logps, beta)
    a = logps - sampling_logps
    error = (a[:, :, None] - a[:, None, :]) / eta - (adjusted[:, :, None] - adjusted[:, None, :])
    mask = _pair_mask(logps.shape[1], logps.device)
    penalty = (beta * (sampling_logps - ref_logps)).mean(1)
    return (error**2)[:, mask].mean(1), {"kl_penalty": penalty,
                                         "residual": error[:, mask].abs().mean(1)}  # fmt: skip


def lipo_loss(*, logps: Tensor, ref_logps: Tensor, rewards: Tensor, beta: float) -> GroupTerms:
    """LiPO-λ (Liu et al. 2024, *LiPO: Listwise Preference Optimization through
    Learning-to-Rank*, the LiPO-λ objective): a lambda-weighted pairwise logistic loss over a prompt's list.

    The scores are DPO's implicit rewards s = β·h. The labels ψ are the judge's rewards scaled to
    [0, 1] within the prompt (min to max; the judge's scale is arbitrary). Each pair with
    ψ_i > ψ_j adds Δ_ij · (-log σ(s_i - s_j)), weighted by the change in DCG from swapping them:
    Δ_ij = |G_i - G_j| · |1/D(τ_i) - 1/D(τ_j)|, gains G = 2^ψ - 1, discounts D(τ) = log(1 + τ),
    τ the rank (1 = first) of a sample by the current scores s (a constant: no gradient). A
    prompt whose rewards all tie gives 0. Per prompt, the weighted sum over its pairs, [P].
    Metrics: ``ranked_pairs`` (pairs with ψ_i > ψ_j), ``accuracy`` (of those, the share with
    s_i > s_j).
    """
    s = beta * (logps - ref_logps)
    low, high = rewards.min(1, keepdim=True).values, rewards.max(1, keepdim=True).values
    psi = (rewards - low) / (high - low).clamp(min=torch.finfo(rewards.dtype).tiny)
    gain = torch.exp2(psi) - 1
    with torch.no_grad():  # τ: 1 + the number of samples scored above (ties by position)
        order = s.detach().argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(
            1, s.shape[1] + 1, device=s.device).expand_as(order))  # fmt: skip
        inverse_discount = 1.0 / torch.log1p(rank.to(s.dtype))
    weight = ((gain[:, :, None] - gain[:, None, :]).abs()
              * (inverse_discount[:, :, None] - inverse_discount[:, None, :]).abs())  # fmt: skip
    ranked = psi[:, :, None] > psi[:, None, :]  # [P, k, k]: i preferred to j
    pairwise = -F.logsigmoid(s[:, :, None] - s[:, None, :])
    losses = torch.where(ranked, weight * pairwise, torch.zeros_like(pairwise)).sum((1, 2))
    count = ranked.sum((1, 2)).to(s.dtype)
    right = (ranked & (s[:, :, None] > s[:, None, :])).sum((1, 2)).to(s.dtype)
    return losses, {"ranked_pairs": count, "accuracy": right / count.clamp(min=1)}


def sppo_loss(*, logps: Tensor, sampling_logps: Tensor, rewards: Tensor,
              eta: float = 1.0) -> GroupTerms:  # fmt: skip
    """SPPO (Wu et al. 2024, *Self-Play Preference Optimization for Language Model Alignment*,
    the SPPO objective): a square loss per sample, no pairs, no reference and no β.

    The win rate of sample i against the sampling policy is estimated from the group with a
    Bradley-Terry reading of the judge's rewards, P̂_i = mean_j σ(r_i - r_j) over the k samples
    (the paper uses PairRM's probabilities the same way). Each sample regresses its log-ratio to
    π_t onto η (P̂_i - 1/2): L = mean_i (a_i - η (P̂_i - 1/2))^2, [P]; η is the step size.
    Metric: ``win_rate_spread`` (max - min P̂_i).
    """
    win = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :]).mean(2)
    a = logps - sampling_logps
    losses = ((a - eta * (win - 0.5)) ** 2).mean(1)
    return losses, {"win_rate_spread": win.max(1).values - win.min(1).values}


def rloo_loss(*, logps: Tensor, sampling_logps: Tensor, ref_logps: Tensor, rewards: Tensor,
              beta: float, clip: float = 0.2) -> GroupTerms:  # fmt: skip
    """RLOO (Ahmadian et al. 2024, *Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs*): REINFORCE with a leave-one-out baseline.

    The reward is the judge's minus a sequence-level KL penalty, R = r - β (log π_t - log π_ref),
    β the KL coefficient of the RLHF objective (DPO's β; PPO's ``--kl-coef`` per token). Each sample's advantage is its
    reward less the mean of the other k - 1: A_i = R_i - mean_{j≠i} R_j = k/(k-1) (R_i - mean R).
    The policy-gradient term is the REINFORCE one at the first step on a round's samples
    (ρ = 1); later steps on the same samples (``--epochs``) use the sequence-level ratio
    ρ = exp(a) clipped as PPO clips it (TRL's RLOOTrainer does the same):
    L = mean_i -min(ρ_i A_i, clip(ρ_i, 1 - ε, 1 + ε) A_i), [P].
    Metrics: ``advantage_abs`` (mean |A|), ``clipped`` (share of samples whose ratio is clipped
    in the direction that matters), ``kl_penalty`` (mean β (log π_t - log π_ref)).
    """
    k = logps.shape[1]
    penalty = beta * (sampling_logps - ref_logps)
    total = rewards - penalty
    advantage = k / (k - 1) * (total - total.mean(1, keepdim=True))
    ratio = torch.exp(logps - sampling_logps)
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage
    losses = -torch.minimum(unclipped, clipped).mean(1)
    return losses, {"advantage_abs": advantage.abs().mean(1),
                    "clipped": (clipped < unclipped).to(logps.dtype).mean(1),
                    "kl_penalty": penalty.mean(1)}  # fmt: skip


@dataclass(frozen=True)
class GroupLossSpec:
    """A registered group loss and what the trainer must provide for it.

    ``needs_sampling``: it reads the sampling policy's log-probs (one more forward of the policy
    per round, before its first step). ``needs_reference``: it reads reference log-probs.
    ``rl``: a reinforcement-learning baseline (a policy-gradient method), not a direct loss.
    ``uses_beta``: whether ``--beta`` means anything to it (SPPO has none). The attributes shared with
    :class:`~direct_align.losses.LossSpec` (``reference_free``, ``unpaired``, ``default_beta``,
    ``summary``, ``options``) let settings treat both registries alike.
    """

    fn: Callable[..., GroupTerms]
    needs_sampling: bool
    needs_reference: bool
    default_beta: float
    summary: str
    rl: bool = False
    uses_beta: bool = True
    unpaired: bool = False
    group: bool = True

    @property
    def reference_free(self) -> bool:
        return not self.needs_reference

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the loss-specific keyword options (e.g. ``eta``)."""
        return tuple(n for n in inspect.signature(self.fn).parameters if n not in _COMMON)


GROUP_LOSSES: dict[str, GroupLossSpec] = {
    "rebel": GroupLossSpec(rebel_loss, True, True, 0.05,
                           "REBEL: regress log-ratio differences on reward differences (online)"),
    "lipo": GroupLossSpec(lipo_loss, False, True, 0.1,
                          "LiPO-λ: lambda-weighted listwise ranking of a prompt's samples (online)"),
    "sppo": GroupLossSpec(sppo_loss, True, False, 0.1,
                          "SPPO: regress each sample's log-ratio on its estimated win rate (online)",
                          uses_beta=False),
    "rloo": GroupLossSpec(rloo_loss, True, True, 0.05,
                          "RLOO: REINFORCE with a leave-one-out baseline; an RL baseline (online)",
                          rl=True),
}


def _as_group(x: Tensor, what: str, like: Tensor | None) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] < 2:
        raise ValueError(f"{what} must be a [prompts, k] tensor with k >= 2, got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{what} has shape {tuple(x.shape)}, expected {tuple(like.shape)}")
    return x.to(device=like.device if like is not None else x.device, dtype=torch.float32)


def group_loss(name: str, *, logps: Tensor, rewards: Tensor, sampling_logps: Tensor | None = None,
               ref_logps: Tensor | None = None, beta: float = 1.0,
               **kwargs: float) -> tuple[Tensor, dict[str, float]]:  # fmt: skip
    """Compute the group loss ``name`` on ``[P, k]`` tensors (see the module docstring).

    Only ``logps`` carries gradients; the others are detached. ``ref_logps`` None reads as 0
    (for losses that use none). Returns the scalar float32 mean over prompts and python-float
    metrics: ``group/reward_mean``, ``group/reward_std`` (within a prompt), ``group/logratio``
    (mean log-ratio to the sampling policy), ``group/kl`` (mean log-ratio to the reference, when
    given), ``logps/mean`` and the loss's own metrics.
    """
    spec = GROUP_LOSSES.get(name)
    if spec is None:
        raise LossError(f"unknown group loss {name!r}; known: {', '.join(sorted(GROUP_LOSSES))}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < math.inf:
        raise LossError(f"loss {name!r}: beta must be a finite number > 0, got {beta!r}")
    for key, value in kwargs.items():
        if key not in spec.options:
            raise LossError(f"loss {name!r} has no option {key!r} (its options: "
                            f"{', '.join(spec.options) or 'none'})")  # fmt: skip
        if not (math.isfinite(value) and value > 0):
            raise LossError(f"loss {name!r}: {key} must be a finite number > 0, got {value}")
    if spec.needs_sampling and sampling_logps is None:
        raise ValueError(f"loss {name!r} needs sampling_logps (the sampling policy's log-probs)")
    policy = _as_group(logps, "logps", None)
    args: dict[str, Tensor | float] = {
        "logps": policy, "rewards": _as_group(rewards, "rewards", policy).detach(),
        "beta": float(beta),
        "sampling_logps": (policy.detach() if sampling_logps is None
                           else _as_group(sampling_logps, "sampling_logps", policy).detach()),
        "ref_logps": (torch.zeros_like(policy) if ref_logps is None
                      else _as_group(ref_logps, "ref_logps", policy).detach()),
    }  # fmt: skip
    params = inspect.signature(spec.fn).parameters
    losses, extras = spec.fn(**{k: v for k, v in args.items() if k in params}, **kwargs)
    with torch.no_grad():
        stats = {
            "group/reward_mean": args["rewards"].mean(),
            "group/reward_std": args["rewards"].std(1).mean(),
            "group/logratio": (policy - args["sampling_logps"]).mean(),
            "logps/mean": policy.mean(),
            **({"group/kl": (policy - args["ref_logps"]).mean()} if ref_logps is not None else {}),
            **{f"group/{key}": value.mean() for key, value in extras.items()},
        }
        values = torch.stack([v.detach().float() for v in stats.values()]).tolist()
    return losses.mean(), dict(zip(stats, values))
