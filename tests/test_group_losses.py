"""Group losses on [prompts, k] tensors: values and gradients derived by hand in each docstring,
and the argument checks of :func:`group_loss`."""

from __future__ import annotations

import math

import pytest
import torch

from direct_align.group_losses import GROUP_LOSSES, LossError, group_loss, lipo_loss, rebel_loss


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_the_registry() -> None:
    assert set(GROUP_LOSSES) == {"rebel", "lipo", "sppo", "rloo"}
    assert {n for n, s in GROUP_LOSSES.items() if s.rl} == {"rloo"}
    assert {n for n, s in GROUP_LOSSES.items() if s.needs_sampling} == {"rebel", "sppo", "rloo"}
    assert {n for n, s in GROUP_LOSSES.items() if s.reference_free} == {"sppo"}
    assert GROUP_LOSSES["rebel"].options == ("eta",) and GROUP_LOSSES["sppo"].options == ("eta",)
    assert GROUP_LOSSES["rloo"].options == ("clip",) and GROUP_LOSSES["lipo"].options == ()


def test_rebel_by_hand() -> None:
    """k = 2, rewards (1, 0), β = 0.5, η = 2. Penalties β(log π_t − log π_ref) =
    0.5·((−1) − (−1.5), (−2) − (−1)) = (0.25, −0.5), so r' = (0.75, 0.5) and r'_1 − r'_2 = 0.25.
    Policy (−0.5, −2.0) against π_t (−1, −2): a = (0.5, 0), (a_1 − a_2)/η = 0.25: error 0, loss 0.
    Policy (0.5, −2.0): a = (1.5, 0), error 0.75 − 0.25 = 0.5, loss 0.25; the gradient of the
    square, 2·0.5/η = 0.5 on a_1 and −0.5 on a_2."""
    common = {"sampling_logps": t([-1.0, -2.0]), "ref_logps": t([-1.5, -1.0]),
              "rewards": t([1.0, 0.0]), "beta": 0.5, "eta": 2.0}  # fmt: skip
    loss, _ = group_loss("rebel", logps=t([-0.5, -2.0]), **common)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    logps = t([0.5, -2.0]).requires_grad_()
    loss, metrics = group_loss("rebel", logps=logps, **common)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    torch.testing.assert_close(logps.grad, t([0.5, -0.5]))
    assert metrics["group/kl_penalty"] == pytest.approx((0.25 - 0.5) / 2)
    assert metrics["group/residual"] == pytest.approx(0.5)


def test_rebel_with_k_samples_is_the_mean_over_its_pairs() -> None:
    """k = 3: the mean of the three k = 2 regressions (0, 1), (0, 2), (1, 2)."""
    torch.manual_seed(0)
    x = {k: torch.randn(1, 3) for k in ("logps", "sampling_logps", "ref_logps", "rewards")}
    whole, _ = rebel_loss(**x, beta=0.1, eta=0.5)
    pairs = [rebel_loss(**{k: v[:, [i, j]] for k, v in x.items()}, beta=0.1, eta=0.5)[0]
             for i, j in ((0, 1), (0, 2), (1, 2))]  # fmt: skip
    torch.testing.assert_close(whole, sum(pairs) / 3)


def test_lipo_by_hand() -> None:
    """k = 2, rewards (1, 0): ψ = (1, 0), gains G = 2^ψ − 1 = (1, 0). β = 1, reference 0,
    policy (1, 0): scores s = (1, 0), ranks τ = (1, 2), so Δ = |1 − 0|·|1/ln 2 − 1/ln 3| =
    1.442695 − 0.910239 = 0.532456 and the loss Δ·(−log σ(1)) = 0.532456 · 0.313262 = 0.166798.
    Rewards (10, 3) scale to the same ψ: the same loss."""
    delta = 1 / math.log(2) - 1 / math.log(3)
    expected = delta * -math.log(1 / (1 + math.exp(-1)))
    for rewards in (t([1.0, 0.0]), t([10.0, 3.0])):
        loss, metrics = group_loss("lipo", logps=t([1.0, 0.0]), ref_logps=t([0.0, 0.0]),
                                   rewards=rewards, beta=1.0)  # fmt: skip
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert metrics["group/ranked_pairs"] == 1 and metrics["group/accuracy"] == 1


