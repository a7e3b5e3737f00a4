"""One command's run from settings to outputs, the same for every command.

A :class:`Session` checks the output-directory rules before any work (a non-empty directory
needs ``--resume`` or ``--overwrite``; ``--resume`` needs a run to continue, the same settings and
an intact checkpoint), starts the accelerator (processes, engine, precision) and takes over
SIGTERM/SIGINT. Only once every input has been loaded and checked does :meth:`Session.open`
create or empty the directory, write ``config.yaml`` and open the tracker. It writes checkpoints,
``final/`` and ``summary.json``, none of them with a non-finite weight; the main process alone
writes, the others wait for it where files matter.

A stop signal never loses the run: during training the loop stops at the next point where it can
checkpoint (:class:`~direct_align.engine.loop.Loop`); before training (the reference pass) and
after it (the final evaluation) :meth:`Session.check_stop` stops with a state ``--resume``
continues from; while ``final/`` and the summary are written the run finishes and says so.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object

from direct_align import engine
from direct_align.config import settings_of, to_dict
from direct_align.engine.card import model_card, push_to_hub
from direct_align.engine.distributed import (
    any_across,
    check_process_count,
    check_resumable,
    engine_name,
    gathered_state_dict,
    make_accelerator,
    quiet_unless_main,
    shards,
)
from direct_align.engine.outputs import RunDir, read_state, write_atomic, writing
from direct_align.engine.tracking import (
    PEAKS_AT,
    NullTracker,
    Tracker,
    package_versions,
    peak_mb,
    resident_mb,
)
from direct_align.errors import ConfigError, Interrupted, NonFinite

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_UNSET: Any = object()


class Session:
    """The run of one command with settings ``cfg`` (any command's settings dataclass with the
    run settings: ``output_dir``, ``overwrite``, ``report_to``, ...; ``resume`` where the command
    can resume)."""

    def __init__(self, cfg: Any) -> None:
        self.started, self.rss_at_start = time.time(), resident_mb()  # before any model
        argv = engine.invocation if engine.invocation is not None else sys.argv[1:]
        self.command = "direct-align " + shlex.join(argv)
        self.cfg = cfg
        self.inputs: dict[str, Any] = {}
        self.memory: list[dict[str, Any]] | None = None  # per process, when final/ is written
        self.resuming = bool(getattr(cfg, "resume", False))
        self.run = RunDir(cfg.output_dir)
        self.run.check(resume=self.resuming, overwrite=cfg.overwrite)
        if self.resuming:
            self._check_same_settings()
        self.accelerator: Accelerator | None = None
        self.tracker: Tracker | NullTracker = NullTracker()
        self.opened = False
        self._signals: list[int] = []
        self._handlers: dict[int, Any] = {}
        self._resume_from: Any = _UNSET

    # -- before any work --------------------------------------------------------------------------
    def _check_same_settings(self) -> None:
        """``--resume`` continues the same run: only settings declared resumable may differ (the
        output directory among them: a run moved to another disk resumes)."""
        saved_path = self.run.path / "config.yaml"
        if not saved_path.exists():
            return
        saved = yaml.safe_load(saved_path.read_text()) or {}
        settings = settings_of(type(self.cfg))
        differs = [f"{k}: {saved[k]!r} → {v!r}" for k, v in to_dict(self.cfg).items()
                   if not settings[k].resumable and k in saved and saved[k] != v]  # fmt: skip
        if differs:
            raise ConfigError(f"--resume: settings differ from {saved_path} ({'; '.join(differs)})")

    def start(self, *, bf16: bool = False, grad_accum: int | None = None) -> Accelerator:
        """The accelerator of the run (one process, or all of a launcher's), checked against
        what the command can do: ``grad_accum`` must deal out evenly among the processes. A
        checkpoint resumes only under the engine that wrote it. From here on SIGTERM and SIGINT
        stop the run at the next safe point instead of killing it."""
        accelerator = make_accelerator("bf16" if bf16 else "no")
        if grad_accum is not None:
            check_process_count(grad_accum, accelerator)
        if self.checkpoint_to_resume() is not None:
            check_resumable(self.checkpoint_to_resume(), accelerator)
        quiet_unless_main(accelerator)
        self.accelerator = accelerator
        if not self._handlers:
            self._handlers = {s: signal.signal(s, lambda signum, _: self._signals.append(signum))
                              for s in STOP_SIGNALS}  # fmt: skip
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
    def open(self, *, inputs: dict[str, Any] | None = None,
             checkpoints: bool = True) -> Tracker | NullTracker:  # fmt: skip
        """Create (or with --overwrite empty) the output directory, write ``config.yaml`` and
        open the tracker (on --resume continuing at the checkpoint's step), whose config holds
        the settings, ``inputs`` (what identifies the model, data and reference cache) and the
        package versions. The main process alone writes; the others get a
        :class:`NullTracker`."""
        self.inputs = {**(inputs or {}), "versions": package_versions()}
        self.barrier()
        if self.main:
            with writing(self.run.path):
                self.run.prepare(overwrite=self.cfg.overwrite and not self.resuming,
                                 checkpoints=checkpoints)  # fmt: skip
                # on --resume too: the settings it may change (cadence, a moved directory, ...)
                write_atomic(self.run.path / "config.yaml",
                             yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            checkpoint = self.checkpoint_to_resume()
            resume_step = None  # a new run: keep nothing of an old metrics.jsonl (--overwrite)
            if self.resuming:  # keep the records up to the checkpoint's step (none without one)
                resume_step = read_state(checkpoint)["step"] if checkpoint is not None else -1
            self.tracker = Tracker(self.run.path, self.cfg, resume_step=resume_step,
                                   name=self.cfg.run_name or self.run.path.name,
                                   config={**to_dict(self.cfg), "inputs": self.inputs})  # fmt: skip
        self.opened = True
        self.barrier()
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
        """The newest intact checkpoint ``--resume`` continues from (None when not resuming, or
        when the run stopped before its first checkpoint: it starts again from step 0)."""
        if self._resume_from is _UNSET:
            self._resume_from = self.run.intact_checkpoint() if self.resuming else None
        return self._resume_from

    def save_checkpoint(self, step: int, state: dict[str, Any], model: Any = None) -> Path:
        """The engine's state (weights, optimizer, RNG) and ``state`` (the loop's, with the
        schedule) under ``checkpoints/step-N``, the oldest beyond ``--save-total-limit``
        removed; refused when ``model`` holds a non-finite weight."""
        accelerator = self.accelerator
        if model is not None:
            self.check_finite(model, "not checkpointed")
        return self.run.save_checkpoint(step, lambda d: accelerator.save_state(str(d)),
                                        {"step": step, **state}, keep=self.cfg.save_total_limit,
                                        main=accelerator.is_main_process,
                                        barrier=accelerator.wait_for_everyone,
                                        failed_anywhere=lambda f: any_across(f, accelerator))  # fmt: skip

    def check_finite(self, model: Any, what: str) -> None:
        """Raise :class:`NonFinite` when a weight of ``model`` (this process's shard, under
        FSDP) is NaN or infinite in any process; ``what`` says what was not done."""
        bad = next((name for name, p in model.named_parameters()
                    if not torch.isfinite(getattr(p, "_local_tensor", p).detach()).all()), None)  # fmt: skip
        if any_across(bad is not None, self.accelerator):
            where = f" ({bad})" if bad else " (in another process)"
            raise NonFinite(f"the weights hold non-finite values{where}; {what}")

    def stop_requested(self) -> bool:
        """Whether SIGTERM or SIGINT reached any process (all processes decide together)."""
        return any_across(bool(self._signals), self.accelerator)

    def interrupted(self, where: str) -> Interrupted:
        how = f"signal {self._signals[0]}" if self._signals else "a signal to another process"
        return Interrupted(f"stopped by {how} {where}; checkpoint saved, continue with --resume")

    def check_stop(self, where: str) -> None:
        """Outside the training steps (the reference pass): on a stop signal, leave a run that
        ``--resume`` starts again (the output directory and ``config.yaml``; what was computed
        and cached is reused) and raise :class:`Interrupted`."""
        if self.stop_requested():
            if not self.opened:
                self.open()
            how = f"signal {self._signals[0]}" if self._signals else "a signal to another process"
            raise Interrupted(f"stopped by {how} {where}, before any training step; continue "
                              "with --resume (what was computed is cached)")  # fmt: skip

    def note_late_signal(self) -> None:
        """A stop signal that came while the finished run was being written: it completed."""
        if self._signals and self.main:
            log.warning("received signal %d while saving; the run had finished: %s and "
                        "summary.json are complete", self._signals[0], self.run.final)  # fmt: skip

    # -- the end ----------------------------------------------------------------------------------
    def save_final(self, prepared: Any, tokenizer: Any, *, inner: str | None = "model",
                   how: str = "adapter") -> Any:  # fmt: skip
        """Write ``final/`` (a Hugging Face model directory with the tokenizer) from the
        prepared model, whole or not at all, never with a non-finite weight; under FSDP its
        weights are gathered first (every process must call this). ``inner``: the attribute of
        the unwrapped model that holds the causal LM (None: the model itself); ``how``: a LoRA
        policy's adapter or merged model. Returns the trained model in one piece on the main
        process, for reports (None in the others, and where it was sharded: :meth:`load_final`
        reads it back)."""
        from direct_align.models.lora import save_final

        self.check_finite(prepared, "final/ was not written")
        self.barrier()
        self.memory = gather_object([{"process": self.accelerator.process_index,
                                      "rss_at_start_mb": self.rss_at_start,
                                      "peak_when_prepared_mb": PEAKS_AT.get("prepared"),
                                      "peak_rss_mb": peak_mb()}])  # fmt: skip
        whole = gathered_state_dict(prepared, self.accelerator, prefix=f"{inner}." if inner else "")
        if not self.main:
            return None
        unwrapped = self.accelerator.unwrap_model(prepared)
        model = getattr(unwrapped, inner) if inner else unwrapped
        tmp = self.run.final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        note = (f"; the last checkpoint {self.run.last_checkpoint()} is intact: free space, then "
                "run again with --resume")  # fmt: skip
        try:
            with writing(tmp, note):
                save_final(model, tokenizer, tmp, how, whole)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
                   "engine": engine_name(self.accelerator),
                   "rss_at_start_mb": self.rss_at_start,
                   # each process's memory before any model, its peak once the engine held
                   # the model (no step yet) and until final/ was gathered (under FSDP, into
                   # the main process)
                   **({"memory_by_process": self.memory} if self.memory else {}),
                   "runtime_s": round(time.time() - self.started, 1), "inputs": self.inputs}  # fmt: skip
        self.tracker.summary({**(tracked if tracked is not None else summary),
                              "runtime_s": summary["runtime_s"]})  # fmt: skip
        self.run.write_json("summary.json", summary)
        if self.run.final.is_dir():
            self._carry_out(summary)
        self.note_late_signal()
        return summary

    def _carry_out(self, summary: dict[str, Any]) -> None:
        """final/'s model card; then, when asked, final/ to W&B and to the Hub."""
        card = model_card(title=self.cfg.run_name or self.run.path.name, command=self.command,
                          summary=summary, inputs=self.inputs, settings=to_dict(self.cfg),
                          wandb_url=self.tracker.url)  # fmt: skip
        with writing(self.run.final / "README.md"):
            write_atomic(self.run.final / "README.md", card)
        if getattr(self.cfg, "wandb_log_model", False):
            self.tracker.log_model(self.run.final, f"model-{self.cfg.run_name or self.run.path.name}")
        if getattr(self.cfg, "push_to_hub", None):
            url = push_to_hub(self.cfg.push_to_hub, self.run.final)
            log.info("pushed %s to %s", self.run.final, url)


def free_memory() -> None:
    """Give back what a model no longer referenced held (the reference after its pass)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
