"""The order of micro-batches in each epoch: a fixed number of pairs, or a token budget.

Both are deterministic in (seed, epoch), so a checkpoint needs only the position (epoch,
micro-batch) to continue with the very same batches.

Token budget (``max_tokens``): pairs of similar length are bucketed together (sorted within
chunks of a shuffled order), each micro-batch takes pairs while the tokens its layout would
compute stay within the budget, and the micro-batches are shuffled. In the padded layout the
cost counts padding (rows × longest row), which bucketing keeps small; in the packed layouts it
is the exact token count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from typing import Protocol

import torch

from direct_align.data.packing import layout_tokens
from direct_align.data.tokenize import PairDataset
from direct_align.errors import ConfigError

BUCKET_CHUNK = 1024  # pairs sorted together by length before a budget is filled


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of ``batch_size`` pairs: a permutation seeded by (seed, epoch), then chunks."""
    order = _permutation(n, seed, epoch)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def budget_batches(data: PairDataset, max_tokens: int, layout: str, seed: int,
                   epoch: int) -> list[list[int]]:  # fmt: skip
    """Micro-batches whose ``layout`` cost stays within ``max_tokens`` (see module docstring)."""
    order = _permutation(len(data), seed, epoch)
    cost = [layout_tokens(data, i, layout) for i in range(len(data))]
    longest = [max(len(data.chosen_ids[i]), len(data.rejected_ids[i])) + len(data.prompt_ids[i])
               for i in range(len(data))]  # fmt: skip
    batches: list[list[int]] = []
    for start in range(0, len(order), BUCKET_CHUNK):
        chunk = sorted(order[start : start + BUCKET_CHUNK], key=cost.__getitem__)
        current: list[int] = []
        total = width = 0  # sum of costs, longest row of the micro-batch being filled
        for i in chunk:
            t, w = total + cost[i], max(width, longest[i])
            needed = 2 * (len(current) + 1) * w if layout == "padded" else t
            if current and needed > max_tokens:
                batches.append(current)
                current, t, w = [], cost[i], longest[i]
            current.append(i)
            total, width = t, w
        if current:
            batches.append(current)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7)
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


class Batcher:
    """Micro-batches per epoch for a dataset, with ``batch_size`` pairs or ``max_tokens``."""

    def __init__(self, data: PairDataset, *, batch_size: int, seed: int, layout: str,
                 max_tokens: int | None = None) -> None:  # fmt: skip
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.layout, self.max_tokens = layout, max_tokens
        if max_tokens is not None:
            if layout == "padded":
                largest = max(2 * (len(data.prompt_ids[i]) + max(len(data.chosen_ids[i]),
                              len(data.rejected_ids[i]))) for i in range(len(data)))  # fmt: skip
            else:
                largest = max(layout_tokens(data, i, layout) for i in range(len(data)))
            if largest > max_tokens:
                raise ConfigError(f"--max-tokens-per-batch {max_tokens} is below the {largest} "
                                  f"tokens of the largest pair in the {layout} layout")  # fmt: skip
        self.micro_batches = lru_cache(maxsize=4)(self._micro_batches)

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        if self.max_tokens is None:
            return epoch_batches(len(self.data), self.batch_size, self.seed, epoch)
        return budget_batches(self.data, self.max_tokens, self.layout, self.seed, epoch)

    def steps(self, epoch: int, grad_accum: int) -> int:
        """Optimizer steps in ``epoch``."""
        return math.ceil(len(self.micro_batches(epoch)) / grad_accum)

    def total_steps(self, epochs: int, grad_accum: int, max_steps: int | None = None) -> int:
        """``max_steps``, or the optimizer steps of ``epochs`` passes."""
        return max_steps or sum(self.steps(e, grad_accum) for e in range(epochs))

    def step_groups(self, grad_accum: int, position: Position) -> Iterator[list[list[int]]]:
        """Yield the micro-batches of each optimizer step from ``position`` on (epochs repeat).

        The caller advances ``position.micro`` by the micro-batches it trained on, so that the
        position is always the one to checkpoint; the generator only reads it.
        """
        while True:
            micro = self.micro_batches(position.epoch)
            while position.micro < len(micro):
                yield micro[position.micro : position.micro + grad_accum]
            position.epoch, position.micro = position.epoch + 1, 0


class Position(Protocol):
    """Where a pass over the data is: the epoch, and micro-batches of it already consumed."""

    epoch: int
    micro: int
