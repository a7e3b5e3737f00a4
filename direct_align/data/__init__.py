"""Preference data: load a source, read its format, tokenize and truncate pairs, batch them.

Typical use::

    prepared = prepare_pairs("pairs.jsonl", tokenizer, max_length=512)
    print(prepared.stats.describe())
    batch = collate_pairs(prepared.pairs, [0, 1, 2, 3], tokenizer.pad_token_id)

Every problem with the data raises :class:`~direct_align.errors.DataError` with a one-line
message naming the source and, where it applies, the line, row and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from direct_align.data.collate import IGNORE_INDEX, PairBatch, collate_pairs
from direct_align.data.formats import (
    FORMAT_CHOICES,
    FORMATS,
    TextPairs,
    check_format_name,
    detect_format,
    to_text_pairs,
)
from direct_align.data.loading import load_source
from direct_align.data.tokenize import (
    DropStats,
    PairDataset,
    check_lengths,
    fit_pair,
    tokenize_pairs,
)
from direct_align.errors import DataError

__all__ = [
    "FORMATS",
    "FORMAT_CHOICES",
    "IGNORE_INDEX",
    "DropStats",
    "PairBatch",
    "PairDataset",
    "PreparedData",
    "TextPairs",
    "check_format_name",
    "check_lengths",
    "collate_pairs",
    "detect_format",
    "fit_pair",
    "load_source",
    "prepare_pairs",
    "split_holdout",
    "to_text_pairs",
    "tokenize_pairs",
]


@dataclass
class PreparedData:
    """Tokenized pairs of one source, with what truncation dropped and the format found."""

    pairs: PairDataset
    stats: DropStats
    format: str
    source: str


def prepare_pairs(
    source: str,
    tokenizer: Any,
    *,
    fmt: str = "auto",
    max_length: int,
    max_prompt_length: int | None = None,
    split: str | None = None,
) -> PreparedData:
    """Load ``source``, read it as format ``fmt`` (``"auto"`` detects it), tokenize and truncate.

    Raises:
        DataError: for an unknown format or settings, and anything wrong with the data.
    """
    check_format_name(fmt)
    check_lengths(max_length, max_prompt_length)  # before spending time on loading
    ds = load_source(source, split=split)
    pairs = to_text_pairs(ds, fmt=fmt, tokenizer=tokenizer, source=source)
    tokenized, stats = tokenize_pairs(
        pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, source=source
    )
    return PreparedData(pairs=tokenized, stats=stats, format=pairs.format, source=source)


def split_holdout(pairs: PairDataset, fraction: float, seed: int) -> tuple[PairDataset, PairDataset]:
    """A seeded random share of the pairs for evaluation (at least one), the rest for training."""
    if len(pairs) < 2:
        raise DataError(f"need at least 2 pairs to hold out an eval split, got {len(pairs)}")
    n_eval = max(1, round(fraction * len(pairs)))
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return pairs.subset(order[n_eval:]), pairs.subset(order[:n_eval])
