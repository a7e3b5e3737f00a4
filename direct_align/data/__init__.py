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
from direct_align.data.unpaired import as_pairs, from_pairs, is_unpaired, to_unpaired_texts
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
    """Tokenized pairs of one source, with what truncation dropped and the format found
    (``pairs.labels`` set: unpaired feedback, pair-shaped, see :mod:`.unpaired`)."""

    pairs: PairDataset
    stats: DropStats
    format: str
    source: str

    @property
    def unpaired(self) -> bool:
        return self.pairs.labels is not None


def prepare_pairs(
    source: str,
    tokenizer: Any,
    *,
    fmt: str = "auto",
    max_length: int,
    max_prompt_length: int | None = None,
    split: str | None = None,
    unpaired: bool = False,
    unpaired_from_pairs: bool = False,
    seed: int = 0,
) -> PreparedData:
    """Load ``source``, read it as format ``fmt`` (``"auto"`` detects it), tokenize and truncate.

    With ``unpaired`` (the caller trains an unpaired loss), unpaired feedback (columns prompt,
    completion, label) is read as such, and with ``unpaired_from_pairs`` preference pairs are too
    (chosen desirable, rejected not); either way each example gets a mismatched completion drawn
    with ``seed`` (:mod:`.unpaired`). Without it, unpaired feedback is refused.

    Raises:
        DataError: for an unknown format or settings, and anything wrong with the data.
    """
    check_format_name(fmt)
    check_lengths(max_length, max_prompt_length)  # before spending time on loading
    ds = load_source(source, split=split)
    labels = None
    if is_unpaired(ds):
        if not unpaired:
            raise DataError(f"{source}: these rows are unpaired feedback (prompt, completion, "
                            "label); this needs preference pairs (prompt, chosen, rejected)")  # fmt: skip
        feedback = to_unpaired_texts(ds, tokenizer=tokenizer, source=source)
        pairs, labels = as_pairs(feedback, seed)
    else:
        pairs = to_text_pairs(ds, fmt=fmt, tokenizer=tokenizer, source=source)
        if unpaired and unpaired_from_pairs:
            pairs, labels = as_pairs(from_pairs(pairs), seed)
    tokenized, stats = tokenize_pairs(pairs, tokenizer, max_length=max_length,
                                      max_prompt_length=max_prompt_length, source=source,
                                      labels=labels)  # fmt: skip
    return PreparedData(pairs=tokenized, stats=stats, format=pairs.format, source=source)


def split_holdout(pairs: PairDataset, fraction: float, seed: int) -> tuple[PairDataset, PairDataset]:
    """A seeded random share of the pairs for evaluation (at least one), the rest for training."""
    if len(pairs) < 2:
        raise DataError(f"need at least 2 pairs to hold out an eval split, got {len(pairs)}")
    n_eval = max(1, round(fraction * len(pairs)))
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return pairs.subset(order[n_eval:]), pairs.subset(order[:n_eval])
