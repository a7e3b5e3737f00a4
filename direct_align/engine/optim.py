"""How trained weights are held and updated: fp32 master weights or bf16 weights, AdamW states
in fp32 or 8 bits, and the step taken whole after backward or parameter by parameter inside it.

Bytes per trained parameter before activations (weights + gradients + AdamW's two moments):

| ``--weights`` | ``--optimizer adamw`` | ``adamw-8bit`` | with ``--step-in-backward`` |
|---|---|---|---|
| fp32 | 4 + 4 + 8 = 16 | 4 + 4 + 2 = 10 | the gradient freed as it is used: 12, 6 |
| bf16, bf16-nearest | 2 + 2 + 4 = 8 (the moments in bf16, as the weights) | 2 + 2 + 2 = 6 | 6, 4 |

(8-bit states add a 4-byte scale per block of 256 values of each moment: 0.03 bytes.)

- **bf16 weights** lose an update smaller than half a bf16 step of the weight (8 bits of
  mantissa: a weight of 1 moves in steps of 2⁻⁷) when it is rounded to nearest, and a small
  learning rate makes most updates that small. ``--weights bf16`` rounds each updated weight
  stochastically instead — up or down with the probabilities that make the rounding unbiased — so
  small updates survive on average (Zamirai et al. 2020, "Revisiting BFloat16 Training"), using
  torchao's AdamW with ``bf16_stochastic_round``. ``bf16-nearest`` is plain bf16 AdamW (states in
  bf16 too), kept to measure what the rounding buys.
- **8-bit states**: torchao's ``AdamW8bit`` (block-wise quantised moments, Dettmers et al. 2022,
  "8-bit Optimizers via Block-wise Quantization"), which runs on the CPU and on CUDA, and rounds
  bf16 weights stochastically as above.
- **The step in backward**: one optimizer per parameter, stepped by a hook when that parameter's
  gradient is complete (``register_post_accumulate_grad_hook``), which then frees the gradient,
  so no whole-model gradient is ever held (as torchtune's ``optimizer_in_bwd``). It cannot
  accumulate gradients over micro-batches, clip by the global norm (the norm is known only after
  every parameter has stepped) or wait for DDP's all-reduce, so those are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from direct_align.errors import ConfigError

WEIGHTS = ("fp32", "bf16", "bf16-nearest")
OPTIMIZERS = ("adamw", "adamw-8bit")


def trained_dtype(cfg: Any) -> torch.dtype:
    """The dtype trained weights are held in (``cfg.weights``; fp32 where a command has none)."""
    return torch.float32 if getattr(cfg, "weights", "fp32") == "fp32" else torch.bfloat16


def adamw_factory(cfg: Any) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """A function from parameter groups to the configured AdamW (``cfg.weights``,
    ``cfg.optimizer``, ``cfg.learning_rate``). torchao's optimizers update a large parameter in
    row blocks (:class:`RowBlocks`), so that their fp32 temporaries stay small."""
    weights, kind, lr = getattr(cfg, "weights", "fp32"), getattr(cfg, "optimizer", "adamw"), cfg.learning_rate
    if kind == "adamw" and weights in ("fp32", "bf16-nearest"):
        return lambda groups: torch.optim.AdamW(groups, lr=lr)
    if kind == "adamw":  # bf16 weights and moments, stochastic rounding
        from torchao.optim import _AdamW

        return lambda groups: RowBlocks(groups, lambda g: _AdamW(g, lr=lr, bf16_stochastic_round=True))
    from torchao.optim import AdamW8bit

    return lambda groups: RowBlocks(groups, lambda g: AdamW8bit(g, lr=lr, bf16_stochastic_round=weights == "bf16"))


BLOCK_ELEMENTS = 1 << 24  # a row block of at most 16M values: 64 MB in fp32
MIN_QUANTISED = 4096  # torchao keeps the moments of a smaller tensor in full precision


def row_blocks(p: torch.Tensor, most: int | None = None) -> list[tuple[int, int]] | None:
    """Row ranges [a, b) that split ``p`` into blocks of at most ``most`` values, each a whole
    number of 256-value quantisation blocks where the row length allows, the last one merged
    into the one before when it is too small for torchao to quantise; None for a parameter
    small enough to update whole (``most``: default :data:`BLOCK_ELEMENTS`)."""
    most = most or BLOCK_ELEMENTS
    if p.ndim < 2 or p.numel() <= most:
        return None
    row = p.numel() // p.shape[0]
    rows = max(1, most // row)
    multiple = 256 // math.gcd(row, 256)
    rows = max(multiple, rows - rows % multiple)
    spans = [(a, min(a + rows, p.shape[0])) for a in range(0, p.shape[0], rows)]
    if len(spans) > 1 and (spans[-1][1] - spans[-1][0]) * row < MIN_QUANTISED:
        spans[-2:] = [(spans[-2][0], spans[-1][1])]  # a last block too small to be quantised
    return spans


class RowBlocks(torch.optim.Optimizer):
    """An optimizer that updates each large parameter as row blocks, each a parameter of its own
    to the inner optimizer (a view of the parameter's rows, with a view of its gradient's), so
    that an update's temporaries (torchao's fp32 copies of a weight, its gradient and its
    moments) are those of a block, not of a whole embedding matrix. The arithmetic, and every
    state, is the inner optimizer's: a block's 8-bit moments are quantised in the same 256-value
    blocks as the whole parameter's would be."""

    def __init__(self, groups: list[dict[str, Any]], make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]) -> None:  # fmt: skip
        self.blocks: list[tuple[nn.Parameter, list[tuple[nn.Parameter, int, int]]]] = []
        inner_groups = []
        for group in groups:
            params = []
            for p in group["params"]:
                spans = row_blocks(p)
                if spans is None:
                    params.append(p)
                    continue
                views = [(nn.Parameter(p.detach()[a:b]), a, b) for a, b in spans]
                self.blocks.append((p, views))
                params += [view for view, _, _ in views]
            inner_groups.append({**group, "params": params})
        self.inner = make(inner_groups)
        self.param_groups = self.inner.param_groups
        self.defaults = self.inner.defaults
        self.state = self.inner.state
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for p, views in self.blocks:  # views of the parameter as it is now (it may have moved)
            for view, a, b in views:
                view.data = p.detach()[a:b]
                view.grad = None if p.grad is None else p.grad[a:b]
        self.inner.step()
        for _, views in self.blocks:
            for view, _, _ in views:
                view.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for p, _ in self.blocks:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups


