"""The comparison's plots, readable at a glance: labelled axes with units, one colour and marker
per method, the reference as a dashed line. With several seeds every seed is a small faint
point and the mean a large one; the frontier plot draws each run's evaluations along training
as a faint line and each method's upper frontier (mean over seeds) as a thick one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from direct_align.compare.frontier import reward_at_kl, run_points  # noqa: E402

STYLE = {"ppo": ("tab:red", "s"), "dpo": ("tab:blue", "o"), "ipo": ("tab:green", "^"),
         "orpo": ("tab:purple", "D"), "simpo": ("tab:orange", "v"),
         "online-dpo": ("tab:cyan", "P"), "online-rpo": ("tab:brown", "X"),
         "robust": ("tab:olive", "h"), "cdpo": ("tab:pink", "p"), "kto": ("tab:gray", "d"),
         "rloo": ("darkred", "*"), "online-rebel": ("navy", "H"), "online-lipo": ("teal", "<"),
         "online-sppo": ("olive", "8"),
         "online-kto": ("gold", ">")}  # fmt: skip
NAMES = {"ppo": "PPO (SFT → RM → PPO)", "dpo": "DPO", "ipo": "IPO", "orpo": "ORPO",
         "simpo": "SimPO", "online-dpo": "online DPO", "online-rpo": "online DPO + NLL (RPO)",
         "robust": "robust DPO (ε = noise)", "cdpo": "conservative DPO (ε = noise)",
         "kto": "KTO (hidden-reward thumbs)", "rloo": "RLOO (RM → RLOO)",
         "online-rebel": "online REBEL", "online-lipo": "online LiPO-λ",
         "online-sppo": "online SPPO",
         "online-kto": "online KTO (judge's thumbs)"}  # fmt: skip
REWARD_LABEL = "true reward of samples (hidden, higher is better)"
KL_LABEL = "KL(policy ‖ reference) of samples, nats"


def _by_method(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return groups


def _label(row: dict[str, Any]) -> str:
    return f"{row['strength']}={row['value']:g}"


def _means(rows: list[dict[str, Any]], x: str, y: str = "true_reward") -> list[tuple[dict[str, Any], float, float]]:
    """(first row, mean x, mean y) of each run name (a method at one strength) over its seeds."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        out.append((mine[0], sum(r[x] for r in mine) / len(mine), sum(r[y] for r in mine) / len(mine)))
    return out


def _scatter(ax: plt.Axes, rows: list[dict[str, Any]], x: str, *, lines: bool = True) -> None:
    """Final true reward against ``x``: each seed faint, the mean over seeds large and labelled
    with its strength; with ``lines``, each method's means joined in order of x."""
    several = len({r.get("seed", 0) for r in rows}) > 1
    for method, group in _by_method(rows).items():
        color, marker = STYLE.get(method, ("black", "x"))
        if several:
            ax.scatter([r[x] for r in group], [r["true_reward"] for r in group], color=color,
                       marker=marker, s=14, alpha=0.35, linewidths=0)  # fmt: skip
        means = sorted(_means(group, x), key=lambda m: m[1])
        ax.plot([m[1] for m in means], [m[2] for m in means], color=color, marker=marker,
                markersize=8, linewidth=1 if lines else 0, alpha=0.9,
                label=NAMES.get(method, method) + (" (mean of seeds)" if several else ""))  # fmt: skip
        for row, mx, my in means:
            ax.annotate(_label(row), (mx, my), textcoords="offset points", xytext=(5, -11),
                        fontsize=7, color=color)  # fmt: skip
    _reference(ax, rows)


def _reference(ax: plt.Axes, rows: list[dict[str, Any]], key: str = "reference_true_reward") -> None:
    by_seed = {r.get("seed", 0): r[key] for r in rows}  # each seed samples the reference anew
    ax.axhline(sum(by_seed.values()) / len(by_seed), color="gray", linestyle="--", linewidth=1,
               label="reference (SFT model)" + (", mean of seeds" if len(by_seed) > 1 else ""))  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the data


