"""One command's run from settings to outputs, the same for every command.

A :class:`Session` checks the output-directory rules before any work (a non-empty directory
needs ``--resume`` or ``--overwrite``; ``--resume`` needs a checkpoint and the same settings),
starts the accelerator (processes, engine, precision), and only once every input has been loaded
and checked does :meth:`Session.open` create or empty the directory, write ``config.yaml``, open
the tracker and take over SIGTERM/SIGINT. It writes checkpoints, ``final/`` and
``summary.json``; the main process alone writes, the others wait for it where files matter.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from direct_align.config import settings_of, to_dict
from direct_align.engine.distributed import (
    any_across,
    check_process_count,
    check_resumable,
    gathered_state_dict,
    make_accelerator,
    quiet_unless_main,
    shards,
)
from direct_align.engine.outputs import RunDir, read_state
from direct_align.engine.tracking import NullTracker, Tracker, resident_mb
from direct_align.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Session:
    """The run of one command with settings ``cfg`` (any command's settings dataclass with the
    run settings: ``output_dir``, ``overwrite``, ``report_to``, ...; ``resume`` where the command
    can resume). ``begun``: the run has done work that ``--resume`` continues although it wrote
    no checkpoint of its own yet (PPO's reward-model stage)."""

    def __init__(self, cfg: Any, *, begun: bool = False) -> None:
        self.started, self.rss_at_start = time.time(), resident_mb()  # before any model
        self.cfg = cfg
        self.resuming = bool(getattr(cfg, "resume", False))
        self.run = RunDir(cfg.output_dir)
        self.run.check(resume=self.resuming, overwrite=cfg.overwrite, begun=begun)
        if self.resuming:
            self._check_same_settings()
        self.accelerator: Accelerator | None = None
        self.tracker: Tracker | NullTracker = NullTracker()
        self._signals: list[int] = []
        self._handlers: dict[int, Any] = {}

    # -- before any work --------------------------------------------------------------------------
    def _check_same_settings(self) -> None:
        """``--resume`` continues the same run: only settings declared resumable may differ."""
        saved_path = self.run.path / "config.yaml"
        if not saved_path.exists():
            return
        saved = yaml.safe_load(saved_path.read_text()) or {}
        settings = settings_of(type(self.cfg))
        differs = [f"{k}: {saved[k]!r} → {v!r}" for k, v in to_dict(self.cfg).items()
                   if not settings[k].resumable and k in saved and saved[k] != v]  # fmt: skip
        if differs:
            raise ConfigError(f"--resume: settings differ from {saved_path} ({'; '.join(differs)})")

    def start(self, *, bf16: bool = False, grad_accum: int | None = None,
              unsharded: str | None = None) -> Accelerator:  # fmt: skip
        """The accelerator of the run (one process, or all of a launcher's), checked against
        what the command can do: ``grad_accum`` must deal out evenly among the processes;
        ``unsharded``: the command's name when it cannot run under FSDP. A checkpoint resumes
        only under the engine that wrote it."""
        accelerator = make_accelerator("bf16" if bf16 else "no")
        if unsharded is not None and shards(accelerator):
            raise ConfigError(f"{unsharded} does not run under FSDP yet; use DDP "
                              "(configs/accelerate/ddp.yaml) or LoRA")  # fmt: skip
        if grad_accum is not None:
            check_process_count(grad_accum, accelerator)
        if self.checkpoint_to_resume() is not None:
            check_resumable(self.checkpoint_to_resume(), accelerator)
        quiet_unless_main(accelerator)
        self.accelerator = accelerator
        return accelerator

    @property
    def sharded(self) -> bool:
        """Whether the run shards its model with FSDP."""
        return self.accelerator is not None and shards(self.accelerator)

    @property
    def main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # -- outputs ----------------------------------------------------------------------------------
    def open(self, *, checkpoints: bool = True) -> Tracker | NullTracker:
        """Create (or with --overwrite empty) the output directory, write ``config.yaml``, open
        the tracker (on --resume continuing at the checkpoint's step) and catch stop signals.
        The main process alone writes; the others get a :class:`NullTracker`."""
        self.barrier()
        if self.main:
            self.run.prepare(overwrite=self.cfg.overwrite, checkpoints=checkpoints)
            if not self.resuming:
                (self.run.path / "config.yaml").write_text(
                    yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            checkpoint = self.checkpoint_to_resume()
            resume_step = None  # a new run: keep nothing of an old metrics.jsonl (--overwrite)
            if self.resuming:  # keep the records up to the checkpoint's step (none without one)
                resume_step = read_state(checkpoint)["step"] if checkpoint is not None else -1
            self.tracker = Tracker(self.run.path, report_to=self.cfg.report_to,
                                   project=self.cfg.wandb_project,
                                   run_name=self.cfg.run_name or self.run.path.name,
                                   config=to_dict(self.cfg), resume_step=resume_step)  # fmt: skip
        self.barrier()
        self._handlers = {s: signal.signal(s, lambda signum, _: self._signals.append(signum))
                          for s in STOP_SIGNALS}  # fmt: skip
        return self.tracker

    def close(self) -> None:
        """Close the tracker and give the stop signals back."""
        self.tracker.close()
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self._handlers = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checkpoints and stops --------------------------------------------------------------------
    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint ``--resume`` continues from (None when not resuming)."""
        return self.run.last_checkpoint() if self.resuming else None

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        """The engine's state (weights, optimizer, schedule, RNG) and ``state`` (the loop's)
        under ``checkpoints/step-N``, the oldest beyond ``--save-total-limit`` removed."""
        accelerator = self.accelerator
        return self.run.save_checkpoint(step, lambda d: accelerator.save_state(str(d)),
                                        {"step": step, **state}, keep=self.cfg.save_total_limit,
                                        main=accelerator.is_main_process,
                                        barrier=accelerator.wait_for_everyone)  # fmt: skip

    def stop_requested(self) -> bool:
        """Whether SIGTERM or SIGINT reached any process (all processes decide together)."""
        return any_across(bool(self._signals), self.accelerator)

    def interrupted(self, where: str) -> Interrupted:
        how = f"signal {self._signals[0]}" if self._signals else "a signal to another process"
        return Interrupted(f"stopped by {how} {where}; checkpoint saved, continue with --resume")

    # -- the end ----------------------------------------------------------------------------------
    def save_final(self, prepared: Any, tokenizer: Any, *, inner: str | None = "model",
                   how: str = "adapter") -> Any:  # fmt: skip
        """Write ``final/`` (a Hugging Face model directory with the tokenizer) from the
        prepared model, whole or not at all; under FSDP its weights are gathered first (every
        process must call this). ``inner``: the attribute of the unwrapped model that holds the
        causal LM (None: the model itself); ``how``: a LoRA policy's adapter or merged model.
        Returns the trained model in one piece on the main process, for reports (None in the
        others, and where it was sharded: :meth:`load_final` reads it back)."""
        from direct_align.models.lora import save_final

        self.barrier()
        whole = gathered_state_dict(prepared, self.accelerator, prefix=f"{inner}." if inner else "")
        if not self.main:
            return None
        unwrapped = self.accelerator.unwrap_model(prepared)
        model = getattr(unwrapped, inner) if inner else unwrapped
        tmp = self.run.final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_final(model, tokenizer, tmp, how, whole)
        os.replace(tmp, self.run.final)
        log.info("saved %s", self.run.final)
        return model if whole is None else None

    def load_final(self) -> Any:
        """``final/`` as a causal LM, on this process's device."""
        from direct_align.models.loading import load_causal_lm

        return load_causal_lm(str(self.run.final)).to(self.accelerator.device)

    def finish(self, summary: dict[str, Any], tracked: dict[str, Any] | None = None,
               ) -> dict[str, Any] | None:  # fmt: skip
        """Write ``summary.json`` (with the run's time, memory at start and process count) and
        the tracker's summary (``tracked``, default the summary's numbers); returns the summary
        in the main process and None in the others."""
        if not self.main:
            return None
        summary = {**summary, "processes": self.accelerator.num_processes,
                   "rss_at_start_mb": self.rss_at_start,
                   "runtime_s": round(time.time() - self.started, 1)}  # fmt: skip
        self.tracker.summary(tracked if tracked is not None else summary)
        self.run.write_json("summary.json", summary)
        return summary


def free_memory() -> None:
    """Give back what a model no longer referenced held (the reference after its pass)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
