"""What one online round trains on, made from its judged samples: pairs (the pair losses),
thumbs up or down (KTO) or whole groups (the group losses); with the log-probs each needs.

Each kind is a small class with the same three parts, so that the round loop of
:mod:`direct_align.preference.online` reads the same whatever the loss: ``data`` (what is
counted and batched), ``micro_batches`` (the order of one epoch, seeded by the round) and
``step`` (one optimizer step on some micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from direct_align.data import PairDataset, fit_pair
from direct_align.data.batching import Batcher
from direct_align.group_losses import GROUP_LOSSES
from direct_align.losses import LOSSES
from direct_align.preference import groups as g
from direct_align.preference.offline import train_step
from direct_align.preference.reference import ReferenceLogps, score_shared
from direct_align.preference.settings import TrainConfig, balance_kto

Triple = tuple[int, int, int]  # (prompt, chosen sample, rejected sample) within a round


def make_pairs(scores: torch.Tensor, margin: float | None = None) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) index triples from rewards ``[P, k]`` of k responses a prompt.

    Without ``margin``: the best response against the worst (the first of equals), none when
    all k tie. With ``margin``: every ordered pair whose rewards differ by more than ``margin``.
    """
    triples = []
    for p, row in enumerate(scores.tolist()):
        if margin is None:
            best = max(range(len(row)), key=row.__getitem__)
            worst = min(range(len(row)), key=row.__getitem__)
            if row[best] > row[worst]:
                triples.append((p, best, worst))
        else:
            triples += [(p, i, j) for i in range(len(row)) for j in range(len(row))
                        if row[i] - row[j] > margin]  # fmt: skip
    return triples


def pairs_from_samples(prompt_ids: list[list[int]], responses: list[list[int]], k: int,
                       triples: list[tuple[int, int, int]], *, max_length: int,
                       max_prompt_length: int | None, bos_id: int | None) -> PairDataset:  # fmt: skip
    """The pairs ``triples`` as token ids, fitted into ``max_length`` as offline pairs are.

    ``responses`` holds ``k`` responses per prompt, prompt by prompt (``P × k`` lists); pairs
    whose responses are identical after truncation are left out.
    """
    out = PairDataset([], [], [])
    for p, c, r in triples:
        fitted = fit_pair(prompt_ids[p], responses[p * k + c], responses[p * k + r],
                          max_length=max_length, max_prompt_length=max_prompt_length,
                          bos_id=bos_id)  # fmt: skip
        if fitted is None or fitted[1] == fitted[2] or not fitted[1] or not fitted[2]:
            continue
        out.prompt_ids.append(fitted[0])
        out.chosen_ids.append(fitted[1])
        out.rejected_ids.append(fitted[2])
    return out


@dataclass
class PairWork:
    """Pairs of a round's samples (best against worst, or every pair past ``--pair-margin``),
    or with KTO thumbs as unpaired examples; their reference sums ``ref``."""

    data: PairDataset
    ref: ReferenceLogps | None
    cfg: TrainConfig  # with KTO, the round's balanced weights filled in
    triples: list[Triple]  # the pairs (empty for thumbs)
    prompts_used: int

    def micro_batches(self, round_index: int, epoch: int) -> list[list[int]]:
        return Batcher(self.data, batch_size=self.cfg.batch_size, seed=self.cfg.seed + round_index,
                       layout=self.cfg.layout).micro_batches(epoch)  # fmt: skip

    def step(self, model: Any, group: list[list[int]], **engine: Any) -> tuple[dict[str, float], int]:
        return train_step(model, self.data, group, self.ref, cfg=self.cfg, **engine)


