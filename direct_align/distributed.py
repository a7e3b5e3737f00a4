"""What multi-process training (``accelerate launch`` or ``torchrun``) changes, in one place.

Every process holds a replica of the policy (DDP; FSDP and DeepSpeed shard it, through
accelerate's configuration). An optimizer step's micro-batches are dealt out round-robin, so
the step is the same ``--grad-accum`` micro-batches of ``--batch-size`` pairs whatever the
process count: the effective batch does not change with it. The main process alone writes files
and talks to trackers; the others wait for it where the files matter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from accelerate import Accelerator

from direct_align.errors import ConfigError

T = TypeVar("T")


def make_accelerator(mixed_precision: str) -> Accelerator:
    """The Accelerator of a run; several processes without CUDA (e.g. ``torchrun`` on CPUs)
    join one gloo group, which accelerate does only when told the run is on CPUs."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision,
                       cpu=several and not torch.cuda.is_available())  # fmt: skip


def is_main_rank() -> bool:
    """Whether this is the main process, before any Accelerator exists (launcher variables)."""
    return os.environ.get("RANK", "0") == "0"


def my_share(items: Sequence[T], accelerator: Accelerator) -> list[T]:
    """This process's items of a step: every ``num_processes``-th, from its index on."""
    return list(items[accelerator.process_index :: accelerator.num_processes])


def even_share(items: Sequence[T], accelerator: Accelerator) -> list[tuple[T, bool]]:
    """:func:`my_share` with a flag per item, padded to the same length in every process.

    DDP and FSDP communicate in every backward (FSDP in every forward too), so all processes
    must run as many passes: a process whose share is short repeats ``items[0]`` flagged False,
    to be run with weight 0. ``items`` must be non-empty.
    """
    n = accelerator.num_processes
    mine = [(item, True) for item in my_share(items, accelerator)]
    return mine + [(items[0], False)] * (-(-len(items) // n) - len(mine))


def sum_across(values: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Each value summed over the processes (the identity in a single process)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    total = accelerator.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64,
                                            device=accelerator.device), "sum")  # fmt: skip
    return dict(zip(keys, total.tolist()))


def any_across(flag: bool, accelerator: Accelerator) -> bool:
    """Whether ``flag`` is true in any process (so that all take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(sum_across({"flag": float(flag)}, accelerator)["flag"] > 0)


def check_process_count(grad_accum: int, accelerator: Accelerator) -> None:
    """Each process must get the same number of micro-batches per step."""
    n = accelerator.num_processes
    if grad_accum % n:
        raise ConfigError(f"--grad-accum {grad_accum} must be a multiple of the {n} processes "
                          "(each takes grad_accum / processes micro-batches of every step)")  # fmt: skip


def quiet_unless_main(accelerator: Accelerator) -> None:
    """Only the main process logs progress; the others say only what goes wrong."""
    if not accelerator.is_main_process:
        logging.getLogger("direct_align").setLevel(logging.WARNING)


class NullTracker:
    """The tracker of the processes that are not the main one: it records nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
