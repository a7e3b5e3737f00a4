"""The small table `direct-align ppo` prints at the end of a run."""

from __future__ import annotations

from typing import Any

import click

from direct_align.engine.tracking import table


def print_ppo_summary(summary: dict[str, Any], output_dir: str) -> None:
    """For the built-in task, the hidden reward and KL of the initial and trained policy's
    samples on held-out prompts; then what the run cost."""
    lines = []
    if "builtin" in summary:
        b = summary["builtin"]
        rows = [("true reward of samples (hidden, ↑)", b["reference/true_reward"],
                 b["policy/true_reward"]),
                ("KL(policy‖reference) of samples, nats", 0.0, b["policy/kl"]),
                ("response tokens per sample", b["reference/response_tokens"],
                 b["policy/response_tokens"])]  # fmt: skip
        lines.append(table(["", "reference", "policy"], rows))
    stages = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s"
                       for k, v in summary["stages"].items())  # fmt: skip
    lines.append(f"{summary['rollouts']} rollouts, {summary['responses']} responses "
                 f"({summary['tokens_generated']} tokens), {summary['models_in_memory']} models "
                 f"in memory; {stages} → {output_dir}/final")  # fmt: skip
    click.echo("\n" + "\n".join(lines))
