"""What every training loop keeps, and nothing of any algorithm.

One small object, :class:`Loop`, owns its state (the step and the algorithm's own counters),
resume, the log/eval/save cadence, checkpoints, ``--max-steps-per-run`` and the stop on
SIGTERM/SIGINT. Each algorithm writes its own loop function with it and the step functions of
:mod:`direct_align.engine.step` (:mod:`direct_align.preference.offline`, ``.online``,
:mod:`direct_align.rm.loop`, :mod:`direct_align.ppo.loop`), readable top to bottom.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from accelerate import Accelerator
from torch import nn

from direct_align.engine.distributed import shards
from direct_align.engine.outputs import read_state
from direct_align.engine.tracking import peak_memory_gb, progress
from direct_align.engine.unshard import load_unsharded, written_sharded
from direct_align.errors import ConfigError, DirectAlignError, NonFinite, one_line

log = logging.getLogger(__name__)
def _check_rng_restored(checkpoint: Path, process: int) -> None:
    """accelerate restores the RNG states of a checkpoint but goes on silently when it cannot
    (a damaged or planted file), and the run would then draw other batches and samples: read
    them again, as safely (weights_only), and check the torch generator is theirs."""
    from accelerate.utils import load

    states = load(checkpoint / f"random_states_{process}.pkl")
    if not torch.equal(torch.get_rng_state(), states["torch_manual_seed"]):
        raise RuntimeError(f"random_states_{process}.pkl was not restored")


# --- the loop's state, cadence and stops ----------------------------------------------------------


class State(Protocol):
    """An algorithm's loop state: a dataclass with ``step`` (the unit of the cadence)."""

    step: int


S = TypeVar("S", bound=State)


class Cadence(Protocol):
    """The settings :class:`Loop` reads."""

    log_every: int
    eval_every: int
    save_every: int
    save_total_limit: int
    max_steps_per_run: int | None


@dataclass
class EpochState:
    """The state of a loop over epochs of micro-batches (offline preference, reward model):
    ``epoch`` and ``micro`` are the data position a checkpoint resumes from."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the data
    micro: int = 0  # micro-batches of this epoch already consumed
    pairs_seen: int = 0  # pairs trained on, counted again in every epoch
    train_seconds: float = 0.0  # time in optimizer steps (evaluation and checkpoints excluded)


class LogWindow:
    """Step metrics summed since the last log line, and the tokens computed since then."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, step_metrics: dict[str, float], tokens: int = 0) -> None:
        for key, value in step_metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.tokens += tokens

    def flush(self, device: torch.device) -> dict[str, float]:
        """The window's means as ``train/*`` metrics with throughput and memory; starts anew."""
        logged = {f"train/{k}": v / max(self.steps, 1) for k, v in self.sums.items()}
        logged |= {"perf/tokens_per_s": self.tokens / (time.perf_counter() - self.start),
                   "perf/peak_mem_gb": peak_memory_gb(device)}  # fmt: skip
        self.__init__()
        return logged


