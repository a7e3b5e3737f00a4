"""The offline preference loop: one readable function on ``accelerate.Accelerator``.

Per optimizer step: ``grad_accum`` micro-batches of pairs (a fixed count, or a token budget),
laid out for one forward each → policy log-prob sums → loss against the cached reference sums →
backward, each micro-batch weighted by its share of the step's pairs (so every step is a mean
over its pairs, whatever the micro-batch sizes) → clip → AdamW → schedule. The data order is
deterministic per (seed, epoch) (:mod:`direct_align.data.batching`), so the position (epoch,
micro-batch) is all a checkpoint needs to resume the exact same sequence of batches.
"""

from __future__ import annotations

import logging
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from direct_align.config import TrainConfig
from direct_align.data import PairDataset
from direct_align.data.batching import Batcher
from direct_align.data.packing import build_batch
from direct_align.distributed import (
    any_across,
    backward,
    configure_deepspeed,
    even_share,
    sum_across,
)
from direct_align.errors import DirectAlignError
from direct_align.evaluate import evaluate_pairs
from direct_align.losses import LOSSES, preference_loss
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import trained_only_checkpoints
from direct_align.outputs import RunDir, read_state
from direct_align.progress import progress
from direct_align.reference import ReferenceLogps
from direct_align.tracking import Tracker

log = logging.getLogger(__name__)
SCHEDULES = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup,
             "constant": get_constant_schedule_with_warmup}  # fmt: skip


class Interrupted(DirectAlignError):
    """Training stopped by a signal after saving a checkpoint."""


@dataclass
class TrainState:
    """Where training is: everything besides weights, optimizer and RNG that resuming needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the data
    micro: int = 0  # micro-batches of this epoch already consumed
    pairs_seen: int = 0
    train_seconds: float = 0.0  # time in optimizer steps (evaluation and checkpoints excluded)


def loss_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The extra settings (label_smoothing, gamma) that the chosen loss accepts."""
    given = {"label_smoothing": cfg.label_smoothing, "gamma": cfg.gamma}
    return {k: v for k, v in given.items() if k in LOSSES[cfg.loss].options}


def total_steps(batcher: Batcher, cfg: TrainConfig) -> int:
    """``--max-steps``, or the optimizer steps of ``--epochs`` passes."""
    return cfg.max_steps or sum(batcher.steps(e, cfg.grad_accum) for e in range(cfg.epochs))


def step_groups(batcher: Batcher, grad_accum: int, state: TrainState) -> Iterator[list[list[int]]]:
    """Yield the micro-batches of each optimizer step from ``state`` on (epochs repeat).

    The caller advances ``state.micro`` by one per micro-batch it trains on (as :func:`fit`
    does), so that ``state`` is always the position to checkpoint; the generator only reads it.
    """
    while True:
        micro = batcher.micro_batches(state.epoch)
        while state.micro < len(micro):
            yield micro[state.micro : state.micro + grad_accum]
        state.epoch, state.micro = state.epoch + 1, 0


