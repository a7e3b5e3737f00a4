"""Micro-batches by token budget: coverage, budget, determinism, bucketing, and the Batcher.

Costs are computed here from the pair lengths, independently of ``layout_tokens``: a pair of
prompt P and responses C, R costs P + C + R tokens in the shared layout, 2P + C + R in the
packed one, and a padded micro-batch of k pairs costs 2k × (its longest prompt + response).
"""

from __future__ import annotations

import math

import pytest
import torch

from direct_align.data import PairDataset
from direct_align.data.batching import BUCKET_CHUNK, Batcher, budget_batches, epoch_batches
from direct_align.errors import ConfigError

LAYOUTS = ("padded", "packed", "shared")


def varied_pairs(n: int, seed: int, prompt: tuple[int, int] = (1, 60),
                 response: tuple[int, int] = (1, 40)) -> PairDataset:  # fmt: skip
    """``n`` pairs with uniformly random lengths (token values do not matter here)."""
    g = torch.Generator().manual_seed(seed)

    def length(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    return PairDataset([[1] * length(*prompt) for _ in range(n)],
                       [[5] * length(*response) for _ in range(n)],
                       [[6] * length(*response) for _ in range(n)])  # fmt: skip


def pair_cost(data: PairDataset, i: int, layout: str) -> int:
    p, c, r = len(data.prompt_ids[i]), len(data.chosen_ids[i]), len(data.rejected_ids[i])
    return p + c + r if layout == "shared" else 2 * p + c + r


def longest_row(data: PairDataset, i: int) -> int:
    return len(data.prompt_ids[i]) + max(len(data.chosen_ids[i]), len(data.rejected_ids[i]))


def batch_cost(data: PairDataset, batch: list[int], layout: str) -> int:
    if layout == "padded":
        return 2 * len(batch) * max(longest_row(data, i) for i in batch)
    return sum(pair_cost(data, i, layout) for i in batch)


def padding(data: PairDataset, batches: list[list[int]]) -> int:
    """Pad tokens of the padded layout: rows × width minus the real tokens."""
    return sum(batch_cost(data, b, "padded") - sum(pair_cost(data, i, "packed") for i in b)
               for b in batches)  # fmt: skip


DATA = varied_pairs(300, seed=0)


# ----------------------------------------------------------------------------- budget_batches


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("budget", [400, 900, 4000])
def test_budget_batches_cover_every_pair_once_within_the_budget(layout: str, budget: int) -> None:
    for epoch in range(3):
        batches = budget_batches(DATA, budget, layout, seed=1, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(DATA)))
        assert all(b for b in batches)
        for b in batches:
            assert len(b) == 1 or batch_cost(DATA, b, layout) <= budget
        # Not one pair a batch: the budget is actually filled.
        assert len(batches) < len(DATA) / 2


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_budget_batches_fill_greedily_in_length_order(layout: str) -> None:
    # Below BUCKET_CHUNK pairs, all pairs are sorted together and batches filled in cost order,
    # so the batch sizes follow from the sorted costs alone, whatever the shuffle.
    assert len(DATA) <= BUCKET_CHUNK
    budget = 700
    sizes, total, count = [], 0, 0
    for c in sorted(pair_cost(DATA, i, layout) for i in range(len(DATA))):
        if count and total + c > budget:
            sizes.append(count)
            total, count = 0, 0
        total, count = total + c, count + 1
    sizes.append(count)
    batches = budget_batches(DATA, budget, layout, seed=4, epoch=2)
    by_cost = sorted(batches, key=lambda b: max(pair_cost(DATA, i, layout) for i in b))
    assert [len(b) for b in by_cost] == sizes
    assert [len(b) for b in batches] != sizes  # the batches themselves are shuffled


@pytest.mark.parametrize("layout", LAYOUTS)
def test_budget_batches_are_seeded_by_seed_and_epoch(layout: str) -> None:
    first = budget_batches(DATA, 900, layout, seed=3, epoch=0)
    assert budget_batches(DATA, 900, layout, seed=3, epoch=0) == first
    epochs = [budget_batches(DATA, 900, layout, seed=3, epoch=e) for e in range(4)]
    assert len({tuple(map(tuple, b)) for b in epochs}) == 4  # each epoch its own batches
    # Membership changes too, not only the order of the batches.
    assert {frozenset(b) for b in epochs[0]} != {frozenset(b) for b in epochs[1]}
    assert budget_batches(DATA, 900, layout, seed=4, epoch=0) != first
    torch.manual_seed(999)  # independent of the global RNG
    assert budget_batches(DATA, 900, layout, seed=3, epoch=0) == first