def test_lipo_weights_by_reward_gap_and_rank_and_ignores_ties() -> None:
    """k = 3, rewards (1, 0.5, 0): ψ = (1, 0.5, 0), G = (1, √2 − 1, 0). All scores 0 (ranks by
    position: τ = 1, 2, 3), so each ranked pair adds Δ_ij·log 2 with
    Δ_01 = (2 − √2)·(1/ln 2 − 1/ln 3), Δ_02 = 1·(1/ln 2 − 1/ln 4), Δ_12 = (√2 − 1)·(1/ln 3 − 1/ln 4).
    A prompt whose rewards all tie has no ranked pair: loss 0."""
    d = [1 / math.log(1 + r) for r in (1, 2, 3)]
    g = [1.0, math.sqrt(2) - 1, 0.0]
    expected = math.log(2) * sum(abs(g[i] - g[j]) * abs(d[i] - d[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    losses, extras = lipo_loss(logps=t([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]), ref_logps=torch.zeros(2, 3),
                               rewards=t([1.0, 0.5, 0.0], [2.0, 2.0, 2.0]), beta=0.5)  # fmt: skip
    assert losses[0].item() == pytest.approx(expected, rel=1e-6)
    assert losses[1].item() == 0 and extras["ranked_pairs"].tolist() == [3, 0]


def test_sppo_by_hand() -> None:
    """Rewards (ln 3, 0): σ(ln 3) = 3/4, so the win rates are P̂ = ((1/2 + 3/4)/2, (1/4 + 1/2)/2)
    = (0.625, 0.375) and with η = 4 the targets η(P̂ − 1/2) = (0.5, −0.5). Log-ratios to π_t of
    (0.5, −0.5) give 0; of (0, 0) the mean square 0.25, with gradient 2·(0 − ±0.5)/2 = ∓0.5."""
    rewards, sampling = t([math.log(3), 0.0]), t([-2.0, -2.0])
    loss, metrics = group_loss("sppo", logps=t([-1.5, -2.5]), sampling_logps=sampling,
                               rewards=rewards, eta=4.0)  # fmt: skip
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["group/win_rate_spread"] == pytest.approx(0.25)
    logps = sampling.clone().requires_grad_()
    loss, _ = group_loss("sppo", logps=logps, sampling_logps=sampling, rewards=rewards, eta=4.0)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    torch.testing.assert_close(logps.grad, t([-0.5, 0.5]))


def test_rloo_by_hand() -> None:
    """k = 3, rewards (1, 2, 6), β = 1, log π_t − log π_ref = (1, 0, 0): R = (0, 2, 6), mean 8/3,
    A = 3/2·(R − mean) = (−4, −1, 5), i.e. each R less the mean of the other two. At the first
    step (policy = π_t, ρ = 1) the loss −mean(A) is 0 and its gradient −A/3 = (4/3, 1/3, −5/3):
    REINFORCE. With sample 3 already at ρ = 2 (> 1 + ε for ε = 0.2), its clipped term 1.2·5 is
    the smaller one: no gradient on it, and the loss −(−4·1 − 1·1 + 1.2·5)/3 = −1/3."""
    sampling = t([-3.0, -3.0, -3.0])
    common = {"sampling_logps": sampling, "ref_logps": t([-4.0, -3.0, -3.0]),
              "rewards": t([1.0, 2.0, 6.0]), "beta": 1.0}  # fmt: skip
    logps = sampling.clone().requires_grad_()
    loss, metrics = group_loss("rloo", logps=logps, **common)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logps.grad, t([4 / 3, 1 / 3, -5 / 3]))
    assert metrics["group/advantage_abs"] == pytest.approx(10 / 3)
    logps = t([-3.0, -3.0, -3.0 + math.log(2)]).requires_grad_()
    loss, metrics = group_loss("rloo", logps=logps, **common)
    assert loss.item() == pytest.approx(-1 / 3, rel=1e-5)
    loss.backward()
    assert logps.grad[0, 2].item() == 0 and metrics["group/clipped"] == pytest.approx(1 / 3)


def test_only_the_policy_log_probs_get_gradients() -> None:
    x = {k: torch.randn(2, 4, requires_grad=True) for k in ("sampling_logps", "ref_logps", "rewards")}
    for name in GROUP_LOSSES:
        logps = torch.randn(2, 4, requires_grad=True)
        loss, _ = group_loss(name, logps=logps, **x)
        loss.backward()
        assert logps.grad is not None and all(v.grad is None for v in x.values())


@pytest.mark.parametrize(("call", "message"), [
    ({"name": "rebell"}, "unknown group loss 'rebell'"),
    ({"name": "lipo", "beta": 0.0}, "loss 'lipo': beta must be a finite number > 0"),
    ({"name": "lipo", "eta": 1.0}, "loss 'lipo' has no option 'eta'"),
    ({"name": "rebel", "eta": -1.0}, "loss 'rebel': eta must be a finite number > 0"),
])  # fmt: skip
def test_bad_names_and_options_are_loss_errors(call: dict, message: str) -> None:
    name = call.pop("name")
    with pytest.raises(LossError, match=message):
        group_loss(name, logps=torch.zeros(1, 2), sampling_logps=torch.zeros(1, 2),
                   rewards=torch.zeros(1, 2), **call)  # fmt: skip


def test_shapes_and_the_sampling_log_probs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"logps must be a \[prompts, k\] tensor with k >= 2"):
        group_loss("lipo", logps=torch.zeros(3), rewards=torch.zeros(3))
    with pytest.raises(ValueError, match=r"rewards has shape \(1, 3\), expected \(1, 2\)"):
        group_loss("lipo", logps=torch.zeros(1, 2), rewards=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="loss 'rebel' needs sampling_logps"):
        group_loss("rebel", logps=torch.zeros(1, 2), rewards=torch.zeros(1, 2))
