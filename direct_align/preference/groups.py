"""A round's samples kept whole: every prompt's ``k`` judged responses, for group losses and
for online KTO's thumbs.

Online pair losses see one pair of a prompt's samples; the group losses of
:mod:`direct_align.group_losses` (REBEL, LiPO-λ, SPPO, RLOO) see all ``k`` with their rewards,
and online KTO turns each into a thumb up or down. :class:`GroupRound` holds a round's groups
in the pair layout the policy already computes: prompt ``p``'s responses go into ``m =
ceil(k / 2)`` consecutive layout pairs ``(y_0, y_1), (y_2, y_3), ...`` (with k odd the last
pair repeats ``y_0`` as its second response, whose sums are dropped), so one forward of a
prompt's pairs gives every one of its samples' log-prob sums, each prompt computed once per
pair (the ``shared`` layout) and nothing padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from direct_align.data import PairDataset, fit_pair
from direct_align.data.batching import epoch_batches
from direct_align.data.packing import build_batch
from direct_align.engine.step import Forward, optimizer_step
from direct_align.group_losses import GROUP_LOSSES, group_loss
from direct_align.preference.reference import score_shared


@dataclass
class GroupRound:
    """The prompts of one round whose ``k`` responses all fit, in the pair layout above.

    ``data``: ``P × m`` layout pairs, prompt by prompt; ``rewards``: the judge's, ``[P, k]``;
    ``prompts``: each kept prompt's position in the round; ``sampling`` and ``reference``: the
    log-prob sums ``[P, k]`` of the sampling policy and of the reference, once scored.
    """

    data: PairDataset
    rewards: torch.Tensor  # [P, k] float32
    prompts: list[int]
    k: int
    sampling: torch.Tensor | None = None  # [P, k]
    reference: torch.Tensor | None = None  # [P, k]

    @property
    def pairs_per_prompt(self) -> int:
        return -(-self.k // 2)

    def __len__(self) -> int:
        return len(self.prompts)

    def pair_index(self, prompts: Sequence[int]) -> list[int]:
        """The layout pairs of the kept prompts ``prompts`` (positions in this round), in order."""
        m = self.pairs_per_prompt
        return [p * m + j for p in prompts for j in range(m)]

    def as_group(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """Sums of layout pairs ``[n·m]`` (chosen and rejected slots, as :meth:`pair_index`
        orders them) → the samples' sums ``[n, k]``."""
        m = self.pairs_per_prompt
        both = torch.stack((chosen.view(-1, m), rejected.view(-1, m)), dim=2)  # [n, m, 2]
        return both.reshape(-1, 2 * m)[:, : self.k]


def fit_group(prompt: list[int], responses: Sequence[list[int]], *, max_length: int,
              max_prompt_length: int | None, bos_id: int | None,
              ) -> tuple[list[int], list[list[int]]] | None:  # fmt: skip
    """One prompt and its responses fitted into ``max_length`` by the pairs' truncation rule
    (:mod:`direct_align.data.tokenize`) applied with the longest response, so that every
    response of the group sees the same prompt; None when no response token fits or a response
    is empty."""
    longest = max(responses, key=len)
    fitted = fit_pair(prompt, longest, longest, max_length=max_length,
                      max_prompt_length=max_prompt_length, bos_id=bos_id)  # fmt: skip
    if fitted is None:
        return None
    budget = len(fitted[1])
    cut = [list(r[:budget]) for r in responses]
    return (fitted[0], cut) if all(cut) else None


def group_round(prompt_ids: Sequence[list[int]], responses: Sequence[list[int]],
                scores: torch.Tensor, k: int, *, max_length: int, max_prompt_length: int | None,
                bos_id: int | None) -> GroupRound:  # fmt: skip
    """The round's ``P × k`` responses (prompt by prompt) with their rewards ``[P × k]`` as a
    :class:`GroupRound`; a prompt left out when its group does not fit (:func:`fit_group`)."""
    data, rows, kept = PairDataset([], [], []), [], []
    rewards = scores.view(len(prompt_ids), k).float()
    for p, prompt in enumerate(prompt_ids):
        fitted = fit_group(prompt, responses[p * k : (p + 1) * k], max_length=max_length,
                           max_prompt_length=max_prompt_length, bos_id=bos_id)  # fmt: skip
        if fitted is None:
            continue
        ids, group = fitted
        slots = group + group[:1] * (k % 2)  # k odd: the last pair's second response repeats y_0
        for j in range(0, len(slots), 2):
            data.prompt_ids.append(ids)
            data.chosen_ids.append(slots[j])
            data.rejected_ids.append(slots[j + 1])
        rows.append(rewards[p])
        kept.append(p)
    table = torch.stack(rows) if rows else torch.empty(0, k)
    return GroupRound(data, table, kept, k)


