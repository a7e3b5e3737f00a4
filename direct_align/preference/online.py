"""Online DPO: the policy samples, a judge scores, the policy learns from its own fresh pairs.

As in online AI-feedback DPO (Guo et al. 2024) and iterative DPO (Xiong et al. 2024), each
round of :func:`fit_online`:

1. takes the next ``prompts_per_round`` prompts (a seeded permutation, repeated when used up);
2. samples ``k = samples_per_prompt`` responses per prompt from the current policy (batched
   ``generate`` with a KV cache; temperature, top-p, ``max_new_tokens``);
3. scores every response with the judge (:mod:`direct_align.rewards`): ``k`` judge calls per
   prompt, where a *judge call* is one response scored;
4. pairs the best response of each prompt against its worst, or with ``pair_margin`` every two
   whose rewards differ by more than it; a prompt whose responses all tie gives no pair;
5. computes the reference log-probs of the fresh pairs with the reference model held in memory,
   or with LoRA the policy with its adapters off (none for reference-free losses such as SimPO
   and ORPO); with ``refresh_reference`` the policy as the round starts scores them instead,
   so each round's loss is relative to the last round's policy (iterative DPO, Xiong et al.
   2024) while evaluations still measure KL to the initial reference;
6. trains ``epochs`` passes over the round's pairs, in optimizer steps of ``batch_size ×
   grad_accum`` pairs (:func:`direct_align.preference.offline.train_step`, as offline).

A checkpoint at a round's end holds the weights, optimizer, schedule and RNG states; the data
of a round is a function of (seed, round), so ``--resume`` continues with the very same rounds.
Checkpoints, evaluations, ``--max-steps-per-run`` and stop signals take effect at a round's end
(when a round's steps pass a multiple of their setting). A judge that fails stops the run after
the last round's work is checkpointed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from direct_align.data import PairDataset
from direct_align.data.prompts import Prompts
from direct_align.engine.loop import Loop
from direct_align.engine.session import Session
from direct_align.engine.step import make_optimizer, prepare
from direct_align.generation import sample_and_judge
from direct_align.group_losses import GROUP_LOSSES
from direct_align.losses import LOSSES
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import AdaptersOff
from direct_align.preference.evaluate import Probe, held_out_evaluation
from direct_align.preference.reference import ReferenceLogps
from direct_align.preference.round_work import round_work, sample_rows
from direct_align.preference.settings import TrainConfig
from direct_align.rewards import JudgeError, Rewards

log = logging.getLogger(__name__)


@dataclass
class OnlineState:
    """Where online training is: everything besides weights, optimizer and RNG that resuming needs."""

    round: int = 0  # rounds done
    step: int = 0  # optimizer steps done
    pairs: int = 0  # pairs made from judged samples (KTO: thumbs; a group loss: prompts' groups)
    pairs_seen: int = 0  # pairs (thumbs, groups) trained on, counted once per epoch
    judge_calls: int = 0  # responses scored
    tokens_generated: int = 0  # response tokens sampled
    train_seconds: float = 0.0


def round_prompts(n: int, per_round: int, seed: int, round_index: int) -> list[int]:
    """Indices of the prompts of round ``round_index``: consecutive slices of seeded
    permutations of ``range(n)``, a new permutation each time the prompts are used up."""
    out: list[int] = []
    position = round_index * per_round
    while len(out) < per_round:
        cycle, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + cycle))
        take = order[offset : offset + per_round - len(out)].tolist()
        out += take
        position += len(take)
    return out


def steps_per_round(cfg: TrainConfig) -> int:
    """The most optimizer steps one round can take: each prompt giving its most pairs (a pair
    loss), its k thumbs (KTO) or itself with its k samples (a group loss)."""
    k = cfg.samples_per_prompt
    if cfg.loss in GROUP_LOSSES:
        items = cfg.prompts_per_round
    elif LOSSES[cfg.loss].unpaired:
        items = cfg.prompts_per_round * k
    else:
        items = cfg.prompts_per_round * (1 if cfg.pair_margin is None else k * (k - 1) // 2)
    return cfg.epochs * math.ceil(math.ceil(items / cfg.batch_size) / cfg.grad_accum)


def fit_online(
    policy: PreferenceModel,
    reference: PreferenceModel | AdaptersOff | None,
    prompts: Prompts,
    rewards: Rewards,
    evals: PairDataset | None,
    ref_eval: ReferenceLogps | Callable[[PreferenceModel], ReferenceLogps] | None,
    *,
    tokenizer: Any,
    cfg: TrainConfig,
    session: Session,
    probe: Probe | None = None,
) -> tuple[OnlineState, dict[str, float], Any, bool]:
    """Train for ``cfg.rounds`` rounds (see the module docstring), or until
    ``--max-steps-per-run`` steps in this invocation (at a round's end). Returns (state, the
    last eval metrics, the prepared policy, finished).

    The learning-rate schedule is laid out over the most steps the rounds can take; rounds that
    give fewer pairs (ties) end it early. A stop signal takes effect at the end of the round,
    with a checkpoint. Raises :class:`~direct_align.rewards.JudgeError` after checkpointing the
    rounds done, and DirectAlignError on a non-finite loss.
    """
    accelerator, tracker, device = session.accelerator, session.tracker, session.accelerator.device
    pad = tokenizer.pad_token_id
    total = cfg.rounds * steps_per_round(cfg)
    optimizer, scheduler = make_optimizer(policy, cfg, total)
    model, optimizer, load_kwargs = prepare(policy, optimizer, scheduler, accelerator=accelerator,
                                            micro_batch_size=cfg.batch_size,
                                            max_grad_norm=cfg.max_grad_norm)  # fmt: skip
    if callable(ref_eval):  # under FSDP: scored by the sharded initial policy, before resuming
        ref_eval = ref_eval(model)
    loop = Loop(session, OnlineState(), model=model, scheduler=scheduler, total=total, cfg=cfg,
                desc=f"online ({cfg.loss})", state_key="online_state",
                until=lambda st: st.round >= cfg.rounds)  # fmt: skip
    loop.resume(load_kwargs)
    state = loop.state
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size

    evaluate = held_out_evaluation(loop, model, evals, ref_eval, cfg=cfg, session=session,
                                   pad_token_id=pad, probe=probe)  # fmt: skip

    eval_now = evaluate() if state.round == 0 else {}
    k = cfg.samples_per_prompt
    with loop.running(total=cfg.rounds, initial=state.round, unit="round"):
        while not loop.finished:
            # 1-3. this round's prompts, k samples each from the current policy, all judged: k
            #      calls a prompt (with several processes each takes its share of the prompts)
            index = round_prompts(len(prompts), cfg.prompts_per_round, cfg.seed, state.round)
            texts = [prompts.texts[i] for i in index]
            prompt_ids = [prompts.ids[i] for i in index]
            lm = accelerator.unwrap_model(model).model
            try:
                responses, scores, judge_metrics = sample_and_judge(
                    lm, rewards, texts, prompt_ids, tokenizer=tokenizer, cfg=cfg,
                    accelerator=accelerator, batch_size=eval_batch * 2,
                    seed=cfg.seed * 100_003 + state.round, root=model)  # fmt: skip
            except JudgeError as e:
                raise _judge_failed(e, loop) from None
            ended = [bool(r) and r[-1] == tokenizer.eos_token_id for r in responses]
            state.judge_calls += len(responses)
            state.tokens_generated += sum(map(len, responses))
            # 4-5. what the loss learns from (pairs, thumbs or whole groups), with the
            #      reference's (and the sampling policy's) log-probs
            work = round_work(model, reference, prompt_ids, responses, scores, cfg=cfg,
                              accelerator=accelerator, pad_token_id=pad,
                              bos_id=tokenizer.bos_token_id)  # fmt: skip
            state.pairs += len(work.data)
            tracker.log_table("online/pairs", sample_rows(texts, responses, scores, k, work.triples,
                                                          tokenizer, cfg.log_generations),
                              state.step)  # fmt: skip
            # 6. optimizer steps on the round's pairs, thumbs or groups
            for epoch in range(cfg.epochs if len(work.data) else 0):
                micro = work.micro_batches(state.round, epoch)
                for start in range(0, len(micro), cfg.grad_accum):
                    group = micro[start : start + cfg.grad_accum]
                    with loop.step():
                        metrics, tokens = work.step(model, group, accelerator=accelerator,
                                                    optimizer=optimizer, scheduler=scheduler,
                                                    pad_token_id=pad)  # fmt: skip
                    state.pairs_seen += sum(map(len, group))
                    loop.window.add(metrics, tokens)
            state.round += 1
            # 7. log the round; evaluate, checkpoint, stop (signals, --max-steps-per-run)
            logged = {f"online/{key}": v for key, v in judge_metrics.items()}
            logged |= {"online/round": state.round, "online/judge_calls": state.judge_calls,
                       "online/pairs": len(work.data),
                       "online/prompts_without_pair": len(texts) - work.prompts_used,
                       "online/response_tokens": sum(map(len, responses)) / len(responses),
                       "online/missing_eos": 1 - sum(ended) / len(ended)}  # fmt: skip
            if loop.window.steps:
                logged |= loop.window.flush(device) | {"train/lr": scheduler.get_last_lr()[0],
                                                       "train/epoch": state.round}  # fmt: skip
            tracker.log(logged, state.step)
            loop.bar.update(1)
            loop.bar.set_postfix(reward=f"{judge_metrics['reward/total']:.3f}", pairs=len(work.data),
                                 refresh=False)  # fmt: skip
            if loop.eval_due():
                eval_now = evaluate()
            if loop.boundary():
                return state, eval_now, model, False
    final = evaluate() or eval_now
    loop.stop_if_requested(f"after round {state.round}")
    return state, final, model, True


def _judge_failed(error: JudgeError, loop: Loop[OnlineState]) -> JudgeError:
    """The judge's error, after checkpointing the rounds done since the last checkpoint."""
    state = loop.state
    if loop.unsaved:
        loop.checkpoint()
    where = loop.session.run.last_checkpoint()
    if where is None:
        note = "no round was trained; nothing to checkpoint"
    else:
        note = f"rounds done: {state.round}, checkpoint {where} (fix the judge, then --resume)"
    return JudgeError(f"round {state.round + 1}: {error}; {note}")
