"""Reward/KL frontiers of a comparison: each method's upper frontier over every point it reached
(every strength, every evaluation along training), the reward it reaches at a matched KL, and
the mean ± standard deviation of a number over seeds.

A point is ``(kl, reward)``: the KL(policy‖reference) of a policy's held-out samples in nats and
their true reward. A method's *upper frontier* is its Pareto set (no other point has less or
equal KL and more reward) joined by straight lines, the way the DPO paper (Rafailov et al. 2023,
Fig. 2) reads a method's reward/KL trade-off. Every run is evaluated at step 0 (the reference,
KL 0), so each frontier starts at the reference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

Point = tuple[float, float]  # (KL in nats, reward)
MATCHED_KL = (1.5, 3.0)  # the headline's KL budgets, nats


def upper_frontier(points: Iterable[Point]) -> list[Point]:
    """The Pareto points of ``points`` (highest reward at each KL budget), by increasing KL."""
    frontier: list[Point] = []
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if math.isfinite(kl) and math.isfinite(reward) and (not frontier or reward > frontier[-1][1]):
            frontier.append((max(kl, 0.0), reward))
    return frontier


def reward_at_kl(points: Iterable[Point], budget: float) -> float:
    """The reward of the upper frontier at KL ``budget``: interpolated between the two Pareto
    points around it, the best reward when every point is within it, NaN when none is."""
    frontier = upper_frontier(points)
    if not frontier or frontier[0][0] > budget:
        return math.nan
    below = [p for p in frontier if p[0] <= budget]
    above = [p for p in frontier if p[0] > budget]
    (k0, r0) = below[-1]
    if not above:
        return r0
    (k1, r1) = above[0]
    return r0 + (r1 - r0) * (budget - k0) / (k1 - k0)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite ``values``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def run_points(row: dict[str, Any], key: str = "true_reward") -> list[Point]:
    """Every (KL, ``key``) point of one run: its evaluations along training and its final one."""
    points = [(c["kl"], c[key]) for c in row.get("curve", []) if key in c]
    if key in row:
        points.append((row["kl"], row[key]))
    return points


def headline(rows: list[dict[str, Any]], budgets: Sequence[float] = MATCHED_KL,
             ) -> list[dict[str, Any]]:  # fmt: skip
    """Per method: the true reward on its upper frontier at each KL budget (over all its runs of
    one seed, then mean ± std over seeds), and the mean wall time and the peak memory of one of
    its runs (the whole pipeline, reward model included, the held-out evaluations excluded)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = sorted({r.get("seed", 0) for r in mine})
        entry: dict[str, Any] = {"method": method, "seeds": len(seeds)}
        for budget in budgets:
            per_seed = [reward_at_kl([p for r in mine if r.get("seed", 0) == s
                                      for p in run_points(r)], budget) for s in seeds]  # fmt: skip
            entry[f"reward_at_{budget:g}"] = mean_std(per_seed)
        entry["wall_s"] = mean_std([r.get("cost_wall_s", r["total_wall_s"]) for r in mine])
        entry["peak_rss_mb"] = max(list(r["peak_rss_mb"].values())[-1] for r in mine)
        out.append(entry)
    return out


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per run name (a method at one strength): its final numbers as mean ± std over
    seeds, and the best gold reward along training with the KL where it peaked."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        first = mine[0]
        entry: dict[str, Any] = {k: first[k] for k in ("run", "method", "strength", "value")}
        entry["seeds"] = len(mine)
        for key in ("true_reward", "kl", "total_wall_s", "cost_wall_s"):
            if all(key in r for r in mine):
                entry[key] = mean_std([r[key] for r in mine])
        if all("proxy_reward" in r for r in mine):  # each seed's reward model has its own offset
            entry["proxy_gain"] = mean_std([r["proxy_reward"] - r["reference_proxy_reward"]
                                            for r in mine])  # fmt: skip
        peaks = [max(run_points(r), key=lambda p: p[1]) for r in mine]
        entry["peak_true_reward"] = mean_std([p[1] for p in peaks])
        entry["kl_at_peak"] = mean_std([p[0] for p in peaks])
        entry["peak_rss_mb"] = mean_std([list(r["peak_rss_mb"].values())[-1] for r in mine])
        out.append(entry)
    return out


def gaps(entries: list[dict[str, Any]], rl: Sequence[str],
         budgets: Sequence[float] = MATCHED_KL) -> list[dict[str, Any]]:  # fmt: skip
    """Per KL budget, from :func:`headline`'s ``entries``: the best reinforcement-learning method
    (``rl``) and the best direct method by mean reward on their frontiers, and the direct one's
    distance to it (positive: the direct method is ahead)."""
    out = []
    for budget in budgets:
        key = f"reward_at_{budget:g}"
        ranked = [e for e in entries if math.isfinite(e[key][0])]
        best_rl = max((e for e in ranked if e["method"] in rl), key=lambda e: e[key][0], default=None)
        best_direct = max((e for e in ranked if e["method"] not in rl), key=lambda e: e[key][0],
                          default=None)  # fmt: skip
        if best_rl is None or best_direct is None:
            continue
        out.append({"budget": budget, "rl": best_rl["method"], "rl_reward": best_rl[key][0],
                    "direct": best_direct["method"], "direct_reward": best_direct[key][0],
                    "gap": best_direct[key][0] - best_rl[key][0]})  # fmt: skip
    return out
