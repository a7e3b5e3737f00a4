"""One optimizer step, as every training loop takes it, and nothing of any algorithm.

:func:`make_optimizer` (AdamW and the warmup-then-decay schedule), :func:`prepare` (the engine:
DDP, FSDP or DeepSpeed), :func:`accumulate` (forward and backward over a step's micro-batches:
no_sync, weights, the non-finite guard, sums across processes) and :func:`clipped_step`. The
loop around them is :mod:`direct_align.engine.loop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from direct_align.engine.distributed import (
    any_across,
    backward,
    configure_deepspeed,
    even_share,
    sum_across,  # fmt: skip
)
from direct_align.engine.optim import StepInBackward, make_adamw
from direct_align.engine.tracking import PEAKS_AT, peak_mb
from direct_align.errors import ConfigError, NonFinite

T = TypeVar("T")
SCHEDULES = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup,
             "constant": get_constant_schedule_with_warmup}  # fmt: skip


class Optimization(Protocol):
    """The settings :func:`make_optimizer` reads."""

    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    lr_scheduler: str


# --- optimizer, schedule, engine --------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: Optimization,
                   total: int) -> tuple[torch.optim.Optimizer, Any]:  # fmt: skip
    """AdamW over the parameters that train (with LoRA: the adapters alone) and the configured
    warmup-then-decay schedule over ``total`` optimizer steps. ``--optimizer``, ``--weights``
    and ``--step-in-backward`` choose its states, rounding and timing
    (:mod:`direct_align.engine.optim`).

    Weight decay applies to weight matrices only: biases and normalisation weights (the
    one-dimensional parameters) are left undecayed, as transformers' Trainer does, so
    ``--weight-decay`` means what it means there.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in trainable if p.ndim >= 2]
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = make_adamw([g for g in groups if g["params"]], cfg)
    warmup = round(cfg.warmup_ratio * total)
    kwargs = {} if cfg.lr_scheduler == "constant" else {"num_training_steps": total}
    return optimizer, SCHEDULES[cfg.lr_scheduler](optimizer, num_warmup_steps=warmup, **kwargs)


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
            accelerator: Accelerator, micro_batch_size: int,
            max_grad_norm: float) -> tuple[Any, torch.optim.Optimizer, dict[str, Any]]:  # fmt: skip
    """The model and optimizer handed to the engine (DDP, FSDP or DeepSpeed, its batch and
    clipping settings first). Returns (model, optimizer, the keywords ``accelerator.load_state``
    needs: when only some parameters train, checkpoints hold those alone). The schedule is not
    handed to accelerate, which would pickle it: :class:`Loop` keeps its state as JSON."""
    if isinstance(optimizer, StepInBackward) and accelerator.num_processes > 1:
        raise ConfigError(f"--step-in-backward steps each parameter before the "
                          f"{accelerator.num_processes} processes have averaged its gradient; "
                          "run it in one process")  # fmt: skip
    plain = type(optimizer) is torch.optim.AdamW and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    if not plain and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError("--weights, --optimizer adamw-8bit and --step-in-backward are for one "
                          "process or DDP; FSDP and DeepSpeed hold their own weights and states")  # fmt: skip
    configure_deepspeed(accelerator, micro_batch_size, max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    PEAKS_AT["prepared"] = peak_mb()  # loading and sharding done, no step yet
    return model, optimizer, _trained_only_checkpoints(accelerator, model)


def _trained_only_checkpoints(accelerator: Accelerator, model: nn.Module) -> dict[str, Any]:
    """Make ``accelerator.save_state`` write only the parameters that train, when some do not
    (LoRA: the adapters, not the frozen base, which --model gives back on --resume); loading
    checks that a checkpoint holds exactly this run's trained parameters."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded or all(p.requires_grad for p in model.parameters()):
        return {}  # FSDP and DeepSpeed write checkpoints their own way

    def trained(m: nn.Module) -> set[str]:
        return {name for name, p in m.named_parameters() if p.requires_grad}

    def keep_trained(models: list[nn.Module], weights: list[dict[str, Any]], _: str) -> None:
        for m, state in zip(models, weights):
            for key in set(state) - trained(m):
                del state[key]

    def check_trained(models: list[nn.Module], input_dir: str) -> None:
        for i, m in enumerate(models):
            path = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
            if path.is_file():
                with safe_open(str(path), "pt") as f:
                    keys = set(f.keys())
                if keys != trained(m):
                    raise ConfigError(f"{path}: holds {len(keys)} tensors, not this run's "
                                      f"{len(trained(m))} trained parameters (other --lora-* "
                                      "settings?)")  # fmt: skip

    accelerator.register_save_state_pre_hook(keep_trained)
    accelerator.register_load_state_pre_hook(check_trained)
    return {"strict": False}  # the frozen weights are not in the checkpoint


# --- one optimizer step -------------------------------------------------------------------------


@dataclass
class Forward:
    """What an algorithm's forward of one micro-batch gives :func:`accumulate`."""

    loss: torch.Tensor  # scalar: the micro-batch's mean loss
    metrics: dict[str, float]  # its means (the same keys in every micro-batch)
    tokens: int  # tokens computed


def accumulate(model: nn.Module, local: Sequence[tuple[T, bool]], forward: Callable[[T], Forward],
               weight: Callable[[T], float], *, accelerator: Accelerator,
               ) -> tuple[dict[str, float], int]:  # fmt: skip
    """Forward and backward of this process's micro-batches of one optimizer step.

    ``local``: (micro-batch, real) pairs, as many in every process (DDP and FSDP communicate in
    every backward): a stand-in (real False) keeps the processes in step with weight 0
    (:func:`~direct_align.engine.distributed.even_share`). Each loss is weighted by its
    micro-batch's ``weight`` (pairs, tokens) over the step's total across the processes, and by
    the process count, which DDP's gradient average undoes: the step's gradient is that of the
    weighted mean over all its micro-batches. Gradients are reduced after the last micro-batch
    only. A non-finite loss in any process stops every process before its backward
    (:class:`NonFinite`). Returns (the step's weighted metrics and ``loss``, tokens computed),
    both over all processes.
    """
    weights = [weight(item) if real else 0.0 for item, real in local]
    total = sum_across({"weight": sum(weights)}, accelerator)["weight"]
    scale = accelerator.num_processes
    sums: dict[str, float] = {}
    tokens = 0
    model.train()
    for k, ((item, real), w) in enumerate(zip(local, weights)):
        last = k == len(local) - 1
        with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            out = forward(item)
        if any_across(not torch.isfinite(out.loss), accelerator):
            raise NonFinite(f"the loss is non-finite ({out.loss.item()} in process "
                            f"{accelerator.process_index})")  # fmt: skip
        share = w / total
        backward(accelerator, out.loss * share * scale, last=last)
        for key, value in {"loss": out.loss.item(), **out.metrics}.items():
            sums[key] = sums.get(key, 0.0) + value * share
        tokens += out.tokens * real
    totals = sum_across({**sums, "tokens": float(tokens)}, accelerator)
    return totals, int(totals.pop("tokens"))


def clipped_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 accelerator: Accelerator, max_grad_norm: float) -> float:  # fmt: skip
    """Clip the gradients to ``max_grad_norm`` (0: no clipping, the norm is still measured),
    step the optimizer and the schedule, clear the gradients; returns the norm before clipping
    (NaN with --step-in-backward: each parameter stepped in backward, no whole gradient).
    A non-finite norm (the same in every process: gradients are reduced) raises
    :class:`NonFinite` before the step."""
    if isinstance(getattr(optimizer, "optimizer", optimizer), StepInBackward):
        optimizer.step()  # every parameter stepped in backward, its gradient freed: no norm
        scheduler.step()
        return math.nan
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or 1e30)
    if grad_norm is not None and not math.isfinite(float(grad_norm)):  # DeepSpeed: maybe None
        optimizer.zero_grad(set_to_none=True)
        raise NonFinite(f"the gradient norm is {float(grad_norm)}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def optimizer_step(model: nn.Module, micro_batches: Sequence[T], forward: Callable[[T], Forward], *,
                   accelerator: Accelerator, optimizer: torch.optim.Optimizer, scheduler: Any,
                   max_grad_norm: float, weight: Callable[[T], float] = len,
                   ) -> tuple[dict[str, float], int]:  # fmt: skip
    """One optimizer step of a preference loop: each process's share of ``micro_batches``
    (:func:`~direct_align.engine.distributed.even_share`) through :func:`accumulate`, then
    :func:`clipped_step`. Returns (the step's metrics with ``grad_norm``, tokens computed)."""
    metrics, tokens = accumulate(model, even_share(micro_batches, accelerator), forward,
                                 weight=weight, accelerator=accelerator)  # fmt: skip
    norm = clipped_step(model, optimizer, scheduler, accelerator=accelerator,
                        max_grad_norm=max_grad_norm)  # fmt: skip
    if not math.isnan(norm):  # NaN: stepped in backward, no whole gradient
        metrics["grad_norm"] = norm
    return metrics, tokens
