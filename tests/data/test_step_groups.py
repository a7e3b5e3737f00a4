"""The order of micro-batches and steps: epochs, step groups, resume from a saved position.
(Token-budget batching itself: test_batching.py.)"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass

import pytest
import torch

from direct_align.data import PairDataset
from direct_align.data.batching import Batcher, budget_batches, epoch_batches


@dataclass(frozen=True)
class Settings:
    """The settings the batching reads (as a command's settings name them)."""

    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 42
    layout: str = "shared"
    max_tokens_per_batch: int | None = None


@dataclass
class Position:
    """A loop's position, as the offline and reward-model loops keep it."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    pairs_seen: int = 0


# ----------------------------------------------------------------------------- epoch_batches


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (12, 4), (1, 8), (7, 1), (5, 5)])
def test_epoch_batches_partition_the_data(n: int, batch_size: int) -> None:
    batches = epoch_batches(n, batch_size, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(n))
    sizes = [len(b) for b in batches]
    full, rest = divmod(n, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest else [])


def test_epoch_batches_are_seeded_by_seed_and_epoch() -> None:
    n, bs = 50, 8
    first = epoch_batches(n, bs, seed=1, epoch=0)
    assert epoch_batches(n, bs, seed=1, epoch=0) == first
    assert [i for b in first for i in b] != list(range(n))  # shuffled
    epochs = [[i for b in epoch_batches(n, bs, seed=1, epoch=e) for i in b] for e in range(4)]
    assert len({tuple(order) for order in epochs}) == 4  # each epoch its own order
    assert epoch_batches(n, bs, seed=2, epoch=0) != first
    # The order does not depend on the global RNG.
    torch.manual_seed(999)
    assert epoch_batches(n, bs, seed=1, epoch=0) == first


# ----------------------------------------------------------------------------- steps per epoch


def same_length_pairs(n: int) -> PairDataset:
    """``n`` pairs; with a fixed batch size only their number matters."""
    return PairDataset([[1, 7]] * n, [[8, 2]] * n, [[9, 2]] * n)


def batcher(n: int, cfg: Settings) -> Batcher:
    return Batcher(same_length_pairs(n), batch_size=cfg.batch_size, seed=cfg.seed,
                   layout=cfg.layout, max_tokens=cfg.max_tokens_per_batch)  # fmt: skip


def steps_per_epoch(n: int, cfg: Settings) -> int:
    """Steps of epoch 0 (every epoch has as many with a fixed batch size)."""
    return batcher(n, cfg).steps(0, cfg.grad_accum)


@pytest.mark.parametrize(
    ("n", "batch_size", "grad_accum", "expected"),
    [(100, 8, 1, 13), (100, 8, 4, 4), (96, 8, 4, 3), (97, 8, 4, 4), (8, 8, 3, 1), (1, 1, 1, 1),
     (25, 5, 2, 3)],
)  # fmt: skip
def test_steps_per_epoch(n: int, batch_size: int, grad_accum: int, expected: int) -> None:
    cfg = Settings(batch_size=batch_size, grad_accum=grad_accum)
    b = batcher(n, cfg)
    assert [b.steps(e, grad_accum) for e in range(3)] == [expected] * 3
    assert b.total_steps(epochs=3, grad_accum=grad_accum) == 3 * expected
    assert b.total_steps(epochs=3, grad_accum=grad_accum, max_steps=5) == 5


# ----------------------------------------------------------------------------- step_groups


def expected_groups(n: int, cfg: Settings, epochs: int) -> list[tuple[int, list[list[int]]]]:
    """(epoch, micro-batches) of every step of ``epochs`` epochs, built from epoch_batches."""
    out = []
    for epoch in range(epochs):
        micro = epoch_batches(n, cfg.batch_size, cfg.seed, epoch)
        out += [
            (epoch, micro[i : i + cfg.grad_accum]) for i in range(0, len(micro), cfg.grad_accum)
        ]
    return out


def drive(n: int | Batcher, cfg: Settings, state: Position,
          steps: int) -> list[tuple[int, list]]:  # fmt: skip
    """Consume ``steps`` groups the way the loops do (state.micro advances per micro-batch).

    ``n``: a number of pairs (micro-batches of ``cfg.batch_size``), or a Batcher.
    A broken generator can loop forever inside ``next``; an alarm turns that into a failure.
    """
    source = n if isinstance(n, Batcher) else batcher(n, cfg)
    groups = source.step_groups(cfg.grad_accum, state)
    seen = []

    def hang(signum: int, frame: object) -> None:
        raise TimeoutError("step_groups did not yield")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        for _ in range(steps):
            group = next(groups)
            seen.append((state.epoch, group))
            state.micro += len(group)
            state.step += 1
            state.pairs_seen += sum(map(len, group))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return seen


CFG = Settings(batch_size=3, grad_accum=2, seed=5)
N = 16  # 6 micro-batches (last of 1 pair), 3 steps an epoch


def test_step_groups_walk_the_epochs_in_order() -> None:
    state = Position()
    per_epoch = steps_per_epoch(N, CFG)
    assert per_epoch == 3
    seen = drive(N, CFG, state, 3 * per_epoch)
    assert seen == expected_groups(N, CFG, 3)
    assert [len(group) for _, group in seen[:per_epoch]] == [2, 2, 2]
    assert [len(b) for b in seen[2][1]] == [3, 1]  # the epoch's short last micro-batch
    assert state.pairs_seen == 3 * N
    # Within each epoch every pair is used exactly once.
    for epoch in range(3):
        pairs = [i for e, group in seen if e == epoch for b in group for i in b]
        assert sorted(pairs) == list(range(N))


def test_last_group_of_an_epoch_may_be_shorter_than_grad_accum() -> None:
    cfg = Settings(batch_size=2, grad_accum=3, seed=0)
    n = 10  # 5 micro-batches: groups of 3 and 2
    seen = drive(n, cfg, Position(), 4)
    assert [(e, len(g)) for e, g in seen] == [(0, 3), (0, 2), (1, 3), (1, 2)]
    assert steps_per_epoch(n, cfg) == 2


@pytest.mark.parametrize(
    ("n", "batch_size", "grad_accum"),
    [(16, 3, 1), (10, 2, 2), (9, 2, 2), (7, 7, 3), (20, 3, 4), (1, 1, 2), (13, 4, 3)],
)
def test_every_epoch_uses_every_pair_once_in_steps_per_epoch_steps(
    n: int, batch_size: int, grad_accum: int
) -> None:
    cfg = Settings(batch_size=batch_size, grad_accum=grad_accum, seed=2)
    per_epoch = steps_per_epoch(n, cfg)
    seen = drive(n, cfg, Position(), 3 * per_epoch)
    assert [e for e, _ in seen] == [e for e in range(3) for _ in range(per_epoch)]
    for epoch in range(3):
        groups = [g for e, g in seen if e == epoch]
        assert all(1 <= len(g) <= grad_accum for g in groups)
        assert [b for g in groups for b in g] == epoch_batches(n, batch_size, 2, epoch)


def budget_batcher() -> Batcher:
    """A token budget over pairs of varied lengths (micro-batches of varied pair counts)."""
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(1, 30, (40, 3), generator=g).tolist()
    data = PairDataset([[1] * p for p, _, _ in lengths], [[5] * c for _, c, _ in lengths],
                       [[6] * r for _, _, r in lengths])  # fmt: skip
    return Batcher(data, batch_size=1, seed=3, layout="packed", max_tokens=160)


def test_step_groups_walk_token_budget_micro_batches() -> None:
    source = budget_batcher()
    cfg = Settings(grad_accum=3, seed=3)
    per_epoch = [source.steps(e, 3) for e in range(3)]
    seen = drive(source, cfg, Position(), sum(per_epoch))
    for epoch in range(3):
        micro = budget_batches(source.data, 160, "packed", 3, epoch)
        assert len({len(b) for b in micro}) > 1  # micro-batches of different pair counts
        assert [g for e, g in seen if e == epoch] == [micro[i : i + 3]
                                                      for i in range(0, len(micro), 3)]  # fmt: skip
        assert sorted(i for e, g in seen if e == epoch for b in g for i in b) == list(range(40))


@pytest.mark.parametrize("done", [1, 4, 9])
def test_resuming_token_budget_batches_continues_the_same_sequence(done: int) -> None:
    cfg = Settings(grad_accum=2)
    fresh_state = Position()
    fresh = drive(budget_batcher(), cfg, fresh_state, done + 5)
    state = Position()
    drive(budget_batcher(), cfg, state, done)
    resumed_state = Position(**dataclasses.asdict(state))
    assert drive(budget_batcher(), cfg, resumed_state, 5) == fresh[done:]  # a new Batcher
    assert resumed_state == fresh_state


@pytest.mark.parametrize("done", [1, 2, 3, 4, 5, 7])
def test_resuming_from_a_saved_state_continues_the_same_sequence(done: int) -> None:
    fresh_state = Position()
    fresh = drive(N, CFG, fresh_state, done + 4)

    state = Position()
    drive(N, CFG, state, done)
    saved = dataclasses.asdict(state)  # what a checkpoint stores
    resumed_state = Position(**saved)
    resumed = drive(N, CFG, resumed_state, 4)

    assert resumed == fresh[done:]
    assert resumed_state == fresh_state


def test_resume_at_an_epoch_boundary_moves_to_the_next_epoch() -> None:
    # After the last step of epoch 0, a loop saves epoch=0 and micro=6 (the generator only moves
    # on when asked for the next group); resuming must start epoch 1 at its first micro-batch.
    state = Position()
    drive(N, CFG, state, 3)
    assert (state.epoch, state.micro, state.step) == (0, 6, 3)
    resumed = Position(**dataclasses.asdict(state))
    seen = drive(N, CFG, resumed, 1)
    assert seen == [(1, epoch_batches(N, CFG.batch_size, CFG.seed, 1)[:2])]
    assert (resumed.epoch, resumed.micro, resumed.step) == (1, 2, 4)  # micro was reset to 0
    # Any state whose micro is at the end of its epoch does the same.
    end = Position(step=6, epoch=1, micro=6)
    assert drive(N, CFG, end, 1) == [(2, epoch_batches(N, CFG.batch_size, CFG.seed, 2)[:2])]
    assert (end.epoch, end.micro) == (2, 2)


def test_resume_mid_epoch_skips_consumed_micro_batches() -> None:
    state = Position(step=1, epoch=2, micro=2)
    seen = drive(N, CFG, state, 2)
    micro = epoch_batches(N, CFG.batch_size, CFG.seed, 2)
    assert seen == [(2, micro[2:4]), (2, micro[4:6])]
    assert (state.epoch, state.micro, state.step) == (2, 6, 3)
