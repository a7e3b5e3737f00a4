"""Rollouts: sample responses from the policy, then score them with every model PPO holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedModel

from direct_align.generation import left_pad
from direct_align.ppo.models import ActorCritic, FrozenReference, FrozenRewardModel


@dataclass
class Rollout:
    """One batch of sampled responses and everything computed on them before the update.

    ``query`` ``[B, P]`` left-padded prompts; ``response`` ``[B, R]`` right-padded (pad after
    EOS); masks are 1 on real tokens; the per-token tensors are ``[B, R]``, ``scores`` and
    ``ended`` (the response ended with EOS) are ``[B]``.
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.mask.long()], dim=1)

    def __len__(self) -> int:
        return self.query.shape[0]

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows ``index`` of every tensor."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None
                          else getattr(self, f.name)[index] for f in fields(self)})  # fmt: skip


@torch.no_grad()
def generate(policy: PreTrainedModel, prompt_ids: Sequence[list[int]], *, max_new_tokens: int,
             temperature: float, eos_token_id: int, pad_token_id: int,
             synced: bool = False) -> Rollout:  # fmt: skip
    """Sample one response per prompt (batched ``generate`` with a KV cache, no top-k/top-p,
    from the global torch RNG); tokens after the first EOS become padding. ``synced``: every
    process samples in step (a sharded policy gathers its layers in every forward), each
    going on until all have finished."""
    device = next(policy.parameters()).device
    query, query_mask = left_pad(prompt_ids, pad_token_id)
    width = query.shape[1]
    was_training = policy.training
    policy.eval()
    out = policy.generate(
        input_ids=query.to(device), attention_mask=query_mask.to(device), do_sample=True,
        temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, synced_gpus=synced,
    )  # fmt: skip
    policy.train(was_training)
    response = out[:, width:]
    is_eos = response == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after_eos).float()
    response = response.masked_fill(after_eos, pad_token_id)
    return Rollout(query.to(device), query_mask.to(device), response, mask, is_eos.any(-1))


@torch.no_grad()
def score_rollout(rollout: Rollout, actor_critic: ActorCritic, reference: FrozenReference,
                  reward_model: FrozenRewardModel, *, temperature: float,
                  batch_size: int) -> Rollout:  # fmt: skip
    """Fill in the policy's log-probs and values, the reference's log-probs and the reward
    model's scores, ``batch_size`` rows per forward."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [],
                                            "scores": []}  # fmt: skip
    width = rollout.query.shape[1]
    was_training = actor_critic.training
    actor_critic.eval()
    for start in range(0, len(rollout), batch_size):
        part = rollout.select(torch.arange(start, min(start + batch_size, len(rollout))))
        ids, mask = part.input_ids, part.attention_mask
        logps, _, values = actor_critic(ids, mask, width, temperature)
        parts["logprobs"].append(logps)
        parts["values"].append(values)
        parts["ref_logprobs"].append(reference(ids, mask, width, temperature))
        parts["scores"].append(reward_model(ids, mask))
    actor_critic.train(was_training)
    for name, tensors in parts.items():
        setattr(rollout, name, torch.cat(tensors) * (rollout.mask if name != "scores" else 1))
    return rollout
