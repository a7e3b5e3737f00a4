"""The reward-model loop: one readable function on ``accelerate.Accelerator``.

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` pairs, each one right-padded
``[2B, T]`` forward (chosen rows, then rejected rows) → rewards at the last real tokens →
Bradley-Terry loss → backward, weighted by the micro-batch's share of the step's pairs → clip →
AdamW → warmup + decay schedule. Data order, step counting and the schedule are those of the
preference trainer (:mod:`direct_align.trainer`), so both commands read the same settings alike.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from direct_align.data import PairDataset, collate_pairs
from direct_align.data.batching import Batcher
from direct_align.distributed import (
    NullTracker,
    any_across,
    backward,
    configure_deepspeed,
    even_share,
    sum_across,
)
from direct_align.errors import DirectAlignError
from direct_align.progress import progress
from direct_align.rm.config import RewardConfig
from direct_align.rm.evaluate import RewardEval, evaluate_rm
from direct_align.rm.loss import bradley_terry_loss
from direct_align.rm.model import pair_rewards
from direct_align.tracking import Tracker
from direct_align.trainer import SCHEDULES, LogWindow, TrainState, step_groups, total_steps


def fit_rm(
    model: PreTrainedModel,
    train: PairDataset,
    evals: PairDataset,
    *,
    cfg: RewardConfig,
    accelerator: Accelerator,
    tracker: Tracker | NullTracker,
    pad_token_id: int,
) -> tuple[TrainState, RewardEval, RewardEval]:
    """Train ``model`` in place; returns (state, eval before training, eval after training).

    With several processes each takes its share of every step's micro-batches
    (:func:`direct_align.distributed.my_share`), so the step is the same whatever their count.
    Raises :class:`DirectAlignError` on a non-finite loss, before it reaches the weights.
    """
    device = accelerator.device
    batcher = Batcher(train, batch_size=cfg.batch_size, seed=cfg.seed, layout="padded")
    total = total_steps(batcher, cfg)  # reads max_steps, epochs, grad_accum as `train` does
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)  # fmt: skip
    warmup = round(cfg.warmup_ratio * total)
    kwargs = {} if cfg.lr_scheduler == "constant" else {"num_training_steps": total}
    scheduler = SCHEDULES[cfg.lr_scheduler](optimizer, num_warmup_steps=warmup, **kwargs)
    configure_deepspeed(accelerator, cfg.batch_size, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()

    def evaluate() -> RewardEval:  # every process scores all pairs (replicas are identical)
        result = evaluate_rm(accelerator.unwrap_model(model), evals,
                             batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                             pad_token_id=pad_token_id, device=device,
                             center_coef=cfg.center_rewards_coef, autocast=accelerator.autocast)  # fmt: skip
        tracker.log({f"eval/{k}": v for k, v in result.metrics.items()}, state.step)
        return result

    initial = evaluate()
    window = LogWindow()
    groups = step_groups(batcher, cfg.grad_accum, state)
    with progress(total=total, desc="train (reward model)", unit="step",
                  disable=not accelerator.is_main_process) as bar:  # fmt: skip
        while state.step < total:
            # 1. forward and backward over the step's micro-batches
            group = next(groups)
            step_start = time.perf_counter()
            n_pairs = sum(map(len, group))
            step_metrics, tokens = _forward_backward(model, train, group, cfg=cfg,
                                                     accelerator=accelerator,
                                                     pad_token_id=pad_token_id, step=state.step + 1)  # fmt: skip
            window.tokens += tokens
            state.micro += len(group)
            # 2. clip, step, schedule
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or 1e30)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.pairs_seen += n_pairs
            state.train_seconds += time.perf_counter() - step_start
            step_metrics["grad_norm"] = float(grad_norm)
            window.add(step_metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{step_metrics['loss']:.3f}",
                            acc=f"{step_metrics['rewards/accuracies']:.2f}", refresh=False)  # fmt: skip
            # 3. log and evaluate
            if state.step % cfg.log_every == 0 or state.step == total:
                tracker.log(window.flush(scheduler.get_last_lr()[0],
                                         state.pairs_seen / len(train), device), state.step)  # fmt: skip
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total:
                evaluate()
    final = evaluate()
    return state, initial, final


def _forward_backward(model: PreTrainedModel, train: PairDataset, group: list[list[int]], *,
                      cfg: RewardConfig, accelerator: Accelerator, pad_token_id: int,
                      step: int) -> tuple[dict[str, float], int]:  # fmt: skip
    """Forward and backward of this process's share of the micro-batches ``group`` (pair
    indices into ``train``; :func:`even_share`); returns (the step's pair-weighted metrics
    summed over the processes, tokens of all processes). Each loss is weighted by its share of
    the step's pairs and scaled by the process count, which DDP's gradient averaging undoes."""
    n_pairs = sum(map(len, group))
    local = even_share(group, accelerator)
    scale = accelerator.num_processes
    step_metrics: dict[str, float] = {}
    tokens = 0
    model.train()
    for k, (index, real) in enumerate(local):
        batch = collate_pairs(train, index, pad_token_id).to(accelerator.device)
        sync = k == len(local) - 1
        with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
            chosen, rejected = pair_rewards(model, batch)
            loss, metrics = bradley_terry_loss(chosen, rejected,
                                               center_coef=cfg.center_rewards_coef)  # fmt: skip
        if any_across(not torch.isfinite(loss), accelerator):
            raise DirectAlignError(f"step {step}: the loss is {loss.item()} in process "
                                   f"{accelerator.process_index} (non-finite); the weights were "
                                   "not updated")  # fmt: skip
        weight = len(index) / n_pairs * real  # a stand-in (not real) only keeps DDP in step
        backward(accelerator, loss * weight * scale, last=sync)
        for key, value in {"loss": loss.item(), **metrics}.items():
            step_metrics[key] = step_metrics.get(key, 0.0) + value * weight
        tokens += int(batch.attention_mask.sum()) * real
    totals = sum_across({**step_metrics, "tokens": float(tokens)}, accelerator)
    return totals, int(totals.pop("tokens"))
