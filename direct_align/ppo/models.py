"""The models PPO holds: the policy with a value function, the frozen reference and reward model.

Every forward here reads a rollout's layout: ``input_ids`` ``[B, P + R]`` are the prompts
left-padded to width ``P`` followed by the responses right-padded to width ``R``, with an
``attention_mask`` that is 0 on both paddings. Position ids count real tokens only, as
``generate`` counted them, so a token sees the same positions in sampling and in training.
Outputs are at response positions: index ``t`` of ``[B, R]`` belongs to response token ``t``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, T]`` that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def trunk_hidden(model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Last hidden states ``[B, T, H]`` of the decoder trunk of a causal LM or classifier."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False)  # fmt: skip
    return out.last_hidden_state


def response_logps(logits: torch.Tensor, response: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Log-probs ``[B, R]`` of the sampled tokens under the sampling distribution (logits
    divided by ``temperature``, as ``generate`` sampled them), and its entropy ``[B, R]``.

    ``logits`` ``[B, R, V]`` are those at the positions that predict each response token.
    """
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    taken = logps.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    entropy = -(logps.exp() * logps).sum(-1)
    return taken, entropy


class ActorCritic(nn.Module):
    """The policy (a causal LM) and the value function V(s_t) of PPO.

    ``critic=None`` shares the policy's trunk: a linear value head, zero-initialised, reads the
    same hidden states as the LM head (one forward per minibatch, and 2 models fewer in memory
    than a separate critic counts). Otherwise ``critic`` is a sequence classifier (usually a
    copy of the reward model, as Ziegler et al. 2019 initialise it) whose ``score`` head is
    applied at every position.
    """

    def __init__(self, policy: PreTrainedModel, critic: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        if critic is None:
            self.value_head = nn.Linear(policy.config.hidden_size, 1, dtype=policy.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        elif not isinstance(getattr(critic, "score", None), nn.Linear):
            raise ValueError(f"{type(critic).__name__} has no linear 'score' head to read values")

    # what FSDP reads from the module it wraps: the decoder layer classes to shard as units (the
    # embeddings, final norms and heads stay in the root, gathered around each forward and, for
    # sampling, by root_unsharded), and how to re-tie weights after moving to the meta device
    @property
    def _no_split_modules(self) -> list[str]:
        models = [self.policy] if self.critic is None else [self.policy, self.critic]
        return sorted({name for m in models for name in getattr(m, "_no_split_modules", None) or []})

    def tie_weights(self) -> None:
        self.policy.tie_weights()
        if self.critic is not None:
            self.critic.tie_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(log-probs ``[B, R]``, entropy ``[B, R]``, values ``[B, R]``) of the responses."""
        response = input_ids[:, prompt_width:]
        at = slice(prompt_width - 1, -1)  # the positions that predict response tokens
        hidden = trunk_hidden(self.policy, input_ids, attention_mask)
        logits = self.policy.get_output_embeddings()(hidden[:, at])
        logps, entropy = response_logps(logits, response, temperature)
        if self.critic is None:
            values = self.value_head(hidden[:, at]).squeeze(-1)
        else:
            critic_hidden = trunk_hidden(self.critic, input_ids, attention_mask)
            values = self.critic.score(critic_hidden[:, at]).squeeze(-1)
        return logps, entropy, values.float()


@torch.no_grad()
def reference_logps(reference: PreTrainedModel, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, prompt_width: int,
                    temperature: float) -> torch.Tensor:  # fmt: skip
    """Log-probs ``[B, R]`` of the responses under the frozen reference."""
    hidden = trunk_hidden(reference, input_ids, attention_mask)
    logits = reference.get_output_embeddings()(hidden[:, prompt_width - 1 : -1])
    return response_logps(logits, input_ids[:, prompt_width:], temperature)[0]


@torch.no_grad()
def reward_scores(reward_model: PreTrainedModel, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The reward model's score ``[B]`` of each prompt + response, read at its last real token
    (found from the mask, so it does not depend on which id pads)."""
    hidden = trunk_hidden(reward_model, input_ids, attention_mask)
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(-1).long().argmax(-1)  # [B]
    return reward_model.score(hidden[torch.arange(len(last)), last]).squeeze(-1).float()


class Frozen(nn.Module):
    """A frozen model (PPO's reference or reward model) whose forward is its scoring, so that
    under FSDP its sharded weights are gathered around it
    (:func:`~direct_align.engine.distributed.shard_frozen`)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.model, "_no_split_modules", None)

    def tie_weights(self) -> None:
        self.model.tie_weights()


class FrozenReference(Frozen):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                temperature: float) -> torch.Tensor:  # fmt: skip
        """:func:`reference_logps` ``[B, R]``."""
        return reference_logps(self.model, input_ids, attention_mask, prompt_width, temperature)


class FrozenRewardModel(Frozen):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """:func:`reward_scores` ``[B]``."""
        return reward_scores(self.model, input_ids, attention_mask)
