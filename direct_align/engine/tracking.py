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
    """Writes each logged step to ``metrics.jsonl`` and, when asked, to W&B.

    On resume, records past the checkpoint's step are dropped so that the file reads as one run,
    and so is a line a crash left half-written. A record is written whole or not at all: on a
    full disk the file is cut back to its last whole record. wandb is imported only when
    ``report_to == "wandb"``; offline mode (``WANDB_MODE=offline``) works without an account.
    """

    def __init__(self, output_dir: Path, *, report_to: str, project: str, run_name: str,
                 config: dict[str, Any], resume_step: int | None = None) -> None:  # fmt: skip
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if (record := _record(line)) is not None and record.get("step", 0) <= resume_step]  # fmt: skip
            with writing(self.path, " (free space, then --resume)"):
                write_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("ab", buffering=0)
        self._wandb = None
        if report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report-to wandb: wandb is not installed "
                                  "(pip install wandb)") from None  # fmt: skip
            id_file = output_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self._wandb = wandb.init(project=project, name=run_name, id=run_id, resume="allow",
                                     config=config, dir=str(output_dir))  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        line = (json.dumps(record) + "\n").encode()
        end = self._file.tell()
        try:
            with writing(self.path, " (free space, then --resume)"):
                while line:
                    line = line[self._file.write(line):]
        except BaseException:
            with contextlib.suppress(OSError):  # no half record left behind
                os.ftruncate(self._file.fileno(), end)
            raise
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

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


class NullTracker:
    """The tracker of the processes that are not the main one: it records nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _record(line: str) -> dict[str, Any] | None:
    """A record of metrics.jsonl, or None for a blank or half-written line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _clean(value: float) -> float | None:
    """JSON has no NaN/inf: write them as null."""
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