def test_bucketing_wastes_less_padding_than_random_batches() -> None:
    data = varied_pairs(400, seed=2, prompt=(1, 120), response=(1, 80))
    bucketed = budget_batches(data, 3000, "padded", seed=0, epoch=0)
    # Random batches of the very same sizes.
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(5)).tolist()
    random_batches, start = [], 0
    for b in bucketed:
        random_batches.append(order[start : start + len(b)])
        start += len(b)
    assert sorted(map(len, random_batches)) == sorted(map(len, bucketed))
    assert max(map(len, bucketed)) >= 4  # batches of several pairs, where padding can arise
    waste, random_waste = padding(data, bucketed), padding(data, random_batches)
    assert waste < random_waste / 2
    # Each pair pads its shorter response row to its longer one at least; bucketing stays
    # within a small factor of that floor.
    floor = sum(abs(len(data.chosen_ids[i]) - len(data.rejected_ids[i])) for i in range(len(data)))
    assert floor < waste < 3 * floor < random_waste


def test_budget_batches_split_large_data_into_sorted_chunks() -> None:
    # More pairs than BUCKET_CHUNK: every pair is still used once and the budget still holds.
    data = varied_pairs(BUCKET_CHUNK + 300, seed=3)
    for layout in LAYOUTS:
        batches = budget_batches(data, 600, layout, seed=0, epoch=1)
        assert sorted(i for b in batches for i in b) == list(range(len(data)))
        assert all(len(b) == 1 or batch_cost(data, b, layout) <= 600 for b in batches)


# ----------------------------------------------------------------------------- Batcher


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batcher_refuses_a_budget_below_the_largest_pair(layout: str) -> None:
    if layout == "padded":
        largest = max(2 * longest_row(DATA, i) for i in range(len(DATA)))
    else:
        largest = max(pair_cost(DATA, i, layout) for i in range(len(DATA)))
    with pytest.raises(ConfigError, match=f"{largest} tokens of the largest pair"):
        Batcher(DATA, batch_size=4, seed=0, layout=layout, max_tokens=largest - 1)
    batcher = Batcher(DATA, batch_size=4, seed=0, layout=layout, max_tokens=largest)
    batches = batcher.micro_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(DATA)))
    assert all(len(b) == 1 or batch_cost(DATA, b, layout) <= largest for b in batches)
    # Without a budget, no such check: any batch size works.
    assert len(Batcher(DATA, batch_size=4, seed=0, layout=layout).micro_batches(0)) == 75


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batcher_micro_batches_by_count_or_budget(layout: str) -> None:
    by_count = Batcher(DATA, batch_size=7, seed=2, layout=layout)
    by_budget = Batcher(DATA, batch_size=7, seed=2, layout=layout, max_tokens=1000)
    for epoch in range(3):
        assert by_count.micro_batches(epoch) == epoch_batches(len(DATA), 7, 2, epoch)
        assert by_budget.micro_batches(epoch) == budget_batches(DATA, 1000, layout, 2, epoch)
    assert by_count.micro_batches(0) != by_count.micro_batches(1)


@pytest.mark.parametrize("grad_accum", [1, 3, 4])
def test_batcher_steps_by_budget(grad_accum: int) -> None:
    batcher = Batcher(DATA, batch_size=1, seed=0, layout="packed", max_tokens=800)
    for epoch in range(3):
        micro = len(budget_batches(DATA, 800, "packed", 0, epoch))
        assert batcher.steps(epoch, grad_accum) == -(-micro // grad_accum)
        assert batcher.steps(epoch, grad_accum) < batcher.steps(epoch, 1) or grad_accum == 1


def test_total_steps_sums_the_epochs() -> None:
    # Above BUCKET_CHUNK pairs the number of budget micro-batches varies between epochs, so
    # the total must add the epochs up rather than multiply the first one.
    data = varied_pairs(BUCKET_CHUNK + 476, seed=1)
    batcher = Batcher(data, batch_size=4, seed=0, layout="padded", max_tokens=600)
    per_epoch = [math.ceil(len(budget_batches(data, 600, "padded", 0, e)) / 2) for e in range(4)]
    assert len(set(per_epoch)) > 1
    assert batcher.total_steps(epochs=4, grad_accum=2) == sum(per_epoch)
    assert batcher.total_steps(epochs=4, grad_accum=2, max_steps=7) == 7
    by_count = Batcher(data, batch_size=4, seed=0, layout="shared")
    assert by_count.total_steps(epochs=2, grad_accum=3) == 2 * 125
