"""The PPO loop for RLHF, after Ziegler et al. 2019 and Huang et al. 2024 (the "N+
implementation details"): one readable function on ``accelerate.Accelerator``.

Per rollout (one PPO iteration):

1. sample one response per prompt from the policy (KV-cached ``generate``);
2. score it: the policy's log-probs and values, the reference's log-probs, the reward model's
   score at the last token (standardised by the first rollout's statistics; a response without
   EOS can be penalised);
3. per-token reward −β·KL, plus the score at the last token; GAE advantages and returns;
   advantages whitened over the rollout's tokens;
4. ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss + vf_coef × clipped
   value loss, clipped gradients, AdamW, schedule;
5. adapt β toward ``target_kl`` when one is set.

Under a multi-process launcher each process samples, scores and updates on its share of every
rollout's prompts (the rollout keeps its size); the statistics that must be global (score
normalisation, advantage whitening, the KL the β controller sees, logged metrics) are summed
over the processes, and each minibatch loss is weighted by the process's share of its tokens,
so that DDP's averaged gradient is that of the whole minibatch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from direct_align.distributed import NullTracker, configure_deepspeed, my_share, sum_across
from direct_align.errors import DirectAlignError
from direct_align.ppo.config import PPOConfig
from direct_align.ppo.core import (
    KLController,
    gae,
    kl_estimate,
    masked_mean,
    masked_moments,
    masked_whiten,
    mean_var,
    policy_loss,
    token_rewards,
    value_loss,
)
from direct_align.ppo.models import ActorCritic
from direct_align.ppo.rollout import Rollout, generate, score_rollout
from direct_align.progress import progress
from direct_align.tracking import Tracker
from direct_align.trainer import SCHEDULES, peak_memory_gb

# (rollout index) → metrics logged at that rollout; the built-in task's held-out evaluation
Evaluator = Callable[[int], dict[str, float]]
# sums of this process → sums of all processes (the identity in one process)
Reduce = Callable[[dict[str, float]], dict[str, float]]


@dataclass
class PPOState:
    rollouts: int = 0
    updates: int = 0
    responses: int = 0
    tokens_generated: int = 0
    train_seconds: float = 0.0  # rollouts and updates, evaluation excluded


class ScoreNormalizer:
    """Standardises reward-model scores with the mean and std of the first batch it sees (the
    initial policy's samples), then keeps them fixed, so β means the same all run long.
    ``reduce`` sums statistics over the processes, so the batch is that of all of them."""

    def __init__(self, enabled: bool, reduce: Reduce = lambda sums: sums) -> None:
        self.enabled = enabled
        self.reduce = reduce
        self.mean, self.std = 0.0, 1.0
        self.fitted = not enabled

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Standardised ``scores`` ``[B]``."""
        if not self.fitted:
            moments = self.reduce(masked_moments(scores, torch.ones_like(scores)))
            mean, var = mean_var(moments, unbiased=True)
            self.mean, self.std = mean, max(var**0.5, 1e-6)
            self.fitted = True
        return (scores - self.mean) / self.std


def _prompt_batches(prompt_ids: Sequence[list[int]], size: int, seed: int):  # noqa: ANN202
    """Endless batches of ``size`` prompts, reshuffled every pass (deterministic in ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < size:
            order += torch.randperm(len(prompt_ids), generator=generator).tolist()
        yield [prompt_ids[i] for i in order[:size]]
        order = order[size:]


def advantages_of(rollout: Rollout, scores: torch.Tensor, kl_coef: float, cfg: PPOConfig,
                  reduce: Reduce = lambda sums: sums,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(advantages ``[B, R]``, returns ``[B, R]``, per-token KL ``[B, R]``) of a scored rollout;
    advantages are whitened with the statistics of all processes' tokens (``reduce``)."""
    kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator) * rollout.mask
    rewards = token_rewards(scores, kl, rollout.mask, kl_coef)
    advantages, returns = gae(rewards, rollout.values, rollout.mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        moments = reduce(masked_moments(advantages, rollout.mask))
        advantages = masked_whiten(advantages, rollout.mask, moments=moments)
    return advantages, returns, kl


def rollout_sums(rollout: Rollout, raw: torch.Tensor, scores: torch.Tensor, kl: torch.Tensor,
                 returns: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """Sums over this process's responses of what a rollout's metrics average (``raw`` and
    ``scores`` ``[B]``: the reward model's and the normalised scores; ``kl`` and ``returns``
    ``[B, R]``)."""
    mask = rollout.mask
    return {"responses": float(len(rollout)), "tokens": mask.sum().item(),
            "kl": kl.sum().item(), "scores": raw.sum().item(),
            "normalized_scores": scores.sum().item(), "ended": rollout.ended.sum().item(),
            "values": (rollout.values * mask).sum().item(),
            "returns": (returns * mask).sum().item()}  # fmt: skip


def fit_ppo(
    actor_critic: ActorCritic,
    reference: PreTrainedModel,
    reward_model: PreTrainedModel,
    prompt_ids: Sequence[list[int]],
    *,
    cfg: PPOConfig,
    eos_token_id: int,
    pad_token_id: int,
    accelerator: Accelerator,
    tracker: Tracker | NullTracker,
    evaluate: Evaluator | None = None,
) -> PPOState:
    """Train ``actor_critic`` in place for ``cfg.rollouts`` iterations; returns the counters
    (of all processes). ``evaluate`` runs where it is given (the main process).

    Raises :class:`DirectAlignError` on a non-finite loss, before it reaches the weights.
    """
    device = accelerator.device
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    minibatches = -(-cfg.rollout_batch_size // cfg.mini_batch_size)
    total = cfg.rollouts * cfg.ppo_epochs * minibatches
    kwargs = {} if cfg.lr_scheduler == "constant" else {"num_training_steps": total}
    scheduler = SCHEDULES[cfg.lr_scheduler](optimizer, num_warmup_steps=round(cfg.warmup_ratio * total),
                                            **kwargs)  # fmt: skip
    configure_deepspeed(accelerator, cfg.mini_batch_size // accelerator.num_processes,
                        cfg.max_grad_norm)  # fmt: skip
    actor_critic, optimizer = accelerator.prepare(actor_critic, optimizer)
    unwrapped = accelerator.unwrap_model(actor_critic)  # sampling and scoring need no DDP
    reduce: Reduce = partial(sum_across, accelerator=accelerator)
    kl_ctl = KLController(cfg.kl_coef, target=cfg.target_kl, horizon=cfg.kl_horizon)
    normalize = ScoreNormalizer(cfg.normalize_scores, reduce)
    batches = _prompt_batches(prompt_ids, cfg.rollout_batch_size, cfg.seed)
    state = PPOState()
    if evaluate is not None:
        tracker.log(evaluate(0), 0)
    with progress(total=cfg.rollouts, desc="ppo", unit="rollout",
                  disable=not accelerator.is_main_process) as bar:  # fmt: skip
        for it in range(1, cfg.rollouts + 1):
            start = time.perf_counter()
            # 1-2. sample and score this process's share of the rollout's prompts
            rollout = generate(unwrapped.policy, my_share(next(batches), accelerator),
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id)  # fmt: skip
            with accelerator.autocast():
                rollout = score_rollout(rollout, unwrapped, reference, reward_model,
                                        temperature=cfg.temperature,
                                        batch_size=cfg.rollout_batch_size)  # fmt: skip
            raw = rollout.scores
            scores = normalize(raw) - cfg.missing_eos_penalty * (~rollout.ended).float()
            # 3. rewards and advantages
            advantages, returns, kl = advantages_of(rollout, scores, kl_ctl.value, cfg, reduce)
            # 4. clipped updates
            update_metrics = _update(actor_critic, optimizer, scheduler, accelerator, rollout,
                                     advantages, returns, cfg, state)  # fmt: skip
            # 5. β, from the KL of all processes' responses
            sums = reduce(rollout_sums(rollout, raw, scores, kl, returns))
            n = sums["responses"]
            seq_kl = sums["kl"] / n
            metrics = {
                "objective/kl": seq_kl,
                "objective/scores": sums["scores"] / n,
                "objective/normalized_scores": sums["normalized_scores"] / n,
                "objective/non_score_reward": -kl_ctl.value * seq_kl,
                "objective/rlhf_reward": sums["normalized_scores"] / n - kl_ctl.value * seq_kl,
                "objective/kl_coef": kl_ctl.value,
                "objective/ended_with_eos": sums["ended"] / n,
                "objective/response_tokens": sums["tokens"] / n,
                "val/mean": sums["values"] / sums["tokens"],
                "val/returns": sums["returns"] / sums["tokens"],
                **update_metrics,
            }  # fmt: skip
            kl_ctl.update(seq_kl, int(n))
            state.rollouts = it
            state.responses += int(n)
            state.tokens_generated += int(sums["tokens"])
            elapsed = time.perf_counter() - start
            state.train_seconds += elapsed
            metrics |= {"train/lr": scheduler.get_last_lr()[0],
                        "perf/responses_per_s": n / elapsed,
                        "perf/tokens_generated": state.tokens_generated,
                        "perf/peak_mem_gb": peak_memory_gb(device)}  # fmt: skip
            if it % cfg.log_every == 0 or it == cfg.rollouts:
                tracker.log(metrics, it)
            if evaluate is not None and (it == cfg.rollouts or (cfg.eval_every and it % cfg.eval_every == 0)):
                tracker.log(evaluate(it), it)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{seq_kl:.2f}",
                            refresh=False)  # fmt: skip
    return state


def _update(actor_critic: ActorCritic, optimizer: torch.optim.Optimizer, scheduler: object,
            accelerator: Accelerator, rollout: Rollout, advantages: torch.Tensor,
            returns: torch.Tensor, cfg: PPOConfig, state: PPOState) -> dict[str, float]:  # fmt: skip
    """``cfg.ppo_epochs`` passes of clipped updates over shuffled minibatches of ``rollout``;
    returns the means of the minibatches' losses and diagnostics over all processes.

    With several processes each takes ``mini_batch_size / processes`` of its own responses per
    step (so all make the same number of passes, as DDP requires); its loss, a mean over its
    tokens, is weighted by its share of the minibatch's tokens times the process count, so that
    DDP's average is the gradient of the mean over all the minibatch's tokens.
    """
    width = rollout.query.shape[1]
    processes = accelerator.num_processes
    sums: dict[str, float] = {}
    n = 0
    actor_critic.train()
    for _ in range(cfg.ppo_epochs):
        for index in torch.randperm(len(rollout)).split(cfg.mini_batch_size // processes):
            mb = rollout.select(index)
            with accelerator.autocast():
                logps, entropy, values = actor_critic(mb.input_ids, mb.attention_mask, width,
                                                      cfg.temperature)  # fmt: skip
            pg_loss, clipfrac, approx_kl = policy_loss(logps, mb.logprobs, advantages[index],
                                                       mb.mask, cfg.clip_range)  # fmt: skip
            vf_loss, vf_clipfrac = value_loss(values, mb.values, returns[index], mb.mask,
                                              cfg.value_clip_range)  # fmt: skip
            loss = pg_loss + cfg.vf_coef * vf_loss
            tokens = mb.mask.sum().item()
            shared = sum_across({"tokens": tokens, "non_finite": float(not torch.isfinite(loss))},
                                accelerator)  # fmt: skip
            if shared["non_finite"]:
                raise DirectAlignError(f"rollout {state.rollouts + 1}: the PPO loss is "
                                       f"{loss.item()} in process {accelerator.process_index} "
                                       "(non-finite in some process); the weights were not "
                                       "updated")  # fmt: skip
            accelerator.backward(loss * (tokens / shared["tokens"] * processes))
            grad_norm = accelerator.clip_grad_norm_(actor_critic.parameters(),
                                                    cfg.max_grad_norm or 1e30)  # fmt: skip
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.updates += 1
            step = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                    "policy/clipfrac": clipfrac, "policy/approxkl": approx_kl,
                    "policy/entropy": masked_mean(entropy.detach(), mb.mask).item(),
                    "val/clipfrac": vf_clipfrac, "train/grad_norm": float(grad_norm)}  # fmt: skip
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value
            n += 1
    return {key: value / (n * processes) for key, value in sum_across(sums, accelerator).items()}
