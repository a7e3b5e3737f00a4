"""Held-out metrics of a reward model: pair accuracy, margin, loss; rank agreement with a truth."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from direct_align.data import PairDataset, collate_pairs
from direct_align.rm.loss import bradley_terry_loss
from direct_align.rm.model import pair_rewards


@dataclass
class RewardEval:
    """Metrics over all pairs, and the rewards ``[N]`` of each pair's responses in data order."""

    metrics: dict[str, float]  # loss, rewards/{chosen,rejected,margins,accuracies}
    chosen: torch.Tensor
    rejected: torch.Tensor


@torch.no_grad()
def evaluate_rm(
    model: PreTrainedModel,
    pairs: PairDataset,
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    center_coef: float = 0.0,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> RewardEval:
    """Score every pair (``batch_size`` pairs per forward, sorted by length) and compute the
    loss and metrics of :func:`bradley_terry_loss` over all of them at once."""
    was_training = model.training
    model.eval()
    chosen, rejected = torch.empty(len(pairs)), torch.empty(len(pairs))
    order = sorted(range(len(pairs)), key=pairs.pair_tokens)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = collate_pairs(pairs, index, pad_token_id).to(device)
        with autocast():
            r_chosen, r_rejected = pair_rewards(model, batch)
        chosen[index], rejected[index] = r_chosen.cpu(), r_rejected.cpu()
    model.train(was_training)
    loss, metrics = bradley_terry_loss(chosen, rejected, center_coef=center_coef)
    return RewardEval({"loss": loss.item(), **metrics}, chosen, rejected)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks ``[N]`` of ``x`` ``[N]``; tied values share the mean of their ranks."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each group of equal values
    return (last - (counts.double() - 1) / 2)[inverse]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two ``[N]`` tensors (nan when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks (ties allowed)."""
    return pearson(average_ranks(x), average_ranks(y))
