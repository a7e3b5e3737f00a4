"""A toy command on the engine: least squares with a linear model, its minibatches drawn from the
global RNG (so resuming must restore it), written the way every algorithm's loop is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from direct_align import settings as s
from direct_align.config import Setting
from direct_align.engine.distributed import even_share
from direct_align.engine.loop import Loop
from direct_align.engine.session import Session
from direct_align.engine.step import Forward, accumulate, clipped_step, make_optimizer, prepare


@dataclass
class ToyConfig(s.OptimSettings, s.RunSettings):
    """The run settings every training command has, and the toy's own step count."""

    steps: int = Setting(int, 10, "Optimizer steps.").field()
    learning_rate: float = s.LEARNING_RATE.field(default=0.05)
    eval_every: int = s.EVAL_EVERY.field(default=0)
    save_every: int = s.SAVE_EVERY.field(default=0)

    builtin_preset: ClassVar[dict[str, Any]] = {}

    def complete(self) -> None:
        pass

    def checks(self) -> list[tuple[bool, str]]:
        return []


@dataclass
class ToyState:
    step: int = 0
    rows_seen: int = 0
    train_seconds: float = 0.0


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(64, 1, generator=g)


def run_toy(cfg: ToyConfig, *, on_step: Callable[[Loop], None] | None = None,
            loss_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
            eval_loss: Callable[[int], float] = lambda step: 1.0,
            ) -> tuple[nn.Module, list[tuple[str, int]], bool]:  # fmt: skip
    """Train the toy; returns (model, the (event, step) it logged, evaluated and saved at,
    finished). ``eval_loss(step)``: the held-out loss its evaluations report."""
    x, y = toy_data()
    events: list[tuple[str, int]] = []
    with Session(cfg) as session:
        accelerator = session.start()
        torch.manual_seed(1)
        model = nn.Linear(4, 1)
        session.open()
        optimizer, scheduler = make_optimizer(model, cfg, cfg.steps)
        model, optimizer, load_kwargs = prepare(model, optimizer, scheduler,
                                                accelerator=accelerator, micro_batch_size=4,
                                                max_grad_norm=cfg.max_grad_norm)  # fmt: skip
        loop = Loop(session, ToyState(), model=model, scheduler=scheduler, total=cfg.steps, cfg=cfg,
                    desc="toy")
        loop.resume(load_kwargs)
        state = loop.state

        def forward(rows: torch.Tensor) -> Forward:
            loss = ((model(x[rows]) - y[rows]) ** 2).mean()
            return Forward(loss if loss_of is None else loss_of(loss), {"mse": loss.item()}, len(rows))

        with loop.running():
            while not loop.finished:
                rows = torch.randint(0, 64, (8,))  # the global RNG: restored on resume
                micro = [rows[:3], rows[3:]]  # uneven micro-batches
                with loop.step():
                    metrics, tokens = accumulate(model, even_share(micro, accelerator), forward,
                                                 weight=len, accelerator=accelerator)  # fmt: skip
                    metrics["grad_norm"] = clipped_step(model, optimizer, scheduler,
                                                        accelerator=accelerator,
                                                        max_grad_norm=cfg.max_grad_norm)  # fmt: skip
                state.rows_seen += len(rows)
                loop.record(metrics, tokens, mse=metrics["mse"])
                if on_step is not None:
                    on_step(loop)
                if loop.log_due():
                    events.append(("log", state.step))
                loop.log_train({"train/rows": state.rows_seen})
                if loop.eval_due():
                    events.append(("eval", state.step))
                    loop.check_eval(eval_loss(state.step))
                saved = session.run.last_checkpoint()
                stop = loop.boundary()
                if session.run.last_checkpoint() != saved:
                    events.append(("save", state.step))
                if stop:
                    return accelerator.unwrap_model(model), events, False
        loop.check_eval(eval_loss(state.step))  # the final evaluation
        loop.stop_if_requested(f"at step {state.step}, during the final evaluation")
        return accelerator.unwrap_model(model), events, True
