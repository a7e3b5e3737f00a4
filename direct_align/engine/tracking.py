"""Where a run's numbers go: ``metrics.jsonl``, Weights & Biases, progress bars, console tables,
and the memory probes behind ``perf/peak_mem_gb``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from direct_align.engine.outputs import write_atomic, writing
from direct_align.errors import ConfigError


class Tracker:
    """Writes each logged step to ``metrics.jsonl`` and, with ``--report-to wandb``, to W&B.

    On resume, records past the checkpoint's step are dropped so that the file reads as one run,
    and so is a line a crash left half-written. A record is written whole or not at all: on a
    full disk the file is cut back to its last whole record. Tables of sample generations also
    go to ``generations.jsonl``.

    W&B: the run is named ``run_name`` (the output directory's name by default), in the project
    of ``--wandb-project``, else ``$WANDB_PROJECT``, else ``direct-align``; group, tags and notes
    come from their flags or the usual ``WANDB_*`` variables. ``--resume`` continues the same W&B
    run when nothing was logged past the checkpoint; otherwise (a kill after the checkpoint) the
    history, which W&B cannot rewind, continues in a new run named ``NAME-resumed-STEP`` whose
    config (``resumed_from``) names the first. wandb is imported only when
    used; offline mode (``WANDB_MODE=offline``) works without an account.
    """

    def __init__(self, output_dir: Path, cfg: Any, *, config: dict[str, Any],
                 resume_step: int | None = None, name: str | None = None,
                 jsonl: bool = True) -> None:  # fmt: skip
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl" if jsonl else Path(os.devnull)
        logged_past = False
        if resume_step is not None and self.path.exists():
            records = [(line, _record(line)) for line in self.path.read_text(errors="replace").splitlines()]
            kept = [line for line, r in records if r is not None and r.get("step", 0) <= resume_step]
            logged_past = any(r is not None and r.get("step", 0) > resume_step for _, r in records)
            with writing(self.path, " (free space, then --resume)"):
                write_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("ab", buffering=0)
        self._wandb = None
        if cfg.report_to == "wandb":
            self._wandb = _start_wandb(output_dir, cfg, config, name=name or output_dir.name,
                                       resume_step=resume_step, logged_past=logged_past,
                                       persist=jsonl)  # fmt: skip

    @property
    def url(self) -> str | None:
        """The W&B run's page (None offline or without W&B)."""
        return getattr(self._wandb, "url", None) if self._wandb is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._append(self.path, record)
        if self._wandb is not None:
            self._wandb.log({k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()},
                            step=step)  # fmt: skip

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        f = self._file if path == self.path else path.open("ab", buffering=0)
        end = f.tell()
        try:
            with writing(path, " (free space, then --resume)"):
                while line:
                    line = line[f.write(line):]
        except BaseException:
            with contextlib.suppress(OSError):  # no half record left behind
                os.ftruncate(f.fileno(), end)
            raise
        finally:
            if f is not self._file:
                f.close()

    def log_table(self, key: str, rows: Sequence[dict[str, Any]], step: int) -> None:
        """Rows of one table at ``step``: a ``wandb.Table`` under ``key``, and the rows (with
        ``key`` and ``step``) appended to ``generations.jsonl``."""
        if not rows:
            return
        if self.path != Path(os.devnull):
            for row in rows:
                self._append(self.output_dir / "generations.jsonl", {"key": key, "step": step, **row})
        if self._wandb is not None:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self._wandb.log({key: table}, step=step)

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        """Image files (plots) to W&B, each under its key."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def update_config(self, values: dict[str, Any]) -> None:
        """More of the run's config, e.g. what identifies its inputs once they are loaded."""
        if self._wandb is not None:
            self._wandb.config.update(values, allow_val_change=True)

    def log_model(self, directory: Path, name: str) -> None:
        """``directory`` (final/) as a W&B model artifact."""
        if self._wandb is not None:
            import wandb

            artifact = wandb.Artifact(name=_artifact_name(name), type="model")
            artifact.add_dir(str(directory))
            self._wandb.log_artifact(artifact)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._wandb.summary[key] = value

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(output_dir: Path, cfg: Any, config: dict[str, Any], *, name: str,
                 resume_step: int | None, logged_past: bool, persist: bool) -> Any:  # fmt: skip
    try:
        import wandb
    except ImportError:
        raise ConfigError("--report-to wandb: wandb is not installed (pip install wandb)") from None
    id_file = output_dir / "wandb_run_id"  # a run directory's: --resume continues its W&B run
    run_id = id_file.read_text().strip() if persist and id_file.exists() else uuid.uuid4().hex[:12]
    extra = {k: _scalar(v) for k, v in (item.split("=", 1) for item in cfg.wandb_config)}
    config = {**config, **extra}
    if logged_past:  # W&B cannot take its history back to the checkpoint: a new run goes on
        import logging

        previous, run_id = run_id, uuid.uuid4().hex[:12]
        config["resumed_from"] = {"wandb_run": previous, "step": resume_step}
        name = f"{name}-resumed-{resume_step}"
        logging.getLogger(__name__).warning(
            "W&B cannot rewind run %s to step %d, where this run resumes: its history goes on in "
            "W&B run %s (%s; its config's resumed_from names the first)", previous, resume_step,
            run_id, name)  # fmt: skip
    if persist:
        id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "direct-align",
                      name=name, id=run_id, resume="allow", config=config, dir=str(output_dir),
                      group=cfg.wandb_group,
                      tags=cfg.wandb_tags or None, notes=cfg.wandb_notes)  # fmt: skip


