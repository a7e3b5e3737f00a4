"""The small table `direct-align ppo` prints at the end of a run."""

from __future__ import annotations

from typing import Any

import click

from direct_align.engine.tracking import table
from direct_align.evaluation.report import report_rows, reward_key


def print_ppo_summary(summary: dict[str, Any], output_dir: str) -> None:
    """The reward, win rate and KL of the initial and trained policy's samples on held-out
    prompts (built-in task, --eval-prompts-file); then what the run cost."""
    lines = []
    samples = summary.get("builtin") or summary.get("evaluation")
    if samples:
        lines.append(table(["", "reference", "policy"], report_rows(samples, reward_key(samples))))
    stages = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s"
                       for k, v in summary["stages"].items())  # fmt: skip
    lines.append(f"{summary['rollouts']} rollouts, {summary['responses']} responses "
                 f"({summary['tokens_generated']} tokens), {summary['models_in_memory']} models "
                 f"in memory; {stages} → {output_dir}/final")  # fmt: skip
    click.echo("\n" + "\n".join(lines))
