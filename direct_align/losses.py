"""Direct preference losses on per-sequence log-prob sums, and the registry that names them.

Every loss is a pure function of ``[batch]`` float32 tensors returning per-example losses, the
chosen/rejected implicit rewards and any extra per-example metrics. :func:`preference_loss` is the
one entry point: it validates its arguments, casts to float32, calls the loss and averages.
Notation: pi_c, pi_r are policy log-prob sums of the chosen/rejected responses, r_c, r_r the
reference sums (0 when no reference is given), |y| a response's token count and
h = (pi_c - r_c) - (pi_r - r_r).

Unpaired losses (KTO) take one completion per example with a label (desirable or not) instead of
a pair; the example's "rejected" slot then holds a completion of another example for the same
prompt, whose log-ratio estimates the reference point (see :func:`kto_loss`).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from direct_align.errors import ConfigError

Tensor = torch.Tensor
#: (per-example losses, chosen rewards, rejected rewards, extra per-example metrics), all [batch].
LossTerms = tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]

_LN2 = math.log(2.0)
# Largest value fed to log1mexp: 1 - exp(x) is never 0, so p = 1 gives a finite log odds.
_LOG1MEXP_MAX = -torch.finfo(torch.float32).eps
# Arguments every loss may name; anything else in a loss's signature is a loss-specific option.
_COMMON = frozenset({"chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                     "chosen_lengths", "rejected_lengths", "beta", "labels"})


class LossError(ConfigError, ValueError):
    """A bad loss name, beta or loss option (a ValueError the CLI reports as a one-line error)."""


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate at both ends; x is clamped to at most -2^-23."""
    x = x.clamp(max=_LOG1MEXP_MAX)
    near_zero = x > -_LN2
    # Feed each branch only inputs where it is well-conditioned so neither yields inf/nan grads.
    small = torch.log(-torch.expm1(torch.where(near_zero, x, -_LN2)))
    large = torch.log1p(-torch.exp(torch.where(near_zero, -_LN2, x)))
    return torch.where(near_zero, small, large)


def _check_smoothing(loss: str, eps: float) -> float:
    if not 0.0 <= eps < 0.5:
        raise LossError(f"loss {loss!r}: label_smoothing must be in [0, 0.5), got {eps}")
    return float(eps)


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) * log sigma(z) - eps * log sigma(-z)``, [batch]."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def dpo_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0) -> LossTerms:
    """DPO (Rafailov et al. 2023, eq. 7) and conservative DPO (cDPO, Mitchell 2023).

    L = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h); eps = 0 is DPO's
    -log sigma(beta * [(pi_c - r_c) - (pi_r - r_r)]). eps in [0, 0.5) is the probability that a
    preference label is flipped. With zero references this is reference-free DPO.
    Inputs and outputs are [batch]; rewards are beta * (pi - r).
    """
    eps = _check_smoothing("dpo", label_smoothing)
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    losses = _smoothed_logistic(beta * (chosen_ratio - rejected_ratio), eps)
    return losses, beta * chosen_ratio, beta * rejected_ratio, {}


def ipo_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
             beta: float) -> LossTerms:
    """IPO (Azar et al. 2023, eq. 17) with per-token averaged log-ratios.

    L = (h_avg - 1 / (2 * beta))^2, h_avg = (pi_c - r_c) / |y_c| - (pi_r - r_r) / |y_r|.
    The paper uses sequence sums; averaging per token, as TRL does, keeps the target margin
    1 / (2 * beta) on the same scale whatever the response lengths, so one beta fits all lengths.
    Inputs and outputs are [batch]; rewards are beta * (pi - r) / |y|.
    """
    chosen_ratio = (chosen_logps - ref_chosen_logps) / chosen_lengths
    rejected_ratio = (rejected_logps - ref_rejected_logps) / rejected_lengths
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio, beta * rejected_ratio, {}


def hinge_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float) -> LossTerms:
    """SLiC-HF hinge calibration loss (Zhao et al. 2023) on reference log-ratios.

    L = max(0, 1 - beta * h), i.e. beta * max(0, 1/beta - h): the margin is delta = 1/beta.
    Inputs and outputs are [batch]; rewards are beta * (pi - r).
    """
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    losses = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio, beta * rejected_ratio, {}