class Loop(Generic[S]):
    """The state every training loop keeps, and when to log, evaluate, save and stop.

    ``state``: the algorithm's dataclass (``step`` counts the unit of ``total`` and of the
    cadence: optimizer steps, or PPO's rollouts); it is what a checkpoint stores besides the
    engine's weights, optimizer, schedule and RNG, under ``state_key``. The loop function calls
    :meth:`step` around each unit of work and :meth:`boundary` wherever a checkpoint can be
    taken (after every step offline, after a round online); cadences fire when a boundary
    passes a multiple of their setting, so they work when boundaries are several steps apart.
    """

    def __init__(self, session: Any, state: S, *, model: nn.Module, scheduler: Any, total: int,
                 cfg: Cadence, desc: str, state_key: str = "train_state", unit: str = "step",
                 until: Callable[[S], bool] | None = None) -> None:  # fmt: skip
        self.session = session
        self.accelerator: Accelerator = session.accelerator
        self.model, self.scheduler = model, scheduler
        self.state = state
        self.total = total  # steps in the schedule
        self.cfg = cfg
        self.state_key = state_key
        self.window = LogWindow()
        self.bar: Any = None
        self.last_step_seconds = 0.0
        self._desc, self._unit = desc, unit
        self._until = until or (lambda st: st.step >= total)
        self._steps_at_start = 0
        self._last_boundary = 0
        self._saved: dict[str, Any] | None = None  # the state of the last checkpoint

    # -- resume ---------------------------------------------------------------------------------
    def resume(self, load_kwargs: dict[str, Any] | None = None) -> bool:
        """On ``--resume``: weights, optimizer, schedule and RNG from the last checkpoint, and
        the state; returns whether it resumed."""
        checkpoint = self.session.checkpoint_to_resume()
        if checkpoint is None:
            return False
        try:
            if written_sharded(checkpoint) and not shards(self.accelerator):
                load_unsharded(checkpoint, self.accelerator)  # FSDP's shards, read whole
            else:
                self.accelerator.load_state(str(checkpoint), **(load_kwargs or {}))
            _check_rng_restored(checkpoint, self.accelerator.process_index)
        except (RuntimeError, ValueError, OSError, KeyError, pickle.UnpicklingError) as e:
            raise ConfigError(f"--resume: cannot load {checkpoint}: {one_line(e)}") from None
        stored = read_state(checkpoint)
        saved = stored[self.state_key]
        self.state = type(self.state)(**saved)
        self.scheduler.load_state_dict(stored["scheduler"])
        self._steps_at_start = self._last_boundary = self.state.step
        self._saved = saved
        log.info("resuming from %s (%s %d of %d)", checkpoint, self._unit, self.state.step,
                 self.total)  # fmt: skip
        return True

    # -- running ----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._until(self.state)

    @property
    def unsaved(self) -> bool:
        """Whether the state moved since the last checkpoint (or the start)."""
        return asdict(self.state) != (self._saved or asdict(type(self.state)()))

    @contextmanager
    def running(self, total: int | None = None, initial: int | None = None,
                unit: str | None = None) -> Iterator[Loop[S]]:  # fmt: skip
        """The progress bar around the loop (by default in steps; ``total``, ``initial`` and
        ``unit`` count something else, e.g. online rounds)."""
        self.bar = progress(total=self.total if total is None else total,
                            initial=self.state.step if initial is None else initial,
                            desc=self._desc, unit=unit or self._unit,
                            disable=not self.accelerator.is_main_process)  # fmt: skip
        try:
            yield self
        finally:
            self.bar.close()

    @contextmanager
    def step(self) -> Iterator[None]:
        """Around one unit of work: counts it and its time; a :class:`NonFinite` inside becomes
        an error that names the step and the last checkpoint (the weights were not updated)."""
        start = time.perf_counter()
        try:
            yield
        except NonFinite as e:
            where = self.session.run.last_checkpoint()
            raise DirectAlignError(f"{self._unit} {self.state.step + 1}: {e}; the weights were "
                                   f"not updated; last checkpoint: {where}") from None  # fmt: skip
        self.state.step += 1
        self.last_step_seconds = time.perf_counter() - start
        if hasattr(self.state, "train_seconds"):
            self.state.train_seconds += self.last_step_seconds

    def record(self, metrics: dict[str, float], tokens: int, **shown: float) -> None:
        """A step's metrics into the log window, and the progress bar one step on, showing
        ``shown`` (e.g. ``loss=...``)."""
        self.window.add(metrics, tokens)
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)

    def log_train(self, extra: dict[str, float]) -> None:
        """When ``log_every`` is due (and at the last step): the window's means, throughput and
        memory, with ``extra`` (e.g. the learning rate), to the tracker."""
        if self.log_due():
            self.session.tracker.log(self.window.flush(self.accelerator.device) | extra,
                                     self.state.step)  # fmt: skip

    def eval_due(self) -> bool:
        """Evaluations run every ``eval_every`` steps; the final one is the loop function's."""
        return self.due(self.cfg.eval_every) and not self.finished

    def due(self, every: int) -> bool:
        """Whether the steps since the last boundary passed a multiple of ``every`` (0: never)."""
        return bool(every) and self.state.step // every > self._last_boundary // every

    def log_due(self) -> bool:
        """Train metrics are logged every ``log_every`` steps and at the last."""
        return self.due(self.cfg.log_every) or self.finished

    def boundary(self) -> bool:
        """A point where a checkpoint can be taken: save when ``save_every`` is due; on a stop
        signal (to any process: all stop at the same step) save and raise :class:`Interrupted`;
        when this invocation's ``max_steps_per_run`` are done, save and return True (stop)."""
        save = self.due(self.cfg.save_every) and not self.finished
        self._last_boundary = self.state.step
        stop = self.session.stop_requested()
        done_here = self.state.step - self._steps_at_start
        pause = bool(self.cfg.max_steps_per_run) and done_here >= self.cfg.max_steps_per_run
        pause = pause and not self.finished
        if save or stop or pause:
            self.checkpoint()
        if stop:
            raise self.session.interrupted(f"at {self._unit} {self.state.step}")
        if pause:
            log.info("stopping after %d %ss in this run (%d of %d); continue with --resume",
                     done_here, self._unit, self.state.step, self.total)  # fmt: skip
        return pause

    def checkpoint(self) -> Path:
        """Save the engine's state, this loop's and the schedule's under ``checkpoints/step-N``
        (refused, with :class:`NonFinite`, when a weight is not finite)."""
        try:
            path = self.session.save_checkpoint(
                self.state.step, {self.state_key: asdict(self.state), "total_steps": self.total,
                                  "scheduler": _plain(self.scheduler.state_dict())},
                model=self.model)  # fmt: skip
        except NonFinite as e:
            raise self._failure(e) from None
        self._saved = asdict(self.state)
        return path

    def stop_if_requested(self, where: str) -> None:
        """After the last step (the final evaluation): on a stop signal, checkpoint what is not
        saved yet and raise :class:`~direct_align.errors.Interrupted`; ``--resume`` then
        evaluates and saves the final model."""
        if self.session.stop_requested():
            if self.unsaved:
                self.checkpoint()
            raise self.session.interrupted(where)

    def check_eval(self, loss: float) -> None:
        """A held-out loss that is not finite means the weights diverged: stop before they are
        checkpointed or saved."""
        if not math.isfinite(loss):
            raise self._failure(NonFinite(f"the held-out loss is {loss}: the weights diverged "
                                          "(a lower learning rate?); nothing of them was saved"))  # fmt: skip

    def _failure(self, e: NonFinite) -> DirectAlignError:
        where = self.session.run.last_checkpoint()
        return DirectAlignError(f"{self._unit} {self.state.step}: {e}; last checkpoint: {where}")


def _plain(value: Any) -> Any:
    """``value`` with its one-element tensors as numbers, for JSON (torchao's optimizers keep
    the learning rate as a tensor, and the schedule's state holds it)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and hasattr(value, "numel") else value
