"""Win rate, its interval and the length-controlled readings, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from direct_align.evaluation.stats import (
    Z95,
    length_controlled_gain,
    length_controlled_win_rate,
    length_feature,
    logistic_fit,
    outcomes,
    reward_per_token,
    win_rate,
)


def test_outcomes_count_a_tie_as_half() -> None:
    assert outcomes([1.0, 0.2, 0.5], [0.0, 0.3, 0.5]) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="2 policy rewards against 1"):
        outcomes([1.0, 2.0], [1.0])


def test_win_rate_and_its_interval_by_hand() -> None:
    # 5 prompts: wins, tie, loss, win, win → outcomes 1, .5, 0, 1, 1: mean 0.7
    wins = win_rate([3, 2, 0, 5, 4], [1, 2, 1, 4, 0])
    assert (wins.wins, wins.ties, wins.losses, wins.prompts) == (3, 1, 1, 5)
    assert wins.rate == pytest.approx(0.7)
    # sample variance of (1, .5, 0, 1, 1): squares of (.3, -.2, -.7, .3, .3) = .09+.04+.49+.09+.09 = .8,
    # over n - 1 = 4: 0.2; standard error sqrt(0.2 / 5) = 0.2; half-width 1.96 × 0.2
    half = Z95 * 0.2
    assert wins.high == pytest.approx(min(1.0, 0.7 + half))
    assert wins.low == pytest.approx(0.7 - half)


def test_a_model_against_itself_has_rate_one_half_and_no_spread() -> None:
    wins = win_rate([0.3, 0.1, 0.9], [0.3, 0.1, 0.9])
    assert (wins.rate, wins.low, wins.high, wins.ties) == (0.5, 0.5, 0.5, 3)


def test_the_interval_stays_within_zero_and_one() -> None:
    wins = win_rate([1, 1, 1, 0], [0, 0, 0, 1])
    assert 0.0 <= wins.low < wins.rate == 0.75 < wins.high == 1.0
    assert win_rate([1.0], [0.0]).low == 0.0 and win_rate([1.0], [0.0]).high == 1.0


def test_length_feature_is_tanh_of_standardised_differences() -> None:
    x = length_feature([2.0, -2.0])  # sd (population) 2
    assert x.tolist() == pytest.approx([math.tanh(1.0), math.tanh(-1.0)])
    assert length_feature([3.0, 3.0]).tolist() == [0.0, 0.0]


def test_logistic_fit_recovers_a_known_line() -> None:
    # targets that are exactly σ(a + b x): the maximum-likelihood fit is (a, b) (up to the ridge)
    x = torch.linspace(-1, 1, 41, dtype=torch.float64)
    y = torch.sigmoid(0.4 + 1.5 * x)
    a, b = logistic_fit(x, y, l2=0.0)
    assert (a, b) == pytest.approx((0.4, 1.5), abs=1e-8)


def test_length_controlled_win_rate_removes_a_pure_length_effect() -> None:
    # the policy wins exactly where it answered longer, and is as often shorter as longer: at
    # matched length it wins half the time; the length coefficient is strongly positive
    policy_len = [10, 30, 10, 30, 10, 30, 10, 30]
    reference_len = [20] * 8
    policy = [0.0 if n < 20 else 1.0 for n in policy_len]
    reference = [0.5] * 8
    rate, coef = length_controlled_win_rate(policy, reference, policy_len, reference_len)
    assert win_rate(policy, reference).rate == 0.5
    assert rate == pytest.approx(0.5, abs=1e-9)
    assert coef > 3


def test_length_controlled_win_rate_without_length_differences_is_the_win_rate() -> None:
    policy, reference = [1, 1, 1, 0, 1], [0, 0, 0, 1, 0]
    rate, coef = length_controlled_win_rate(policy, reference, [5] * 5, [5] * 5)
    assert coef == pytest.approx(0.0, abs=1e-12)
    # the ridge pulls the intercept slightly toward 0: logit(0.8) = 1.386 becomes a bit smaller
    assert rate == pytest.approx(0.8, abs=5e-3) and rate < 0.8


def test_reward_per_token_and_the_length_controlled_gain_by_hand() -> None:
    # rewards 1 + 0.1 × tokens exactly: slope 0.1; policy +10 tokens longer on average → its
    # whole gain (1.0) is length, and the length-controlled gain is 0
    policy_len, reference_len = [20, 30], [10, 20]
    policy = [1 + 0.1 * n for n in policy_len]
    reference = [1 + 0.1 * n for n in reference_len]
    assert reward_per_token([*policy, *reference], [*policy_len, *reference_len]) == pytest.approx(0.1)
    gain, slope = length_controlled_gain(policy, reference, policy_len, reference_len)
    assert slope == pytest.approx(0.1) and gain == pytest.approx(0.0, abs=1e-12)
    assert reward_per_token([1.0, 2.0], [4, 4]) == 0.0