def robust_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0) -> LossTerms:
    """Robust DPO (rDPO, Chowdhury et al. 2024), the unbiased loss under label flips.

    L = [(1 - eps) * (-log sigma(beta * h)) - eps * (-log sigma(-beta * h))] / (1 - 2 * eps),
    eps in [0, 0.5) the flip rate; eps = 0 is DPO. Per-example values can be negative.
    Inputs and outputs are [batch]; rewards are beta * (pi - r).
    """
    eps = _check_smoothing("robust", label_smoothing)
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    z = beta * (chosen_ratio - rejected_ratio)
    losses = ((1.0 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return losses, beta * chosen_ratio, beta * rejected_ratio, {}


def orpo_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, beta: float) -> LossTerms:
    """ORPO (Hong et al. 2024): length-normalised NLL plus a log odds-ratio penalty.

    With a = pi / |y| and log odds(y) = a - log(1 - exp(a)):
    L = -a_c + lambda * (-log sigma(log odds(y_c) - log odds(y_r))), lambda = beta.
    Reference-free. Inputs and outputs are [batch]; rewards are beta * a. Extras: nll_loss
    (-a_c), log_odds_ratio (log sigma(.)) and log_odds_chosen (the log odds-ratio itself).
    """
    avg_chosen, avg_rejected = chosen_logps / chosen_lengths, rejected_logps / rejected_lengths
    log_odds = (avg_chosen - _log1mexp(avg_chosen)) - (avg_rejected - _log1mexp(avg_rejected))
    ratio = F.logsigmoid(log_odds)
    losses = -avg_chosen - beta * ratio
    extras = {"nll_loss": -avg_chosen, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
    return losses, beta * avg_chosen, beta * avg_rejected, extras


def simpo_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, beta: float, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> LossTerms:
    """SimPO (Meng et al. 2024, eq. 6), optionally label-smoothed as in cDPO.

    L = -log sigma(beta * pi_c / |y_c| - beta * pi_r / |y_r| - gamma); gamma >= 0 is the
    target reward margin. Reference-free. Inputs and outputs are [batch]; rewards are
    beta * pi / |y|.
    """
    eps = _check_smoothing("simpo", label_smoothing)
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise LossError(f"loss 'simpo': gamma must be a finite number >= 0, got {gamma}")
    chosen_rewards = beta * chosen_logps / chosen_lengths
    rejected_rewards = beta * rejected_logps / rejected_lengths
    losses = _smoothed_logistic(chosen_rewards - rejected_rewards - gamma, eps)
    return losses, chosen_rewards, rejected_rewards, {}


def kto_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, labels: Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossTerms:
    """KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024, eq. 8), on unpaired examples.

    For example i with completion y and label l (1: desirable, 0: undesirable):
    r = pi_c - r_c, the completion's log-ratio; the reference point
    z0 = max(0, mean_batch(pi_r - r_r)) estimates KL(pi || pi_ref) from the log-ratios of
    mismatched completions (the "rejected" slot: another example's completion under this
    prompt) and is not differentiated, as in the paper; the value is
    v = lambda_D * sigma(beta * (r - z0)) if l else lambda_U * sigma(beta * (z0 - r)), and the loss
    lambda_l - v, i.e. lambda_l * (1 - sigma(...)). ``desirable_weight`` and
    ``undesirable_weight`` (lambda_D, lambda_U) rebalance imbalanced data; the paper suggests
    lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
    Rewards: beta * r (chosen) and beta * z0 (rejected); an example counts as right when r is
    on its label's side of z0.
    """
    for name, weight in (("desirable_weight", desirable_weight),
                         ("undesirable_weight", undesirable_weight)):  # fmt: skip
        if not 0 < weight < math.inf:
            raise LossError(f"loss 'kto': {name} must be a finite number > 0, got {weight}")
    desirable = labels.bool()
    ratio = chosen_logps - ref_chosen_logps
    z0 = (rejected_logps - ref_rejected_logps).detach().mean().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))  # fmt: skip
    right = ((ratio > z0) == desirable).float()
    kl = z0.expand_as(ratio)
    return losses, beta * ratio, beta * kl, {"rewards/accuracies": right, "kl": kl,
                                            "desirable": desirable.float()}  # fmt: skip


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and what the trainer must provide for it.

    ``reference_free``: the loss never reads reference log-probs (no reference model is needed;
    given ones are ignored). ``needs_lengths``: response token counts are required.
    ``default_beta``: the beta configs use when none is set. ``summary``: one line for help text.
    ``unpaired``: it trains on labelled single completions (``labels`` required), not pairs.
    """

    fn: Callable[..., LossTerms]
    reference_free: bool
    needs_lengths: bool
    default_beta: float
    summary: str
    unpaired: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the loss-specific keyword options (e.g. ``label_smoothing``, ``gamma``)."""
        params = inspect.signature(self.fn).parameters
        return tuple(name for name in params if name not in _COMMON)


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, False, False, 0.1,
                    "DPO (sigmoid); label_smoothing > 0 gives conservative DPO"),
    "ipo": LossSpec(ipo_loss, False, True, 0.1,
                    "IPO, squared loss on per-token averaged log-ratios"),
    "hinge": LossSpec(hinge_loss, False, False, 0.1, "SLiC-HF hinge loss on log-ratios"),
    "robust": LossSpec(robust_loss, False, False, 0.1,
                       "robust DPO, unbiased under label flips at rate label_smoothing"),
    "orpo": LossSpec(orpo_loss, True, True, 0.1,
                     "ORPO, NLL plus beta-weighted odds-ratio term; no reference"),
    "simpo": LossSpec(simpo_loss, True, True, 2.0,
                      "SimPO, length-normalised margin loss with target margin gamma; no reference"),
    "kto": LossSpec(kto_loss, False, False, 0.1,
                    "KTO on thumbs-up/down data: unpaired completions labelled desirable or not",
                    unpaired=True),
}


