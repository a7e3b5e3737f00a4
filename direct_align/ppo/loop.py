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

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator

from direct_align.engine.distributed import my_share, root_unsharded, shards, sum_across
from direct_align.engine.loop import Loop
from direct_align.engine.session import Session
from direct_align.engine.step import Forward, accumulate, clipped_step, make_optimizer, prepare
from direct_align.engine.tracking import peak_memory_gb
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
from direct_align.ppo.models import ActorCritic, FrozenReference, FrozenRewardModel
from direct_align.ppo.rollout import Rollout, generate, score_rollout
from direct_align.ppo.settings import PPOConfig

# (rollout index) → metrics logged at that rollout; the built-in task's held-out evaluation
Evaluator = Callable[[int], dict[str, float]]
# sums of this process → sums of all processes (the identity in one process)
Reduce = Callable[[dict[str, float]], dict[str, float]]


@dataclass
class PPOState:
    """Where PPO is, besides weights, optimizer, schedule and RNG: counters, β, and the
    statistics that standardise reward-model scores."""

    step: int = 0  # rollouts done
    updates: int = 0  # optimizer steps
    responses: int = 0
    tokens_generated: int = 0
    train_seconds: float = 0.0  # rollouts and updates, evaluation excluded
    kl_coef: float | None = None  # β now (None: not started)
    score_mean: float = 0.0
    score_std: float = 1.0
    scores_fitted: bool = False


def normalize(scores: torch.Tensor, state: PPOState, *, enabled: bool,
              reduce: Reduce = lambda sums: sums) -> torch.Tensor:  # fmt: skip
    """Reward-model scores ``[B]`` standardised with the mean and std of the first rollout's (the
    initial policy's samples, over all processes: ``reduce``), then fixed, so that β means the
    same all run long. The statistics live in ``state`` (checkpointed)."""
    if not enabled:
        return scores
    if not state.scores_fitted:
        moments = reduce(masked_moments(scores, torch.ones_like(scores)))
        mean, var = mean_var(moments, unbiased=True)
        state.score_mean, state.score_std, state.scores_fitted = mean, max(var**0.5, 1e-6), True
    return (scores - state.score_mean) / state.score_std


def prompt_batches(prompt_ids: Sequence[list[int]], size: int, seed: int) -> Iterator[list[list[int]]]:
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
    reference: FrozenReference,
    reward_model: FrozenRewardModel,
    prompt_ids: Sequence[list[int]],
    *,
    cfg: PPOConfig,
    eos_token_id: int,
    pad_token_id: int,
    session: Session,
    evaluate: Evaluator | None = None,
) -> tuple[PPOState, Any, bool]:
    """Train ``actor_critic`` for ``cfg.rollouts`` iterations, or until ``--max-steps-per-run``
    rollouts in this invocation; returns (the state, with counters of all processes; the
    prepared model; finished). ``evaluate`` runs where it is given (the main process, and not
    under FSDP, where no process holds the policy whole). ``reference`` and ``reward_model``
    are ready to score (sharded under FSDP, as the policy and critic are).

    Raises :class:`~direct_align.errors.Interrupted` after a checkpoint on SIGTERM/SIGINT (at the
    end of a rollout), and DirectAlignError on a non-finite loss, before it reaches the weights.
    """
    accelerator, tracker, device = session.accelerator, session.tracker, session.accelerator.device
    minibatches = -(-cfg.rollout_batch_size // cfg.mini_batch_size)
    optimizer, scheduler = make_optimizer(actor_critic, cfg,
                                          cfg.rollouts * cfg.ppo_epochs * minibatches)  # fmt: skip
    actor_critic, optimizer, load_kwargs = prepare(
        actor_critic, optimizer, scheduler, accelerator=accelerator,
        micro_batch_size=cfg.mini_batch_size // accelerator.num_processes,
        max_grad_norm=cfg.max_grad_norm)  # fmt: skip
    unwrapped = accelerator.unwrap_model(actor_critic)  # sampling and scoring need no DDP
    reduce: Reduce = partial(sum_across, accelerator=accelerator)
    loop = Loop(session, PPOState(kl_coef=cfg.kl_coef), model=actor_critic, scheduler=scheduler,
                total=cfg.rollouts, cfg=cfg, desc="ppo", state_key="ppo_state", unit="rollout")  # fmt: skip
    loop.resume(load_kwargs)
    state = loop.state
    kl_ctl = KLController(state.kl_coef, target=cfg.target_kl, horizon=cfg.kl_horizon)
    batches = prompt_batches(prompt_ids, cfg.rollout_batch_size, cfg.seed)
    for _ in range(state.step):  # the prompts of the rollouts done
        next(batches)
    if evaluate is not None and state.step == 0:
        tracker.log(evaluate(0), 0)
    with loop.running():
        while not loop.finished:
            it = state.step + 1
            with loop.step():
                # 1-2. sample and score this process's share of the rollout's prompts
                with root_unsharded(actor_critic, accelerator):
                    rollout = generate(unwrapped.policy, my_share(next(batches), accelerator),
                                       max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, eos_token_id=eos_token_id,
                                       pad_token_id=pad_token_id, synced=shards(accelerator))  # fmt: skip
                with accelerator.autocast():
                    rollout = score_rollout(rollout, unwrapped, reference, reward_model,
                                            temperature=cfg.temperature,
                                            batch_size=cfg.rollout_batch_size)  # fmt: skip
                raw = rollout.scores
                scores = normalize(raw, state, enabled=cfg.normalize_scores, reduce=reduce)
                scores = scores - cfg.missing_eos_penalty * (~rollout.ended).float()
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
            state.kl_coef = kl_ctl.value
            state.responses += int(n)
            state.tokens_generated += int(sums["tokens"])
            metrics |= {"train/lr": scheduler.get_last_lr()[0],
                        "perf/responses_per_s": n / max(loop.last_step_seconds, 1e-9),
                        "perf/tokens_generated": state.tokens_generated,
                        "perf/peak_mem_gb": peak_memory_gb(device)}  # fmt: skip
            if loop.log_due():
                tracker.log(metrics, it)
            if evaluate is not None and (loop.due(cfg.eval_every) or loop.finished):
                evaluated = evaluate(it)
                if loop.finished:  # the final evaluation: a stop signal now checkpoints first
                    loop.stop_if_requested(f"at rollout {it}, during the final evaluation")
                tracker.log(evaluated, it)
            loop.bar.update(1)
            loop.bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{seq_kl:.2f}",
                                 refresh=False)  # fmt: skip
            if loop.boundary():
                return state, actor_critic, False
    loop.stop_if_requested(f"at rollout {state.step}")
    return state, actor_critic, True