class StepInBackward(torch.optim.Optimizer):
    """One optimizer per trained parameter, each stepped by a hook as soon as its gradient is
    complete, which then sets the gradient to None. ``step`` and ``zero_grad`` do nothing: the
    work is done in backward. Its ``param_groups`` are those of the inner optimizers, so a
    learning-rate schedule sets every parameter's rate; ``state_dict`` holds every inner one's.
    """

    def __init__(self, groups: list[dict[str, Any]], make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]) -> None:  # fmt: skip
        self.inner: dict[nn.Parameter, torch.optim.Optimizer] = {}
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self.inner[p] = make([{"params": [p], **options}])
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.inner]
        self.stepped: set[int] = set()  # the parameters stepped since the last ``step``
        self.param_groups = [g for opt in self.inner.values() for g in opt.param_groups]
        self.defaults = {}
        self.state = {}  # type: ignore[assignment]  # each inner optimizer keeps its own
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    def _step(self, param: nn.Parameter) -> None:
        if id(param) in self.stepped:  # a second backward in one step would step twice
            raise ConfigError("--step-in-backward takes one backward pass an optimizer step, and "
                              "this step took two (micro-batches); use settings that make one")  # fmt: skip
        self.stepped.add(id(param))
        optimizer = self.inner[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Nothing to step (every parameter stepped in backward): the next step begins."""
        self.stepped.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: every gradient was freed as it was used."""

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [opt.state_dict() for opt in self.inner.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict["inner"]
        if len(inner) != len(self.inner):
            raise ValueError(f"{len(inner)} optimizers saved, {len(self.inner)} parameters train")
        for opt, state in zip(self.inner.values(), inner):
            opt.load_state_dict(state)
        self.param_groups = [g for opt in self.inner.values() for g in opt.param_groups]


def make_adamw(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    """AdamW as configured over ``groups``: whole, or stepped in backward."""
    make = adamw_factory(cfg)
    if getattr(cfg, "step_in_backward", False):
        return StepInBackward(groups, make)
    return make(groups)