def _as_batch(x: Tensor, what: str, like: Tensor | None) -> Tensor:
    """Check ``x`` is a non-empty [batch] tensor (shaped like ``like``) and cast it to float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D [batch] tensor, got shape {tuple(x.shape)}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{what} has shape {tuple(x.shape)}, expected {tuple(like.shape)}")
    return x.to(device=like.device if like is not None else x.device, dtype=torch.float32)


def preference_loss(name: str, *, chosen_logps: Tensor, rejected_logps: Tensor,
                    ref_chosen_logps: Tensor | None = None,
                    ref_rejected_logps: Tensor | None = None,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    beta: float = 0.1, labels: Tensor | None = None, rpo_alpha: float = 0.0,
                    **kwargs: float) -> tuple[Tensor, dict[str, float]]:
    """Compute the preference loss ``name`` on a batch of log-prob sums.

    All tensors are [batch]: policy (and optional reference) log-prob sums over response tokens
    and response token counts. Everything is computed in float32. Reference tensors are detached
    (the reference is fixed); if both are None the reference terms are 0 (reference-free DPO for
    the DPO family), and orpo/simpo ignore them. ``labels`` [batch] (bool): for unpaired losses
    (kto), whether each example's completion is desirable; its "rejected" sums are those of a
    mismatched completion. ``rpo_alpha`` > 0 adds that weight times the chosen response's
    per-token NLL, -chosen_logps / chosen_lengths, to each pair's loss (RPO: Pang et al. 2024,
    *Iterative Reasoning Preference Optimization*, eq. 1), which keeps the chosen responses
    likely while the margin grows; it needs ``chosen_lengths``. Returns the scalar float32
    batch-mean loss and
    python-float metrics: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}
    (means of the given sums) and any loss-specific extras.
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise LossError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < math.inf:
        raise LossError(f"loss {name!r}: beta must be a finite number > 0, got {beta!r}")
    for key in kwargs:
        if key not in spec.options:
            known = ", ".join(spec.options) or "none"
            raise LossError(f"loss {name!r} has no option {key!r} (its options: {known})")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    if spec.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss {name!r} needs chosen_lengths and rejected_lengths")
    if rpo_alpha and (spec.unpaired or chosen_lengths is None):
        raise ValueError(f"loss {name!r}: rpo_alpha needs pairs and chosen_lengths")
    if spec.unpaired != (labels is not None):
        raise ValueError(f"loss {name!r} " + ("needs labels (unpaired examples)" if spec.unpaired
                                             else "takes pairs, not labels"))  # fmt: skip

    chosen = _as_batch(chosen_logps, "chosen_logps", None)
    args: dict[str, Tensor | float] = {
        "chosen_logps": chosen,
        "rejected_logps": _as_batch(rejected_logps, "rejected_logps", chosen),
        "beta": float(beta),
    }
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        args["ref_chosen_logps"] = _as_batch(ref_chosen_logps, "ref_chosen_logps", chosen).detach()
        args["ref_rejected_logps"] = _as_batch(ref_rejected_logps, "ref_rejected_logps",
                                               chosen).detach()
    else:
        args["ref_chosen_logps"] = args["ref_rejected_logps"] = torch.zeros_like(chosen)
    if spec.needs_lengths:
        for key, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            lengths = _as_batch(value, key, chosen)
            if bool((lengths <= 0).any()):
                raise ValueError(f"loss {name!r}: every entry of {key} must be > 0")
            args[key] = lengths

    if labels is not None:
        args["labels"] = _as_batch(labels, "labels", chosen).bool()
    params = inspect.signature(spec.fn).parameters
    losses, chosen_rewards, rejected_rewards, extras = spec.fn(
        **{k: v for k, v in args.items() if k in params}, **kwargs)
    if rpo_alpha:
        nll = -chosen / _as_batch(chosen_lengths, "chosen_lengths", chosen)
        losses = losses + rpo_alpha * nll
        extras = {**extras, "rpo_nll": nll.detach()}
    loss = losses.mean()

    with torch.no_grad():
        stats = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen.mean(),
            "logps/rejected": args["rejected_logps"].mean(),
            **{key: value.mean() for key, value in extras.items()},
        }
        values = torch.stack([v.detach().float() for v in stats.values()]).tolist()  # one sync
    return loss, dict(zip(stats, values))
