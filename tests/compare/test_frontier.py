"""Frontiers, matched-KL headline and seed statistics of `direct-align compare` (hand values)."""

from __future__ import annotations

import math

import pytest

from direct_align.compare.frontier import (
    aggregate,
    headline,
    mean_std,
    reward_at_kl,
    run_points,
    upper_frontier,
)


def test_upper_frontier_keeps_only_points_no_other_beats() -> None:
    points = [(2.0, 0.7), (0.0, 0.4), (1.0, 0.8), (3.0, 0.75), (4.0, 0.9), (1.0, 0.5)]
    # (2, 0.7) and (3, 0.75) are beaten by (1, 0.8); (1, 0.5) by (1, 0.8)
    assert upper_frontier(points) == [(0.0, 0.4), (1.0, 0.8), (4.0, 0.9)]
    assert upper_frontier([(float("nan"), 1.0), (0.5, 0.3)]) == [(0.5, 0.3)]


def test_reward_at_kl_interpolates_between_pareto_points() -> None:
    points = [(0.0, 0.4), (1.0, 0.8), (4.0, 0.9), (2.0, 0.7)]
    assert reward_at_kl(points, 1.0) == pytest.approx(0.8)
    assert reward_at_kl(points, 0.5) == pytest.approx(0.6)  # halfway from 0.4 to 0.8
    assert reward_at_kl(points, 2.5) == pytest.approx(0.8 + 0.1 * 1.5 / 3)  # (1, .8) → (4, .9)
    assert reward_at_kl(points, 9.0) == pytest.approx(0.9)  # every point within: the best
    assert math.isnan(reward_at_kl([(2.0, 0.5)], 1.5))  # nothing within the budget


def test_mean_std_is_the_sample_standard_deviation() -> None:
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([float("nan"), 2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def row(method: str, value: float, seed: int, kl: float, reward: float,
        curve: list[tuple[float, float]], wall: float = 10.0) -> dict:  # fmt: skip
    return {"run": f"{method}-{value:g}", "method": method, "strength": "β", "value": value,
            "seed": seed, "kl": kl, "true_reward": reward, "total_wall_s": wall,
            "peak_rss_mb": {"train": 600.0 + seed},
            "curve": [{"step": i, "kl": k, "true_reward": r} for i, (k, r) in enumerate(curve)]}  # fmt: skip


def test_headline_pools_strengths_and_evaluations_per_seed_then_averages_seeds() -> None:
    rows = [
        # seed 1: β=1 reaches (1, 0.6) along training; β=0.1 ends at (3, 0.9)
        row("dpo", 1.0, 1, 1.0, 0.6, [(0.0, 0.4), (0.5, 0.5)]),
        row("dpo", 0.1, 1, 3.0, 0.9, [(0.0, 0.4), (2.0, 0.6)]),
        # seed 2: one run, (1.5, 0.7) halfway along training, ends past every budget
        row("dpo", 1.0, 2, 6.0, 0.8, [(0.0, 0.4), (1.5, 0.7)], wall=20.0),
        row("dpo", 0.1, 2, 6.5, 0.75, [(0.0, 0.4)], wall=20.0),
    ]
    [h] = headline(rows, budgets=(1.5, 3.0))
    # seed 1 at 1.5: between (1, 0.6) and (3, 0.9): 0.6 + 0.3 * 0.5 / 2 = 0.675; at 3: 0.9
    # seed 2 at 1.5: 0.7; at 3: between (1.5, 0.7) and (6, 0.8): 0.7 + 0.1 * 1.5 / 4.5
    at3 = 0.7 + 0.1 * 1.5 / 4.5
    assert h["seeds"] == 2
    assert h["reward_at_1.5"] == (pytest.approx(0.6875), pytest.approx(math.sqrt(2) * 0.0125))
    assert h["reward_at_3"][0] == pytest.approx((0.9 + at3) / 2)
    assert h["wall_s"] == (15.0, pytest.approx(math.sqrt(100 / 3)))
    assert h["peak_rss_mb"] == 602.0


def test_aggregate_gives_each_run_its_seed_spread_and_its_peak_along_training() -> None:
    rows = [row("ppo", 0.05, 1, 3.0, 0.7, [(0.0, 0.4), (1.0, 0.9)]),
            row("ppo", 0.05, 2, 2.0, 0.8, [(0.0, 0.4), (1.0, 0.6)])]  # fmt: skip
    [entry] = aggregate(rows)
    assert entry["run"] == "ppo-0.05" and entry["seeds"] == 2
    assert entry["true_reward"] == (pytest.approx(0.75), pytest.approx(math.sqrt(0.005)))
    # peaks: seed 1 at (1, 0.9) before falling to 0.7 (over-optimised); seed 2 its final (2, 0.8)
    assert entry["peak_true_reward"][0] == pytest.approx(0.85)
    assert entry["kl_at_peak"][0] == pytest.approx(1.5)
    assert run_points(rows[0]) == [(0.0, 0.4), (1.0, 0.9), (3.0, 0.7)]