def score_group(model: Any, round_: GroupRound, *, cfg: Any, accelerator: Accelerator,
                pad_token_id: int) -> torch.Tensor:  # fmt: skip
    """Log-prob sums ``[P, k]`` of every sample of ``round_`` under ``model`` (no gradient),
    batched and, with several processes, shared out among them."""
    sums = score_shared(model, round_.data, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                        layout=cfg.layout, pad_token_id=pad_token_id, device=accelerator.device,
                        autocast=accelerator.autocast, accelerator=accelerator)  # fmt: skip
    return round_.as_group(sums.chosen, sums.rejected)


def group_batches(round_: GroupRound, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of ``batch_size`` prompts (with all their samples), in an order seeded by
    (seed, epoch)."""
    return epoch_batches(len(round_), batch_size, seed, epoch)


def group_kwargs(cfg: Any) -> dict[str, float]:
    """The settings the chosen group loss accepts as options (``eta``); {} for other losses."""
    if cfg.loss not in GROUP_LOSSES:
        return {}
    options = GROUP_LOSSES[cfg.loss].options
    return {name: getattr(cfg, name) for name in options if getattr(cfg, name, None) is not None}


def group_train_step(model: Any, round_: GroupRound, group: list[list[int]], *, cfg: Any,
                     accelerator: Accelerator, optimizer: torch.optim.Optimizer, scheduler: Any,
                     pad_token_id: int) -> tuple[dict[str, float], int]:  # fmt: skip
    """One optimizer step on the micro-batches ``group`` (prompt positions in ``round_``), each
    process taking its share, each micro-batch weighted by its prompts.

    Returns (the step's metrics with ``grad_norm``, tokens computed); raises
    :class:`~direct_align.engine.loop.NonFinite` before a non-finite loss reaches the weights.
    """
    device = accelerator.device
    options = group_kwargs(cfg)
    spec = GROUP_LOSSES[cfg.loss]

    def forward(prompts: list[int]) -> Forward:
        batch = build_batch(round_.data, round_.pair_index(prompts), cfg.layout,
                            pad_token_id).to(device)  # fmt: skip
        out = model(batch)
        rows = torch.tensor(prompts)

        def pick(table: torch.Tensor | None) -> torch.Tensor | None:
            return None if table is None else table[rows].to(device)

        loss, metrics = group_loss(
            cfg.loss, logps=round_.as_group(out.chosen, out.rejected),
            rewards=round_.rewards[rows].to(device), sampling_logps=pick(round_.sampling),
            ref_logps=pick(round_.reference), beta=cfg.beta if spec.uses_beta else 1.0,
            **options)  # fmt: skip
        return Forward(loss, metrics, batch.num_tokens)

    return optimizer_step(model, group, forward, accelerator=accelerator, optimizer=optimizer,
                          scheduler=scheduler, max_grad_norm=cfg.max_grad_norm)


def thumbs(scores: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Online KTO's feedback from rewards ``[P, k]``: (prompt, sample, desirable) for every
    sample of every prompt whose rewards do not all tie; a sample is desirable when its reward
    is above its prompt's mean (the judge's scale and offset cancel out)."""
    out = []
    for p, row in enumerate(scores.tolist()):
        if max(row) == min(row):
            continue
        mean = sum(row) / len(row)
        out += [(p, i, value > mean) for i, value in enumerate(row)]
    return out


def unpaired_from_samples(prompt_ids: Sequence[list[int]], responses: Sequence[list[int]], k: int,
                          feedback: list[tuple[int, int, bool]], *, max_length: int,
                          max_prompt_length: int | None, bos_id: int | None) -> PairDataset:  # fmt: skip
    """The thumbs ``feedback`` as KTO's unpaired examples: sample ``i`` of prompt ``p`` is the
    completion, and the same sample of the next prompt of the round (a completion of another
    prompt, under this one) fills the mismatched slot whose log-ratio estimates KTO's reference
    point, as :mod:`direct_align.data.unpaired` pairs rows offline."""
    n = len(prompt_ids)
    out = PairDataset([], [], [], labels=[])
    for p, i, desirable in feedback:
        other = responses[((p + 1) % n) * k + i]
        fitted = fit_pair(prompt_ids[p], responses[p * k + i], other, max_length=max_length,
                          max_prompt_length=max_prompt_length, bos_id=bos_id)  # fmt: skip
        if fitted is None or not fitted[1] or not fitted[2]:
            continue
        out.prompt_ids.append(fitted[0])
        out.chosen_ids.append(fitted[1])
        out.rejected_ids.append(fitted[2])
        assert out.labels is not None
        out.labels.append(desirable)
    return out