def _frontier(ax: plt.Axes, rows: list[dict[str, Any]], label: str = REWARD_LABEL) -> None:
    """Each run's evaluations along training (faint), its final point, and each method's upper
    frontier over all its points, averaged over seeds on a grid of KL (thick)."""
    for method, group in _by_method(rows).items():
        top = max(p[0] for r in group for p in run_points(r))
        grid = [top * i / 200 for i in range(201)]
        color, marker = STYLE.get(method, ("black", "x"))
        for r in group:
            points = run_points(r)
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, linewidth=0.5,
                    alpha=0.2)  # fmt: skip
            ax.scatter([r["kl"]], [r["true_reward"]], color=color, marker=marker, s=18, alpha=0.6,
                       linewidths=0)  # fmt: skip
        seeds = sorted({r.get("seed", 0) for r in group})
        curves = [[reward_at_kl([p for r in group if r.get("seed", 0) == s for p in run_points(r)], k)
                   for k in grid] for s in seeds]  # fmt: skip
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(grid))]
        ax.plot(grid, mean, color=color, linewidth=2.2, label=f"{NAMES.get(method, method)} frontier")
    ax.set_ylabel(label)
    _reference(ax, rows)
    far = sorted(p[0] for r in rows for p in run_points(r))
    limit = max(far[int(0.9 * (len(far) - 1))] * 1.1, 1.0)  # the tail of a few wild runs cut
    if far[-1] > limit:
        ax.set_xlim(-0.02 * limit, limit)
        ax.annotate(f"x cut at {limit:.1f} nats ({sum(k > limit for k in far)} of {len(far)} "
                    f"points beyond, up to {far[-1]:.0f})", (0.99, 0.02),
                    xycoords="axes fraction", ha="right", fontsize=7, color="gray")  # fmt: skip


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Write ``frontier.png``, ``reward_vs_time.png`` and ``memory.png`` into ``out``, and
    ``overoptimisation.png`` when the runs were also scored by a proxy reward model."""
    # (a comparison.json of an earlier version has no evaluation time: its wall time is the cost)
    rows = [{"cost_wall_s": r["total_wall_s"]} | r for r in result["rows"]]
    seeds = len({r.get("seed", 0) for r in rows})
    suffix = f" ({seeds} seeds)" if seeds > 1 else ""
    label = result.get("reward_label", REWARD_LABEL)  # own data: the gold judge's reward
    paths = []
    fig, ax = plt.subplots(figsize=(10, 5.5))
    _frontier(ax, rows, label)
    ax.set_xlabel(KL_LABEL)
    ax.set_title("Reward/KL frontier, evaluated along training (up and left is better)" + suffix)
    paths.append(_save(fig, out / "frontier.png"))

    fig, ax = plt.subplots(figsize=(9, 5))
    _scatter(ax, rows, "cost_wall_s", lines=False)
    ax.set_ylabel(label)
    ax.set_xlim(0, 1.2 * max(r["cost_wall_s"] for r in rows))  # room for the labels
    ax.set_xlabel("wall time of the whole pipeline after SFT (held-out evaluations excluded), seconds")
    ax.set_title(f"{label.split(' of ')[0].capitalize()} against training time (up and left is "
                 "better)" + suffix)
    paths.append(_save(fig, out / "reward_vs_time.png"))

    if all("proxy_reward" in r for r in rows):
        paths.append(_overoptimisation(rows, out / "overoptimisation.png", suffix))

    first = rows[0].get("seed", 0)
    rows = [r for r in rows if r.get("seed", 0) == first]  # memory: one seed's runs
    reward_model = next((m for m in result.get("reward_models", [])
                         if m.get("seed", first) == first), result.get("reward_model"))  # fmt: skip
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
    ax.set_title(f"Peak memory of each run's training (labels: models held, MB added), seed {first}")
    ax.grid(axis="y", alpha=0.3)
    paths.append(_save(fig, out / "memory.png"))
    return paths


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _overoptimisation(rows: list[dict[str, Any]], path: Path, suffix: str) -> Path:
    """Gold (hidden) and proxy (reward-model) reward against KL, every evaluation along
    training of every run: where the proxy keeps rising and the gold falls, the reward model is
    over-optimised. Each seed has its own reward model, with its own offset, so the proxy is
    drawn as the gain over that seed's reference samples."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    for ax, key, label in ((axes[0], "true_reward", "gold reward (hidden)"),
                           (axes[1], "proxy_reward", "proxy reward gain over the reference\n"
                                                     "(each seed's own reward model)")):  # fmt: skip
        for method, group in _by_method(rows).items():
            color, marker = STYLE.get(method, ("black", "x"))
            for i, r in enumerate(group):
                base = r["reference_proxy_reward"] if key == "proxy_reward" else 0.0
                points = run_points(r, key)  # in order of training
                ax.plot([p[0] for p in points], [p[1] - base for p in points], color=color,
                        marker=marker, markersize=3, linewidth=0.8, alpha=0.5,
                        label=NAMES.get(method, method) if i == 0 else None)  # fmt: skip
        if key == "proxy_reward":
            ax.axhline(0.0, color="gray", linestyle="--", linewidth=1, label="reference (SFT model)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            _reference(ax, rows, f"reference_{key}")
        ax.set_xlabel(KL_LABEL)
        ax.set_ylabel(label)
    axes[0].get_legend().remove()  # one legend, right of the second panel
    fig.suptitle("Proxy task: gold and proxy reward along training" + suffix)
    return _save(fig, path)