@dataclass
class GroupWork:
    """A round's groups (every prompt's k samples and rewards) for a group loss."""

    data: g.GroupRound
    cfg: TrainConfig

    @property
    def prompts_used(self) -> int:
        return len(self.data)

    @property
    def triples(self) -> list[Triple]:
        """No pairs: the round's log table shows samples with their rewards."""
        return []

    def micro_batches(self, round_index: int, epoch: int) -> list[list[int]]:
        return g.group_batches(self.data, self.cfg.batch_size, self.cfg.seed + round_index, epoch)

    def step(self, model: Any, group: list[list[int]], **engine: Any) -> tuple[dict[str, float], int]:
        return g.group_train_step(model, self.data, group, cfg=self.cfg, **engine)


def round_work(model: Any, reference: Any, prompt_ids: list[list[int]], responses: list[list[int]],
               scores: torch.Tensor, *, cfg: TrainConfig, accelerator: Accelerator,
               pad_token_id: int, bos_id: int | None) -> PairWork | GroupWork:  # fmt: skip
    """What the round trains on (module docstring), with its reference log-probs from
    ``reference`` (a model held for the fresh samples, the policy with adapters off, or None for
    losses without one) or, with ``--refresh-reference``, from the policy as the round starts;
    a group loss that reads the sampling policy's log-probs gets them from the policy (``model``,
    prepared) before any step of the round."""
    k = cfg.samples_per_prompt
    table = scores.view(len(prompt_ids), k)
    fit = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
           "bos_id": bos_id}  # fmt: skip
    policy = accelerator.unwrap_model(model)
    scorer = policy if cfg.refresh_reference else reference
    if cfg.loss in GROUP_LOSSES:
        spec = GROUP_LOSSES[cfg.loss]
        groups = g.group_round(prompt_ids, responses, scores, k, **fit)
        if len(groups):
            score = {"cfg": cfg, "accelerator": accelerator, "pad_token_id": pad_token_id}
            if spec.needs_sampling:
                groups.sampling = g.score_group(policy, groups, **score)
            if spec.needs_reference and scorer is not None:
                same = scorer is policy and groups.sampling is not None
                groups.reference = groups.sampling if same else g.score_group(scorer, groups, **score)
        return GroupWork(groups, cfg)
    triples: list[Triple] = []
    if LOSSES[cfg.loss].unpaired:  # KTO: every sample a thumb, balanced per round
        feedback = g.thumbs(table)
        data = g.unpaired_from_samples(prompt_ids, responses, k, feedback, **fit)
        used = len({p for p, _, _ in feedback})
        assert data.labels is not None
        round_cfg = balance_kto(cfg, data.labels) if data.labels else cfg
    else:
        triples = make_pairs(table, cfg.pair_margin)
        data = pairs_from_samples(prompt_ids, responses, k, triples, **fit)
        used = len({p for p, _, _ in triples})
        round_cfg = cfg
    ref = None
    if scorer is not None and len(data):
        ref = score_shared(scorer, data, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                           layout=cfg.layout, pad_token_id=pad_token_id,
                           device=accelerator.device, autocast=accelerator.autocast,
                           accelerator=accelerator)  # fmt: skip
    return PairWork(data, ref, round_cfg, triples, used)


def sample_rows(texts: list[str], responses: list[list[int]], scores: torch.Tensor, k: int,
                triples: list[Triple], tokenizer: Any, n: int) -> list[dict[str, Any]]:  # fmt: skip
    """The first ``n`` of a round's pairs as text with their judged rewards; without pairs (KTO,
    group losses), the first ``n`` samples with their rewards."""
    def text(p: int, i: int) -> str:
        return tokenizer.decode(responses[p * k + i], skip_special_tokens=True)

    if not triples:
        return [{"prompt": texts[i // k], "response": text(i // k, i % k),
                 "reward": scores[i].item()} for i in range(min(n, len(responses)))]  # fmt: skip
    return [{"prompt": texts[p], "chosen": text(p, c), "rejected": text(p, r),
             "chosen_reward": scores[p * k + c].item(), "rejected_reward": scores[p * k + r].item()}
            for p, c, r in triples[:n]]  # fmt: skip
