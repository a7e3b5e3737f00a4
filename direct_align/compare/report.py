"""The comparison as Markdown tables (what `direct-align compare` prints): every run, or with
several seeds every method and strength as mean ± std; then each method's headline."""

from __future__ import annotations

import math
from typing import Any

from direct_align.compare.frontier import MATCHED_KL, aggregate, gaps, headline, mean_std
from direct_align.compare.plan import RL_METHODS


def _last(by_stage: dict[str, float]) -> float:
    """The value of the last stage (the method's own training)."""
    return list(by_stage.values())[-1]


def _pm(value: tuple[float, float] | list[float], digits: int) -> str:
    mean, std = value
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _runs_table(result: dict[str, Any]) -> list[str]:
    """One row per run (one seed): reward, KL, time per stage, peak memory, models, tokens."""
    proxy = all("proxy_reward" in r for r in result["rows"])
    lines = [
        "| run | true reward | " + ("proxy reward | " if proxy else "") + "KL, nats "
        "| wall time, s (stages; evaluation) | peak RSS of its training, MB (above start) | models in memory "
        "| tokens generated |",
        "|---|---|" + ("---|" if proxy else "") + "---|---|---|---|---|",
    ]
    for r in result["rows"]:
        stages = " + ".join(f"{name.replace('_', ' ')} {s:.0f}" for name, s in r["wall_s"].items())
        stages += f"; evaluation {r.get('eval_s', 0):.0f}"
        extra = f" {r['proxy_reward']:.3f} |" if proxy else ""
        lines.append(f"| {r['method']} {r['strength']}={r['value']:g} | {r['true_reward']:.3f} |{extra} "
                     f"{r['kl']:.2f} | {r['total_wall_s']:.0f} ({stages}) | {_last(r['peak_rss_mb']):.0f} ({_last(r['peak_above_start_mb']):.0f}) "
                     f"| {r['models_in_memory']} | {r['tokens_generated']} |")  # fmt: skip
    return lines


def _seeds_table(result: dict[str, Any]) -> list[str]:
    """One row per method and strength, mean ± std over seeds, with the best true reward along
    training and the KL where it was reached."""
    runs = aggregate(result["rows"])  # (recomputed: --plots-only reads an older comparison.json)
    proxy = all("proxy_gain" in r for r in runs)
    lines = [
        f"| run | final true reward | {'final proxy gain over the reference | ' if proxy else ''}final KL, nats "
        "| best true reward along training | KL at best, nats | wall time without evaluation, s "
        "| peak RSS, MB |",
        "|---|---|" + ("---|" if proxy else "") + "---|---|---|---|---|",
    ]
    for r in runs:
        extra = f" {_pm(r['proxy_gain'], 3)} |" if proxy else ""
        lines.append(f"| {r['method']} {r['strength']}={r['value']:g} | {_pm(r['true_reward'], 3)} |{extra} "
                     f"{_pm(r['kl'], 2)} | {_pm(r['peak_true_reward'], 3)} | {_pm(r['kl_at_peak'], 2)} "
                     f"| {_pm(r['cost_wall_s'], 0)} | {_pm(r['peak_rss_mb'], 0)} |")  # fmt: skip
    return lines


def headline_table(result: dict[str, Any]) -> list[str]:
    """Per method: true reward on its upper frontier at each matched KL (mean ± std over seeds),
    and the mean wall time and the peak memory of one run of its pipeline."""
    entries = headline(result["rows"])
    budgets = " | ".join(f"true reward at KL {k:g}" for k in MATCHED_KL)
    lines = [f"| method | {budgets} | wall time of one run (evaluations excluded), s | peak RSS, MB | seeds |",
             "|---|" + "---|" * len(MATCHED_KL) + "---|---|---|"]  # fmt: skip
    for h in entries:
        at = " | ".join(_pm(h[f"reward_at_{k:g}"], 3) for k in MATCHED_KL)
        lines.append(f"| {h['method']} | {at} | {_pm(h['wall_s'], 0)} | {h['peak_rss_mb']:.0f} "
                     f"| {h['seeds']} |")  # fmt: skip
    for g in gaps(entries, RL_METHODS):
        lines.append(f"\nat KL {g['budget']:g}: best direct method {g['direct']} "
                     f"{g['direct_reward']:.3f}, best RL baseline {g['rl']} {g['rl_reward']:.3f} "
                     f"(direct − RL: {g['gap']:+.3f})")  # fmt: skip
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """The runs (or with several seeds their means), the headline, the reward model, the reference."""
    several = len(result.get("seeds", [result.get("seed")])) > 1
    lines = _seeds_table(result) if several else _runs_table(result)
    lines += ["", "headline: true reward on each method's upper frontier (all its strengths and "
              "evaluations along training) at matched KL", "", *headline_table(result)]  # fmt: skip
    for rm in result.get("reward_models") or ([result["reward_model"]] if result.get("reward_model") else []):
        seed = f" (seed {rm['seed']})" if several and "seed" in rm else ""
        lines.append(f"\nreward model stage{seed} (train-rm, shared by PPO and online DPO): {rm['wall_s']:.0f} s, "
                     f"peak RSS {rm['peak_rss_mb']:.0f} MB ({rm['peak_above_start_mb']:.0f} above start), "
                     f"held-out pair accuracy {rm['eval']['eval/rewards/accuracies']:.3f}")  # fmt: skip
    by_seed = {r.get("seed", 0): r["reference_true_reward"] for r in result["rows"]}
    reference = _pm(mean_std(list(by_seed.values())), 3) if several else f"{next(iter(by_seed.values()), float('nan')):.3f}"
    lines.append(f"\nreference (SFT model) true reward: {reference}; "
                 f"comparison took {result['runtime_s']:.0f} s")  # fmt: skip
    text = "\n".join(lines)
    if result.get("task") == "own":  # no hidden reward: every run is judged by the gold judge
        text = text.replace("true reward", "gold reward").replace("(SFT model)", "(--model)")
        text += f"\ngold judge: {result['judge']['description']}"
    return text