class LogWindow:
    """Step metrics summed since the last log line, and the tokens computed since then."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, step_metrics: dict[str, float]) -> None:
        for key, value in step_metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def flush(self, lr: float, epoch: float, device: torch.device) -> dict[str, float]:
        """The window's means as ``train/*`` metrics with throughput and memory; starts anew."""
        logged = {f"train/{k}": v / max(self.steps, 1) for k, v in self.sums.items()}
        logged |= {"train/lr": lr, "train/epoch": epoch,
                   "perf/tokens_per_s": self.tokens / (time.perf_counter() - self.start),
                   "perf/peak_mem_gb": peak_memory_gb(device)}  # fmt: skip
        self.__init__()
        return logged


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def eval_metrics_of(model: PreferenceModel, evals: PairDataset, ref: ReferenceLogps | None, *,
                    cfg: TrainConfig, accelerator: Accelerator,
                    pad_token_id: int) -> dict[str, float]:  # fmt: skip
    """``eval/*`` loss and reward metrics of the held-out pairs (:func:`evaluate_pairs`)."""
    metrics = evaluate_pairs(model, evals, ref, loss=cfg.loss, beta=cfg.beta,
                             loss_kwargs=loss_kwargs(cfg),
                             batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                             layout=cfg.layout, pad_token_id=pad_token_id,
                             device=accelerator.device, autocast=accelerator.autocast,
                             accelerator=accelerator)  # fmt: skip
    return {f"eval/{k}": v for k, v in metrics.items()}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   total: int) -> tuple[torch.optim.Optimizer, Any]:  # fmt: skip
    """AdamW over the trainable parameters (with LoRA: the adapters only) and the configured
    warmup-then-decay schedule over ``total`` optimizer steps."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_ratio * total)
    kwargs = {} if cfg.lr_scheduler == "constant" else {"num_training_steps": total}
    return optimizer, SCHEDULES[cfg.lr_scheduler](optimizer, num_warmup_steps=warmup, **kwargs)


def prepare_training(model: PreferenceModel, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                     cfg: TrainConfig, accelerator: Accelerator,
                     ) -> tuple[Any, torch.optim.Optimizer, dict[str, Any]]:  # fmt: skip
    """The policy and optimizer handed to the engine (DDP, FSDP or DeepSpeed, its settings
    first), the schedule saved with checkpoints; returns (model, optimizer, the keywords
    ``accelerator.load_state`` needs: with LoRA checkpoints hold the adapters alone)."""
    configure_deepspeed(accelerator, cfg.batch_size, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, trained_only_checkpoints(accelerator, model)


def optimizer_step(
    model: PreferenceModel,
    data: PairDataset,
    group: list[list[int]],
    ref: ReferenceLogps | None,
    *,
    cfg: TrainConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    pad_token_id: int,
    loss_options: dict[str, Any],
    step: int,
    run: RunDir,
) -> tuple[dict[str, float], int]:
    """One optimizer step on the micro-batches ``group`` (pair indices into ``data``).

    Each micro-batch's loss is weighted by its share of the step's pairs, so the step is a mean
    over its pairs. ``ref`` holds the reference sums of ``data`` (None: reference-free).
    Returns (the step's pair-weighted metrics with ``grad_norm``, tokens computed). Raises
    :class:`DirectAlignError` on a non-finite loss, before it reaches the weights; ``step`` (the
    step's number) and ``run`` (its last checkpoint) go into that message.
    """
    device = accelerator.device
    n_pairs = sum(map(len, group))
    step_metrics: dict[str, float] = {}
    tokens = 0
    # with several processes each takes its share of the micro-batches (as many passes in
    # each: a short share repeats one with weight 0); DDP averages gradients over the
    # processes, so each loss is scaled back by their count
    local = even_share(group, accelerator)
    scale = accelerator.num_processes
    model.train()
    for k, (index, real) in enumerate(local):
        batch = build_batch(data, index, cfg.layout, pad_token_id).to(device)
        sync = k == len(local) - 1
        with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
            out = model(batch)
            ref_c, ref_r = ref.select(batch.index.cpu()) if ref else (None, None)
            loss, metrics = preference_loss(
                cfg.loss, chosen_logps=out.chosen, rejected_logps=out.rejected,
                ref_chosen_logps=None if ref_c is None else ref_c.to(device),
                ref_rejected_logps=None if ref_r is None else ref_r.to(device),
                chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths,
                beta=cfg.beta, **loss_options,
            )  # fmt: skip
        if any_across(not torch.isfinite(loss), accelerator):
            raise DirectAlignError(
                f"step {step}: the loss is non-finite ({loss.item()} in process "
                f"{accelerator.process_index}); the weights were not updated; last checkpoint: "
                f"{run.last_checkpoint()}"
            )
        weight = len(index) / n_pairs if real else 0.0
        backward(accelerator, loss * weight * scale, last=sync)
        for key, value in {"loss": loss.item(), **metrics}.items():  # the same keys everywhere
            step_metrics[key] = step_metrics.get(key, 0.0) + value * weight
        tokens += batch.num_tokens * real
    totals = sum_across({**step_metrics, "tokens": float(tokens)}, accelerator)
    tokens = int(totals.pop("tokens"))
    step_metrics = totals
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or 1e30)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step_metrics["grad_norm"] = float(grad_norm)
    return step_metrics, tokens


def resident_mb() -> float | None:
    """The process's resident memory now, in MiB (Linux; None where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * resource.getpagesize() / 2**20, 1)


def fit(
    model: PreferenceModel,
    train: PairDataset,
    evals: PairDataset,
    refs: dict[str, ReferenceLogps] | Callable[[PreferenceModel], dict[str, ReferenceLogps]],
    *,
    cfg: TrainConfig,
    accelerator: Accelerator,
    run: RunDir,
    tracker: Tracker,
    pad_token_id: int,
) -> tuple[TrainState, dict[str, float], bool]:
    """Train until the last step or ``max_steps_per_run``.

    ``refs``: the reference sums of the train and eval pairs, or a function that computes them
    from the prepared policy (FSDP, where only the sharded policy exists).

    Returns (state, last eval metrics, finished). Raises :class:`Interrupted` after saving a
    checkpoint on SIGTERM/SIGINT (to any of the processes: all stop at the same step), and
    :class:`DirectAlignError` on a non-finite loss (before it reaches the weights).
    """
    device = accelerator.device
    batcher = Batcher(train, batch_size=cfg.batch_size, seed=cfg.seed, layout=cfg.layout,
                      max_tokens=cfg.max_tokens_per_batch)  # fmt: skip
    total = total_steps(batcher, cfg)
    optimizer, scheduler = make_optimizer(model, cfg, total)
    model, optimizer, load_kwargs = prepare_training(model, optimizer, scheduler, cfg=cfg,
                                                     accelerator=accelerator)  # fmt: skip
    if callable(refs):  # under FSDP: the sharded initial policy scores the pairs, before resuming
        refs = refs(model)

    state = TrainState()
    if cfg.resume:
        checkpoint = run.last_checkpoint()
        accelerator.load_state(str(checkpoint), **load_kwargs)
        state = TrainState(**read_state(checkpoint)["train_state"])
        log.info("resuming from %s (step %d of %d)", checkpoint, state.step, total)

    ref_train, ref_eval = refs.get("train"), refs.get("eval")
    extra = loss_kwargs(cfg)

    def evaluate() -> dict[str, float]:
        metrics = eval_metrics_of(model, evals, ref_eval, cfg=cfg, accelerator=accelerator,
                                  pad_token_id=pad_token_id)  # fmt: skip
        tracker.log(metrics, state.step)
        return metrics

    def checkpoint() -> None:
        run.save_checkpoint(state.step, lambda d: accelerator.save_state(str(d)),
                            {"train_state": asdict(state), "total_steps": total},
                            keep=cfg.save_total_limit, main=accelerator.is_main_process,
                            barrier=accelerator.wait_for_everyone)  # fmt: skip

    stop_signal: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, _: stop_signal.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
    eval_metrics = evaluate() if state.step == 0 else {}
    window = LogWindow()
    steps_this_run = 0
    bar = progress(total=total, initial=state.step, desc=f"train ({cfg.loss})", unit="step",
                   disable=not accelerator.is_main_process)  # fmt: skip
    groups = step_groups(batcher, cfg.grad_accum, state)
    try:
        while state.step < total:
            group = next(groups)
            step_start = time.perf_counter()
            n_pairs = sum(map(len, group))
            step_metrics, tokens = optimizer_step(
                model, train, group, ref_train, cfg=cfg, accelerator=accelerator,
                optimizer=optimizer, scheduler=scheduler, pad_token_id=pad_token_id,
                loss_options=extra, step=state.step + 1, run=run,
            )  # fmt: skip
            window.tokens += tokens
            state.micro += len(group)
            state.step += 1
            state.pairs_seen += n_pairs
            state.train_seconds += time.perf_counter() - step_start
            steps_this_run += 1
            window.add(step_metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{step_metrics['loss']:.3f}",
                            acc=f"{step_metrics['rewards/accuracies']:.2f}", refresh=False)  # fmt: skip

            if state.step % cfg.log_every == 0 or state.step == total:
                tracker.log(window.flush(scheduler.get_last_lr()[0],
                                         state.pairs_seen / len(train), device), state.step)  # fmt: skip
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total:
                eval_metrics = evaluate()
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total:
                checkpoint()
            # a signal may reach the processes at different steps: they decide together
            stopped = any_across(bool(stop_signal), accelerator)
            if stopped or (cfg.max_steps_per_run and steps_this_run >= cfg.max_steps_per_run
                           and state.step < total):  # fmt: skip
                checkpoint()
                if stopped:
                    how = f"signal {stop_signal[0]}" if stop_signal else "a signal to another process"
                    raise Interrupted(f"stopped by {how} at step {state.step}; checkpoint saved, "
                                      "continue with --resume")  # fmt: skip
                log.info("stopping after %d steps in this run (step %d of %d); continue with "
                         "--resume", steps_this_run, state.step, total)  # fmt: skip
                return state, eval_metrics, False
    finally:
        bar.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    eval_metrics = evaluate()
    return state, eval_metrics, True
