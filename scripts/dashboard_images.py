"""The images of docs/dashboards.md: what a W&B dashboard of one run and of a comparison shows,
drawn from real offline W&B runs (their run files, read with scripts/wandb_offline.py), not
screenshots of the W&B web app (which needs an account and the network).

    python scripts/dashboard_images.py --out runs/dashboards

runs `direct-align train --loss dpo --eval-every 20 --report-to wandb` and
`direct-align compare --quick --report-to wandb` on the built-in task with WANDB_MODE=offline
(about 4 minutes on 2 CPU cores once the task is built), draws docs/dashboards/*.png from what
they logged, and prints the numbers drawn.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.wandb_offline import Run, read_runs, read_table  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "dashboards"


def cli(*args: str) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-m", "direct_align", *args], env=env, check=True)


def one_run(run: Run, out: Path) -> None:
    """Four panels of a single run, as its W&B workspace lays them out."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (loss, acc), (reward, frontier) = axes
    for key, label in (("train/loss", "train/loss"), ("eval/loss", "eval/loss")):
        steps, values = zip(*run.curve(key))
        loss.plot(steps, values, marker="o" if key.startswith("eval") else None, label=label)
    loss.set(title="losses", xlabel="step")
    loss.legend()
    steps, values = zip(*run.curve("eval/rewards/accuracies"))
    acc.plot(steps, values, marker="o")
    acc.set(title="eval/rewards/accuracies (held-out pairs)", xlabel="step", ylim=(0, 1))
    for key in ("eval/policy/true_reward", "eval/reference/true_reward"):
        steps, values = zip(*run.curve(key))
        reward.plot(steps, values, marker="o", label=key)
    reward.set(title="true reward of samples (built-in task)", xlabel="step")
    reward.legend()
    kl = dict(run.curve("eval/policy/kl"))
    true = dict(run.curve("eval/policy/true_reward"))
    points = [(kl[s], true[s], s) for s in sorted(kl)]
    frontier.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for x, y, s in points:
        frontier.annotate(f"step {s}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    frontier.set(title="reward against KL over the run", xlabel="KL(policy‖reference), nats",
                 ylabel="true reward")  # fmt: skip
    fig.suptitle(f"W&B run {run.name} (group {run.group or '–'}): its charts", fontsize=12)
    fig.tight_layout()
    fig.savefig(out / "run.png", dpi=110)
    for s, (x, y) in zip([p[2] for p in points], [(p[0], p[1]) for p in points]):
        print(f"run {run.name}: step {s}: KL {x:.3f} nats, true reward {y:.3f}")


def generations(run: Run, out: Path) -> None:
    """The last generations table, as W&B shows a wandb.Table."""
    rows = read_table(run.path, run, "eval/generations")[:4]
    columns = ["prompt", "reference", "policy", "reference_reward", "policy_reward", "policy_kl"]
    cells = [[textwrap.fill(str(r[c]) if isinstance(r[c], str) else f"{r[c]:.2f}", 34)
              for c in columns] for r in rows]  # fmt: skip
    fig, ax = plt.subplots(figsize=(13, 1.2 + 1.1 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=columns, loc="center", cellLoc="left",
                     colWidths=[0.14, 0.3, 0.3, 0.09, 0.09, 0.08])  # fmt: skip
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 4.2)
    ax.set_title(f"eval/generations of {run.name} at its last step (a wandb.Table)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "generations.png", dpi=110)
    print(f"generations: {len(rows)} rows of the last table")


def comparison(runs: list[Run], out: Path) -> None:
    """The comparison's group: each run's end point, coloured by the method in its config."""
    fig, (scatter, wall) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({r.config["method"] for r in runs if "method" in r.config} - {"reward-model"})
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in runs:
        method = r.config.get("method")
        if method not in colors:
            continue
        x, y = r.summary["policy/kl"], r.summary["policy/true_reward"]
        scatter.scatter([x], [y], color=colors[method], label=method, s=60)
        print(f"comparison {r.name}: KL {x:.3f} nats, true reward {y:.3f}, runtime {r.summary['runtime_s']} s")
    scatter.set(title="policy/true_reward against policy/kl, grouped by config.method",
                xlabel="KL, nats", ylabel="true reward")  # fmt: skip
    scatter.legend(fontsize=8)
    named = [r for r in runs if r.config.get("method") in colors]
    wall.barh([r.name for r in named], [r.summary["runtime_s"] for r in named],
              color=[colors[r.config["method"]] for r in named])  # fmt: skip
    wall.set(title="runtime_s of each run (its own stage)", xlabel="seconds")
    fig.suptitle(f"W&B group {runs[0].group}: the runs of `direct-align compare --quick`", fontsize=12)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/dashboards"))
    opts = parser.parse_args()
    run_dir, compare_dir = opts.out / "dpo-run", opts.out / "cmp"
    if not run_dir.exists():
        cli("train", "--loss", "dpo", "--eval-every", "20", "--log-generations", "4",
            "--report-to", "wandb", "--wandb-tags", "docs", "--output-dir", str(run_dir))  # fmt: skip
    if not compare_dir.exists():
        cli("compare", "--quick", "--report-to", "wandb", "--output-dir", str(compare_dir))
    DOCS.mkdir(parents=True, exist_ok=True)
    [run] = read_runs(run_dir)
    one_run(run, DOCS)
    generations(run, DOCS)
    comparison([r for d in sorted((compare_dir / "runs").iterdir()) if d.is_dir()
                for r in read_runs(d)], DOCS)  # fmt: skip
    print(f"images in {DOCS}")


if __name__ == "__main__":
    main()
