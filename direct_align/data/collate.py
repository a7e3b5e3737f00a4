"""Stack preference pairs into one right-padded batch of chosen rows followed by rejected rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from direct_align.data.tokenize import PairDataset

IGNORE_INDEX = -100


@dataclass
class PairBatch:
    """``B`` pairs as ``2B`` sequences of length ``T``.

    Rows ``0..B-1`` are prompt + chosen and rows ``B..2B-1`` prompt + rejected, in the same pair
    order; all are right-padded.

    Attributes:
        input_ids: ``[2B, T]`` int64 token ids (padding holds the pad token id).
        attention_mask: ``[2B, T]`` int64, 1 on real tokens and 0 on padding.
        labels: ``[2B, T]`` int64, the token id at response positions and -100 on prompt and
            padding positions. Not shifted: ``labels[:, t]`` is the token at position ``t``.
        index: ``[B]`` int64 positions of the pairs in their :class:`PairDataset`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    @property
    def num_pairs(self) -> int:
        """``B``, the number of pairs (half the rows)."""
        return int(self.index.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        """A copy with every tensor on ``device``."""
        return PairBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            index=self.index.to(device),
        )


def collate_pairs(
    data: PairDataset,
    indices: Sequence[int],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> PairBatch:
    """Build a :class:`PairBatch` of the pairs ``data[indices]``.

    ``T`` is the longest prompt + response in the batch, rounded up to a multiple of
    ``pad_to_multiple_of`` when given.

    Raises:
        ValueError: ``indices`` is empty or ``pad_to_multiple_of < 1``.
    """
    if len(indices) == 0:
        raise ValueError("collate_pairs needs at least one pair")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
    rows: list[tuple[list[int], list[int]]] = []
    for responses in (data.chosen_ids, data.rejected_ids):
        rows.extend((data.prompt_ids[i], responses[i]) for i in indices)
    width = max(len(prompt) + len(response) for prompt, response in rows)
    if pad_to_multiple_of is not None:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    attention_mask: list[list[int]] = []
    for prompt, response in rows:
        length, pad = len(prompt) + len(response), width - len(prompt) - len(response)
        input_ids.append(prompt + response + [pad_token_id] * pad)
        labels.append([IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * pad)
        attention_mask.append([1] * length + [0] * pad)
    return PairBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        attention_mask=torch.tensor(attention_mask, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        index=torch.tensor(list(indices), dtype=torch.long),
    )
