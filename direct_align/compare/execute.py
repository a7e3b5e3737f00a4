"""Run the stages of a comparison, each as its own `direct-align` process, and measure them.

Each stage runs in a fresh process so that its peak memory is its own (``os.wait4`` returns the
child's resource usage). Each run gets its own cache directory that links the built-in task but
starts with no cached reference log-probs, so every reference-based run pays its reference pass.

``warm=True`` (the quick comparison) forks each stage from a server process that has already
imported the package (Python's ``forkserver``), so the stages skip Python's start-up and the
imports of torch, transformers and the rest (about 5 s each on 2 cores); the stage reports its
own peak memory. Its wall times are a first look, not the measurement of a full comparison.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from direct_align.compare.plan import Stage
from direct_align.engine.tracking import maxrss_mb, peak_mb
from direct_align.errors import DirectAlignError


@dataclass
class StageResult:
    """What one stage cost and reported."""

    stage: str
    command: str  # the command line, as a user would type it
    wall_s: float  # process start to exit
    peak_rss_mb: float  # the process's peak resident memory
    summary: dict[str, Any]
    output_dir: str


def run_cache(root: Path, name: str, builtin_dir: Path) -> Path:
    """A cache directory for one run: the shared built-in task, no reference log-probs."""
    cache = root / name
    (cache / "builtin").mkdir(parents=True, exist_ok=True)
    for task in builtin_dir.iterdir() if builtin_dir.is_dir() else ():  # own data: none
        link = cache / "builtin" / task.name
        if not link.exists():
            link.symlink_to(task.resolve(), target_is_directory=True)
    return cache


def run_stage(stage: Stage, output_dir: Path, cache_dir: Path, extra: tuple[str, ...] = (),
              log_dir: Path | None = None, warm: bool = False) -> StageResult:  # fmt: skip
    """Run ``direct-align STAGE`` into ``output_dir``; raises DirectAlignError if it fails."""
    args = [stage.command, *stage.args, *extra, "--output-dir", str(output_dir),
            "--cache-dir", str(cache_dir)]  # fmt: skip
    log_dir = log_dir or output_dir.parent
    log = log_dir / f"{output_dir.name}.log"
    start = time.perf_counter()
    code, peak = _run_warm(args, log) if warm else _run_cold(args, log)
    wall = time.perf_counter() - start
    if code != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise DirectAlignError(f"compare: `direct-align {shlex.join(args)}` failed with exit "
                               f"status {code} ({last}); log: {log}")  # fmt: skip
    summary = json.loads((output_dir / "summary.json").read_text())
    return StageResult(stage.name, "direct-align " + shlex.join(args), round(wall, 1),
                       peak, summary, str(output_dir))  # fmt: skip


def _run_cold(args: list[str], log: Path) -> tuple[int, float]:
    """``python -m direct_align ARGS`` as a new process: (exit status, its peak RSS in MiB)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "direct_align", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), maxrss_mb(usage.ru_maxrss)


# what the fork server imports once, so that no stage pays for it
_PRELOAD = ["direct_align.cli", "direct_align.preference.run", "direct_align.rm.run",
            "direct_align.ppo.run", "direct_align.engine.tracking"]  # fmt: skip


@cache
def _warm_context() -> multiprocessing.context.BaseContext:
    """The fork server, started once, with ``TQDM_DISABLE`` set for it alone (tqdm reads it
    at import, which happens in the server)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before
    return context


def _run_warm(args: list[str], log: Path) -> tuple[int, float]:
    """``direct-align ARGS`` in a process forked from the warm server: (exit status, its peak
    RSS in MiB)."""
    receive, send = multiprocessing.Pipe(duplex=False)
    proc = _warm_context().Process(target=_warm_stage, args=(args, str(log), send))
    proc.start()
    send.close()
    try:
        peak = receive.recv()
    except EOFError:  # the stage died before it could say
        peak = 0.0
    proc.join()
    return (proc.exitcode if proc.exitcode is not None else 1), peak


def _warm_stage(args: list[str], log: str, send: Any) -> None:
    """The forked stage: the CLI with stdout and stderr in ``log``; sends its peak RSS back."""
    from direct_align.cli import main

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code: int | str | None = 0
    try:
        main(args)
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        send.send(peak_mb())
    sys.exit(code)