def _update(actor_critic: ActorCritic, optimizer: torch.optim.Optimizer, scheduler: object,
            accelerator: Accelerator, rollout: Rollout, advantages: torch.Tensor,
            returns: torch.Tensor, cfg: PPOConfig, state: PPOState) -> dict[str, float]:  # fmt: skip
    """``cfg.ppo_epochs`` passes of clipped updates over shuffled minibatches of ``rollout``;
    returns the means of the minibatches' losses and diagnostics over all processes.

    With several processes each takes ``mini_batch_size / processes`` of its own responses per
    step (so all make the same number of passes, as DDP requires); its loss, a mean over its
    tokens, is weighted by its share of the minibatch's tokens (:func:`accumulate`), so that
    DDP's average is the gradient of the mean over all the minibatch's tokens.
    """
    width = rollout.query.shape[1]
    sums: dict[str, float] = {}
    n = 0

    def forward(index: torch.Tensor) -> Forward:
        mb = rollout.select(index)
        logps, entropy, values = actor_critic(mb.input_ids, mb.attention_mask, width,
                                              cfg.temperature)  # fmt: skip
        pg_loss, clipfrac, approx_kl = policy_loss(logps, mb.logprobs, advantages[index],
                                                   mb.mask, cfg.clip_range)  # fmt: skip
        vf_loss, vf_clipfrac = value_loss(values, mb.values, returns[index], mb.mask,
                                          cfg.value_clip_range)  # fmt: skip
        metrics = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                   "policy/clipfrac": clipfrac, "policy/approxkl": approx_kl,
                   "policy/entropy": masked_mean(entropy.detach(), mb.mask).item(),
                   "val/clipfrac": vf_clipfrac}  # fmt: skip
        return Forward(pg_loss + cfg.vf_coef * vf_loss, metrics, int(mb.mask.sum().item()))

    def tokens(index: torch.Tensor) -> float:
        return rollout.mask[index].sum().item()

    for _ in range(cfg.ppo_epochs):
        for index in torch.randperm(len(rollout)).split(cfg.mini_batch_size // accelerator.num_processes):
            step, _ = accumulate(actor_critic, [(index, True)], forward, weight=tokens,
                                 accelerator=accelerator)  # fmt: skip
            norm = clipped_step(actor_critic, optimizer, scheduler, accelerator=accelerator,
                                max_grad_norm=cfg.max_grad_norm)  # fmt: skip
            if not math.isnan(norm):  # NaN: stepped in backward, no whole gradient
                step["train/grad_norm"] = norm
            step["loss/total"] = step.pop("loss")
            state.updates += 1
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value
            n += 1
    return {key: value / n for key, value in sums.items()}
