"""The comparison as a Markdown table (what `direct-align compare` prints)."""

from __future__ import annotations

from typing import Any


def _last(by_stage: dict[str, float]) -> float:
    """The value of the last stage (the method's own training)."""
    return list(by_stage.values())[-1]


def markdown_table(result: dict[str, Any]) -> str:
    """One row per run: reward, KL, time per stage, peak memory, models held, tokens sampled."""
    lines = [
        "| run | true reward | KL, nats | wall time, s (stages) | peak RSS of its training, MB (above start) | models in memory "
        "| tokens generated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        stages = " + ".join(f"{name.replace('_', ' ')} {s:.0f}" for name, s in r["wall_s"].items())
        lines.append(f"| {r['method']} {r['strength']}={r['value']:g} | {r['true_reward']:.3f} "
                     f"| {r['kl']:.2f} | {r['total_wall_s']:.0f} ({stages}) | {_last(r['peak_rss_mb']):.0f} ({_last(r['peak_above_start_mb']):.0f}) "
                     f"| {r['models_in_memory']} | {r['tokens_generated']} |")  # fmt: skip
    if rm := result.get("reward_model"):
        lines.append(f"\nreward model stage (train-rm, shared by PPO and online DPO): {rm['wall_s']:.0f} s, "
                     f"peak RSS {rm['peak_rss_mb']:.0f} MB ({rm['peak_above_start_mb']:.0f} above start), "
                     f"held-out pair accuracy {rm['eval']['eval/rewards/accuracies']:.3f}")  # fmt: skip
    reference = result["rows"][0]["reference_true_reward"] if result["rows"] else float("nan")
    lines.append(f"\nreference (SFT model) true reward: {reference:.3f}; "
                 f"comparison took {result['runtime_s']:.0f} s")  # fmt: skip
    return "\n".join(lines)
