"""The Bradley-Terry reward-model loss: a pure function of the two rewards of each pair.

Under the Bradley-Terry model the probability that a labeller prefers y_c to y_r for prompt x is
σ(r(x, y_c) − r(x, y_r)); the reward model is fitted by maximum likelihood on the labelled pairs:

    L_BT = −E[ log σ(r_c − r_r) ]                                                     (1)

(Stiennon et al. 2020, "Learning to summarize from human feedback", §3.4; Ouyang et al. 2022,
"Training language models to follow instructions with human feedback", §3.5, there averaged over
the K-choose-2 pairs of each prompt.) Only reward differences enter (1), so the rewards may drift
by any constant; the auxiliary centering term of Eisenstein et al. 2023 ("Helping or herding?
Reward model ensembles mitigate but do not eliminate reward hacking") keeps their mean near 0:

    L = L_BT + c · E[ (r_c + r_r)² ]                                                  (2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *, center_coef: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss (2) over the pairs, and metrics in the library's naming.

    Args:
        chosen_rewards: ``[B]`` rewards r(x, y_c) of the preferred responses.
        rejected_rewards: ``[B]`` rewards r(x, y_r) of the others, in the same pair order.
        center_coef: c in (2); 0 gives the plain Bradley-Terry loss (1).

    Returns:
        ``(loss, metrics)``: a scalar tensor, and floats ``rewards/chosen``, ``rewards/rejected``
        (means), ``rewards/margins`` (mean r_c − r_r) and ``rewards/accuracies`` (share of pairs
        with r_c > r_r; a tie counts as wrong).
    """
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    margins = chosen - rejected
    loss = -F.logsigmoid(margins).mean()  # (1); logsigmoid is stable for large |margin|
    if center_coef:
        loss = loss + center_coef * (chosen + rejected).pow(2).mean()  # (2)
    metrics = {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
    }
    return loss, metrics
