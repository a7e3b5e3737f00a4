"""Run the stages of a comparison, each as its own `direct-align` process, and measure them.

Each stage runs in a fresh process so that its peak memory is its own (``os.wait4`` returns the
child's resource usage). Each run gets its own cache directory that links the built-in task but
starts with no cached reference log-probs, so every reference-based run pays its reference pass.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from direct_align.compare.plan import Stage
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
    for task in builtin_dir.iterdir():
        link = cache / "builtin" / task.name
        if not link.exists():
            link.symlink_to(task.resolve(), target_is_directory=True)
    return cache


def _peak_mb(maxrss: int) -> float:
    """``ru_maxrss`` in MiB: KiB on Linux, bytes on macOS."""
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10


def run_stage(stage: Stage, output_dir: Path, cache_dir: Path, extra: tuple[str, ...] = (),
              log_dir: Path | None = None) -> StageResult:  # fmt: skip
    """Run ``direct-align STAGE`` into ``output_dir``; raises DirectAlignError if it fails."""
    args = [stage.command, *stage.args, *extra, "--output-dir", str(output_dir),
            "--cache-dir", str(cache_dir)]  # fmt: skip
    log_dir = log_dir or output_dir.parent
    log = log_dir / f"{output_dir.name}.log"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "direct_align", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise DirectAlignError(f"compare: `direct-align {shlex.join(args)}` failed with exit "
                               f"status {proc.returncode} ({last}); log: {log}")  # fmt: skip
    summary = json.loads((output_dir / "summary.json").read_text())
    return StageResult(stage.name, "direct-align " + shlex.join(args), round(wall, 1),
                       round(_peak_mb(usage.ru_maxrss), 1), summary, str(output_dir))  # fmt: skip
