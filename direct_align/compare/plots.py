"""The comparison's three plots, readable at a glance: labelled axes with units, one colour and
marker per method, each point labelled with its strength, the reference as a dashed line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"ppo": ("tab:red", "s"), "dpo": ("tab:blue", "o"), "ipo": ("tab:green", "^"),
         "orpo": ("tab:purple", "D"), "simpo": ("tab:orange", "v"),
         "online-dpo": ("tab:cyan", "P")}  # fmt: skip
NAMES = {"ppo": "PPO (SFT → RM → PPO)", "dpo": "DPO", "ipo": "IPO", "orpo": "ORPO",
         "simpo": "SimPO", "online-dpo": "online DPO"}  # fmt: skip
REWARD_LABEL = "true reward of samples (hidden, higher is better)"


def _by_method(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return groups


def _label(row: dict[str, Any]) -> str:
    return f"{row['strength']}={row['value']:g}"


def _scatter(ax: plt.Axes, rows: list[dict[str, Any]], x: str, *, lines: bool = True) -> None:
    """True reward against ``x``; with ``lines``, each method's points joined in order of x."""
    for method, group in _by_method(rows).items():
        color, marker = STYLE.get(method, ("black", "x"))
        group = sorted(group, key=lambda r: r[x])
        xs, ys = [r[x] for r in group], [r["true_reward"] for r in group]
        name = NAMES.get(method, method)
        ax.plot(xs, ys, color=color, marker=marker, markersize=8, linewidth=1 if lines else 0,
                alpha=0.9, label=name)  # fmt: skip
        for r in group:
            ax.annotate(_label(r), (r[x], r["true_reward"]), textcoords="offset points",
                        xytext=(5, -11), fontsize=7, color=color)  # fmt: skip
    ax.axhline(rows[0]["reference_true_reward"], color="gray", linestyle="--", linewidth=1,
               label="reference (SFT model)")  # fmt: skip
    ax.set_ylabel(REWARD_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the data


def write_plots(rows: list[dict[str, Any]], reward_model: dict[str, Any] | None,
                out: Path) -> list[Path]:  # fmt: skip
    """Write ``frontier.png``, ``reward_vs_time.png`` and ``memory.png`` into ``out``."""
    paths = []
    fig, ax = plt.subplots(figsize=(9, 5))
    _scatter(ax, rows, "kl")
    ax.set_xlabel("KL(policy ‖ reference) of samples, nats")
    ax.set_title("Reward/KL frontier on the built-in task (up and left is better)")
    paths.append(_save(fig, out / "frontier.png"))

    fig, ax = plt.subplots(figsize=(9, 5))
    _scatter(ax, rows, "total_wall_s", lines=False)
    ax.set_xlim(left=0)
    ax.set_xlabel("wall time of the whole pipeline after SFT, seconds")
    ax.set_title("True reward against training time (up and left is better)")
    paths.append(_save(fig, out / "reward_vs_time.png"))

    bars = [(f"{r['method']}\n{_label(r)}", list(r["peak_rss_mb"].values())[-1],
             list(r["peak_above_start_mb"].values())[-1], r["models_in_memory"],
             STYLE.get(r["method"], ("black", "x"))[0]) for r in rows]  # fmt: skip
    if reward_model is not None:
        bars.append(("reward model\n(shared stage)", reward_model["peak_rss_mb"],
                     reward_model["peak_above_start_mb"], 1, "tab:gray"))  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(bars)), 5))
    x = range(len(bars))
    base = [peak - above for _, peak, above, _, _ in bars]
    ax.bar(x, base, color="lightgray", label="process at start (Python, torch, libraries)")
    ax.bar(x, [b[2] for b in bars], bottom=base, color=[b[4] for b in bars],
           label="added by models, data and training")  # fmt: skip
    for i, (_, peak, above, models, _) in enumerate(bars):
        ax.annotate(f"{models} model{'s' if models > 1 else ''}\n+{above:.0f}", (i, peak),
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(list(x), [b[0].replace("\n", " ") for b in bars], fontsize=7, rotation=40,
                  ha="right", rotation_mode="anchor")  # fmt: skip
    ax.set_ylabel("peak resident memory of the training process, MB")
    ax.set_ylim(0, 1.35 * max(b[1] for b in bars))
    ax.set_title("Peak memory of each run's training (labels: models held, MB added)")
    ax.grid(axis="y", alpha=0.3)
    paths.append(_save(fig, out / "memory.png"))
    return paths


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
