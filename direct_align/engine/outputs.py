"""The run directory: refusal rules, checkpoints, and atomic writes.

Layout: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/step-NNNNNN/``,
``final/``. Nothing in an existing directory is touched until every input has been validated,
and files are written to a temporary name and renamed, so a failed run destroys nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from direct_align.errors import ConfigError

STATE_FILE = "trainer_state.json"


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"

    def check(self, *, resume: bool, overwrite: bool, begun: bool = False,
              resumable: bool = True) -> None:  # fmt: skip
        """Refuse what would lose or mix up earlier work; touches nothing. ``begun``: the run
        has work to continue besides checkpoints (an earlier stage); ``resumable``: the command
        has ``--resume``."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--output-dir: '{p}' exists and is not a directory")
        non_empty = p.is_dir() and any(p.iterdir())
        if resume:
            if self.last_checkpoint() is None and not begun:
                raise ConfigError(f"--resume: no checkpoint in '{p / 'checkpoints'}' to resume from")
            if self.final.exists():
                raise ConfigError(f"--resume: '{p}' holds a finished run (final/ exists)")
        elif non_empty and not overwrite:
            choices = "--resume to continue that run or --overwrite" if resumable else "--overwrite"
            raise ConfigError(f"--output-dir: '{p}' is not empty; pass {choices} to replace it")

    def prepare(self, *, overwrite: bool, checkpoints: bool = True) -> None:
        """Create the directory (and ``checkpoints/``); with ``overwrite`` empty it first (after
        validation only)."""
        if overwrite and self.path.is_dir():
            for child in self.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        if checkpoints:
            self.checkpoints.mkdir(exist_ok=True)

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (one whose state file was written last)."""
        if not self.checkpoints.is_dir():
            return None
        done = [d for d in self.checkpoints.glob("step-*") if (d / STATE_FILE).is_file()]
        return max(done, key=lambda d: d.name, default=None)

    def save_checkpoint(self, step: int, save: Callable[[Path], None], state: dict[str, Any],
                        keep: int, *, main: bool = True,
                        barrier: Callable[[], None] = lambda: None) -> Path:  # fmt: skip
        """``save(dir)`` writes the weights and optimizer; the state file marks it complete.

        With several processes every one calls this (``save`` writes each one's part); only
        the ``main`` one prepares, completes and renames the directory, between ``barrier``s.
        """
        final = self.checkpoints / f"step-{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        save(tmp)
        barrier()
        if not main:
            barrier()  # until the main process has completed the checkpoint
            return final
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(d for d in self.checkpoints.glob("step-*") if (d / STATE_FILE).is_file())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def write_json(self, name: str, obj: Any) -> Path:
        return write_atomic(self.path / name, json.dumps(obj, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())
