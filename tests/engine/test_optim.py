"""How weights are held and updated: bf16 with stochastic rounding against round-to-nearest,
8-bit AdamW states, and the step taken inside backward (the same step, no gradient kept)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from direct_align.engine.optim import StepInBackward, adamw_factory, make_adamw, trained_dtype
from direct_align.errors import ConfigError

pytest.importorskip("torchao")


def cfg(**values) -> SimpleNamespace:
    return SimpleNamespace(**{"weights": "fp32", "optimizer": "adamw", "step_in_backward": False,
                              "learning_rate": 1e-3, **values})  # fmt: skip


def drift(weights: str, steps: int = 200, lr: float = 1e-4) -> float:
    """The mean change of 4096 weights of 1.0 after ``steps`` AdamW steps on a constant gradient
    of 1 (each step moves a weight by about lr: far below half a bf16 step at 1, 2⁻⁸)."""
    p = nn.Parameter(torch.ones(4096, dtype=trained_dtype(cfg(weights=weights))))
    optimizer = adamw_factory(cfg(weights=weights, learning_rate=lr))([{"params": [p], "weight_decay": 0.0}])
    torch.manual_seed(0)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        optimizer.step()
    return (p.float() - 1.0).mean().item()


def test_stochastic_rounding_keeps_the_small_steps_that_rounding_to_nearest_loses() -> None:
    assert trained_dtype(cfg(weights="bf16")) == torch.bfloat16 == trained_dtype(cfg(weights="bf16-nearest"))
    exact = drift("fp32")
    assert exact == pytest.approx(-200 * 1e-4, rel=0.02)  # Adam's step on a constant gradient: lr
    assert drift("bf16-nearest") == 0.0  # every update rounds back to 1.0
    assert drift("bf16") == pytest.approx(exact, rel=0.05)  # unbiased on average


def test_eight_bit_states_take_a_quarter_of_the_memory_and_follow_adamw() -> None:
    torch.manual_seed(0)
    reference, quantised = (nn.Linear(256, 64, bias=False) for _ in range(2))
    quantised.load_state_dict(reference.state_dict())
    optimizers = [adamw_factory(cfg(optimizer=kind))([{"params": list(m.parameters()), "weight_decay": 0.0}])
                  for kind, m in (("adamw", reference), ("adamw-8bit", quantised))]  # fmt: skip
    x = torch.randn(32, 256)
    for _ in range(5):
        for m, optimizer in zip((reference, quantised), optimizers):
            m(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    state = optimizers[1].state[quantised.weight]
    codes = state["exp_avg"].codes if hasattr(state["exp_avg"], "codes") else state["exp_avg"]
    assert codes.dtype == torch.uint8 and codes.numel() == quantised.weight.numel()
    moved = (reference.weight - quantised.weight).abs().max().item()
    assert 0 < moved < 0.1 * 5 * 1e-3 * 10  # close to AdamW's path, not the same


def two_layer(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def test_the_step_in_backward_is_adamw_and_keeps_no_gradient() -> None:
    whole, fused = two_layer(0), two_layer(0)
    groups = lambda m: [{"params": list(m.parameters()), "weight_decay": 0.01}]  # noqa: E731
    plain = make_adamw(groups(whole), cfg())
    in_backward = make_adamw(groups(fused), cfg(step_in_backward=True))
    assert isinstance(in_backward, StepInBackward) and len(in_backward.inner) == 4
    schedule = torch.optim.lr_scheduler.LambdaLR(in_backward, lambda step: 1.0 / (step + 1))
    plain_schedule = torch.optim.lr_scheduler.LambdaLR(plain, lambda step: 1.0 / (step + 1))
    x = torch.randn(16, 8)
    for _ in range(3):
        whole(x).square().mean().backward()
        plain.step()
        plain.zero_grad()
        plain_schedule.step()
        fused(x).square().mean().backward()
        assert all(p.grad is None for p in fused.parameters())  # freed as each was used
        in_backward.step()
        schedule.step()
    for a, b in zip(whole.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same arithmetic, parameter by parameter
    assert in_backward.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    # its state round-trips, and a second backward in one step is refused
    restored = make_adamw(groups(two_layer(0)), cfg(step_in_backward=True))
    restored.load_state_dict(in_backward.state_dict())
    assert [o.state_dict()["state"][0]["step"] for o in restored.inner.values()] == [3.0] * 4
    fused(x).sum().backward()
    with pytest.raises(ConfigError, match="took two"):
        fused(x).sum().backward()


def test_row_blocks_update_a_large_parameter_as_the_whole_would_be(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchao.optim import AdamW8bit

    from direct_align.engine import optim
    from direct_align.engine.optim import RowBlocks, row_blocks

    monkeypatch.setattr(optim, "BLOCK_ELEMENTS", 96 * 64)
    # 10 blocks of 96 rows, the last 40 rows (2560 values, too few to quantise) joined to the 10th
    assert row_blocks(torch.zeros(1000, 64), most=96 * 64) == [(a, a + 96) for a in range(0, 864, 96)] + [(864, 1000)]
    assert row_blocks(torch.zeros(10, 64), most=96 * 64) is None  # small: whole
    # rows of 100 values: a whole number of 256-value blocks takes a multiple of 64 rows
    assert row_blocks(torch.zeros(1000, 100), most=20000) == [(0, 192), (192, 384), (384, 576), (576, 768), (768, 1000)]
    torch.manual_seed(0)
    whole, blocked = nn.Parameter(torch.randn(1000, 64)), nn.Parameter(torch.zeros(1000, 64))
    blocked.data.copy_(whole.data)
    plain = AdamW8bit([whole], lr=1e-2)
    rows = RowBlocks([{"params": [blocked]}], lambda groups: AdamW8bit(groups, lr=1e-2))
    assert len(rows.param_groups[0]["params"]) == 10  # the blocks, each a parameter of its own
    for _ in range(3):
        grad = torch.randn(1000, 64)
        whole.grad, blocked.grad = grad.clone(), grad.clone()
        plain.step()
        rows.step()
        rows.zero_grad()
        assert blocked.grad is None
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-7)  # the same update, in blocks
    assert not torch.equal(blocked.data, torch.zeros_like(blocked))