def _scalar(text: str) -> Any:
    """A --wandb-config value as a number when it is one (so W&B can sort and plot it)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _artifact_name(name: str) -> str:
    """W&B artifact names take letters, digits, dashes, underscores and dots."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


class NullTracker:
    """The tracker of the processes that are not the main one: it records nothing."""

    url = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_table(self, key: str, rows: Sequence[dict[str, Any]], step: int) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        pass

    def update_config(self, values: dict[str, Any]) -> None:
        pass

    def log_model(self, directory: Path, name: str) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def package_versions() -> dict[str, str]:
    """The versions of the packages a run's numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("direct-align", "torch", "transformers", "accelerate", "datasets", "peft",
                 "wandb", "flash-attn"):  # fmt: skip
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def _record(line: str) -> dict[str, Any] | None:
    """A record of metrics.jsonl, or None for a blank or half-written line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _clean(value: Any) -> float | None:
    """A number for JSON: a one-element tensor as its value (torchao's optimizers keep the
    learning rate as one), NaN and infinities as null (JSON has none)."""
    if hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, int) or math.isfinite(value) else None


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (none when it does not exist)."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for line in path.read_text(errors="replace").splitlines()
            if (r := _record(line)) is not None]  # fmt: skip


def first_eval(output_dir: Path) -> dict[str, float]:
    """The step-0 ``eval/*`` record of ``metrics.jsonl`` (the initial policy), if logged."""
    for record in read_metrics(output_dir):
        if record.get("step") == 0 and any(k.startswith("eval/") for k in record):
            return {k: v for k, v in record.items() if k != "step"}
    return {}


# --- progress and memory --------------------------------------------------------------------


def progress(**kwargs: Any) -> tqdm:
    """A tqdm bar that does not flood the logs of batch jobs: live on a terminal, one update
    every 30 s when stderr is a file; none in processes other than the main one."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("disable", os.environ.get("RANK", "0") != "0")
    return tqdm(mininterval=0.1 if interactive else 30.0, dynamic_ncols=interactive, **kwargs)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def resident_mb() -> float | None:
    """The process's resident memory now, in MiB (Linux; None where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * resource.getpagesize() / 2**20, 1)


# the process's peak resident memory at named points of the run (e.g. "prepared": once the
# engine holds the model, before any step), for summary.json's memory_by_process
PEAKS_AT: dict[str, float] = {}


def maxrss_mb(maxrss: int) -> float:
    """``ru_maxrss`` in MiB: KiB on Linux, bytes on macOS."""
    return round(maxrss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def peak_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --- console tables ---------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A table cell: floats to 3 decimals, None as a dash."""
    return f"{value:.3f}" if isinstance(value, float) else ("–" if value is None else str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in header]] + [[format_value(c) if i else str(c) for i, c in enumerate(r)]
                                         for r in rows]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(max(widths[i], 10))
                       for i, c in enumerate(row)) for row in cells]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)
