"""The small table `direct-align train` prints at the end of a run."""

from __future__ import annotations

from typing import Any

import click

from direct_align.engine.tracking import table
from direct_align.evaluation.report import report_rows, reward_key
from direct_align.losses import LOSSES


def print_summary(summary: dict[str, Any], output_dir: str) -> None:
    """Initial-versus-trained metrics; the reward, win rate and KL of samples (built-in task,
    --eval-prompts-file)."""
    initial, final = summary.get("initial", {}), summary.get("final", {})
    rows: list[tuple[str, Any, Any]] = []
    samples = summary.get("builtin") or summary.get("evaluation")
    if samples:
        rows += report_rows(samples, reward_key(samples))
    loss = summary.get("eval_loss", summary["loss"])  # online KTO and group losses: dpo
    unpaired = LOSSES[loss].unpaired  # labelled examples, not pairs
    accuracy, last = (("held-out label accuracy", ("held-out KL estimate z0", "eval/kl"))
                      if unpaired else ("held-out preference accuracy",
                                        ("held-out reward margin", "eval/rewards/margins")))  # fmt: skip
    rows += [
        (accuracy, initial.get("eval/rewards/accuracies"), final.get("eval/rewards/accuracies")),
        (f"held-out {loss} loss", initial.get("eval/loss"), final.get("eval/loss")),
        (last[0], initial.get(last[1]), final.get(last[1])),
    ]  # fmt: skip
    lines = [table(["", "reference", "policy"], rows),
             f"{summary['steps']} steps, {summary['train_pairs']} {_trained_on(summary)}, "
             f"{summary['runtime_s']:.0f} s → {output_dir}/final"]  # fmt: skip
    if summary.get("online"):
        lines.append(f"online: {summary['rounds']} rounds, {summary['judge_calls']} judge calls "
                     "(responses scored)")  # fmt: skip
    click.echo("\n" + "\n".join(lines))


def _trained_on(summary: dict[str, Any]) -> str:
    """What ``train_pairs`` counts: pairs, labelled examples (KTO) or prompts' groups."""
    if summary["loss"] not in LOSSES:
        return "groups"
    return "examples" if LOSSES[summary["loss"]].unpaired else "pairs"
