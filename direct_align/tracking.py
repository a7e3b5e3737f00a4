"""One metrics sink for the console, ``metrics.jsonl`` and Weights & Biases."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

from direct_align.errors import ConfigError


class Tracker:
    """Writes each logged step to ``metrics.jsonl`` and, when asked, to W&B.

    On resume, records past the checkpoint's step are dropped so that the file reads as one run.
    wandb is imported only when ``report_to == "wandb"``; offline mode (``WANDB_MODE=offline``)
    works without an account.
    """

    def __init__(self, output_dir: Path, *, report_to: str, project: str, run_name: str,
                 config: dict[str, Any], resume_step: int | None = None) -> None:  # fmt: skip
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]  # fmt: skip
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
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
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
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


def _clean(value: float) -> float | None:
    """JSON has no NaN/inf: write them as null."""
    return value if isinstance(value, int) or math.isfinite(value) else None
