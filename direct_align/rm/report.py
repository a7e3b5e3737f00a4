"""The small table `direct-align train-rm` prints at the end of a run."""

from __future__ import annotations

from typing import Any

import click

from direct_align.engine.tracking import table


def print_rm_summary(summary: dict[str, Any], output_dir: str) -> None:
    """Held-out metrics of the initial (fresh head) and trained reward model; for the built-in
    task also the rank correlation of its scores with the hidden reward."""
    initial, final = summary["initial"], summary["final"]
    rows: list[tuple[str, Any, Any]] = [
        ("held-out pair accuracy", initial["eval/rewards/accuracies"],
         final["eval/rewards/accuracies"]),
        ("held-out reward margin", initial["eval/rewards/margins"], final["eval/rewards/margins"]),
        ("held-out loss", initial["eval/loss"], final["eval/loss"]),
    ]  # fmt: skip
    if "builtin" in summary:
        b = summary["builtin"]
        rows += [
            ("vs hidden reward: Spearman", b["initial"]["spearman"], b["final"]["spearman"]),
            ("vs hidden reward: Pearson", b["initial"]["pearson"], b["final"]["pearson"]),
        ]
    lines = [table(["", "initial", "trained"], rows)]
    lines.append(f"{summary['steps']} steps, {summary['train_pairs']} pairs, "
                 f"{summary['runtime_s']:.0f} s → {output_dir}/final")  # fmt: skip
    click.echo("\n" + "\n".join(lines))
