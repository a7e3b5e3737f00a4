"""The reward-model loop, read top to bottom.

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` pairs, each one right-padded
``[2B, T]`` forward (chosen rows, then rejected rows) → rewards at the last real tokens →
Bradley-Terry loss → backward, weighted by the micro-batch's share of the step's pairs → clip →
AdamW → warmup + decay schedule. Data order, step counting, the schedule, checkpoints and resume
are those of the preference loop (the engine's pieces), so both commands read the same settings
alike.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedModel

from direct_align.data import PairDataset, collate_pairs
from direct_align.data.batching import Batcher
from direct_align.engine.distributed import even_share
from direct_align.engine.loop import EpochState, Loop
from direct_align.engine.session import Session
from direct_align.engine.step import Forward, accumulate, clipped_step, make_optimizer, prepare
from direct_align.rm.evaluate import RewardEval, evaluate_rm
from direct_align.rm.loss import bradley_terry_loss
from direct_align.rm.model import pair_rewards
from direct_align.rm.settings import RewardConfig


def fit_rm(model: PreTrainedModel, train: PairDataset, evals: PairDataset, *, cfg: RewardConfig,
           session: Session, pad_token_id: int,
           ) -> tuple[EpochState, RewardEval, RewardEval | None, Any]:  # fmt: skip
    """Train ``model``; returns (state, eval before training, eval after training (None when
    stopped early by ``--max-steps-per-run``), the prepared model).

    With several processes each takes its share of every step's micro-batches, so the step is
    the same whatever their count. Raises :class:`~direct_align.errors.Interrupted` after a
    checkpoint on SIGTERM/SIGINT, and DirectAlignError on a non-finite loss.
    """
    accelerator, tracker, device = session.accelerator, session.tracker, session.accelerator.device
    batcher = Batcher(train, batch_size=cfg.batch_size, seed=cfg.seed, layout="padded")
    total = batcher.total_steps(cfg.epochs, cfg.grad_accum, cfg.max_steps)
    optimizer, scheduler = make_optimizer(model, cfg, total)
    model, optimizer, load_kwargs = prepare(model, optimizer, scheduler, accelerator=accelerator,
                                            micro_batch_size=cfg.batch_size,
                                            max_grad_norm=cfg.max_grad_norm)  # fmt: skip
    loop = Loop(session, EpochState(), model=model, scheduler=scheduler, total=total, cfg=cfg,
                desc="train (reward model)")

    def evaluate(log: bool = True) -> RewardEval:  # every process scores all pairs
        result = evaluate_rm(accelerator.unwrap_model(model), evals,
                             batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                             pad_token_id=pad_token_id, device=device,
                             center_coef=cfg.center_rewards_coef, autocast=accelerator.autocast)  # fmt: skip
        loop.check_eval(result.metrics["loss"])
        if loop.finished and log:  # the final evaluation: a stop signal now checkpoints first
            loop.stop_if_requested(f"at step {loop.state.step}, during the final evaluation")
        if log:
            tracker.log({f"eval/{k}": v for k, v in result.metrics.items()}, loop.state.step)
        return result

    # the fresh head (seeded), before a resume loads the trained weights: logged once, at step 0
    initial = evaluate(log=not session.resuming)
    loop.resume(load_kwargs)
    state = loop.state

    def forward(index: list[int]) -> Forward:
        batch = collate_pairs(train, index, pad_token_id).to(device)
        chosen, rejected = pair_rewards(model, batch)
        loss, metrics = bradley_terry_loss(chosen, rejected, center_coef=cfg.center_rewards_coef)
        return Forward(loss, metrics, int(batch.attention_mask.sum()))

    groups = batcher.step_groups(cfg.grad_accum, state)
    with loop.running():
        while not loop.finished:
            # 1. forward and backward over the step's micro-batches; clip, step, schedule
            group = next(groups)
            with loop.step():
                metrics, tokens = accumulate(model, even_share(group, accelerator), forward,
                                             weight=len, accelerator=accelerator)  # fmt: skip
                norm = clipped_step(model, optimizer, scheduler, accelerator=accelerator,
                                    max_grad_norm=cfg.max_grad_norm)  # fmt: skip
                if not math.isnan(norm):  # NaN: stepped in backward, no whole gradient
                    metrics["grad_norm"] = norm
            state.micro += len(group)
            state.pairs_seen += sum(map(len, group))
            loop.record(metrics, tokens, loss=metrics["loss"], acc=metrics["rewards/accuracies"])
            # 2. log, evaluate, checkpoint, stop
            loop.log_train({"train/lr": scheduler.get_last_lr()[0],
                            "train/epoch": state.pairs_seen / len(train)})  # fmt: skip
            if loop.eval_due():
                evaluate()
            if loop.boundary():
                return state, initial, None, model
    return state, initial, evaluate(), model
