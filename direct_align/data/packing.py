"""Lay out a micro-batch of pairs for one forward pass, in one of three layouts.

- ``padded``: ``2B`` right-padded rows, chosen rows then rejected rows (the usual layout).
- ``packed``: one row, no padding: ``prompt+chosen`` and ``prompt+rejected`` of every pair are
  separate sequences whose position ids restart at 0.
- ``shared``: one row, no padding, one sequence ``[prompt, chosen, rejected]`` per pair; the
  prompt is computed once, rejected tokens take positions continuing from the prompt and attend
  to the prompt but not to the chosen tokens (see :mod:`direct_align.models.attention`).

Whatever the layout, every response token carries three indices that say where its log-prob
comes from: ``pred_index`` (the flattened row position whose hidden state predicts it; for the
first rejected token of a shared pair that is the last prompt token, not the token before it in
the row), ``target`` (the token) and ``seq_index`` (which of the ``2B`` sequences it belongs to:
``i`` for the chosen response of pair ``i``, ``B + i`` for its rejected one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from direct_align.data.collate import collate_pairs
from direct_align.data.tokenize import PairDataset
from direct_align.models.attention import Segment

LAYOUTS = ("padded", "packed", "shared")


@dataclass
class TokenBatch:
    """``B`` pairs ready for the policy. Shapes: rows R, row length T, response tokens N."""

    layout: str
    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor | None  # [R, T]; None for padded rows (positions from the mask)
    attention_mask: torch.Tensor | None  # [R, T] for padded rows, else None
    segments: tuple[Segment, ...] | None  # packed/shared: the sequences of the single row
    pred_index: torch.Tensor  # [N] flattened row position of the predicting hidden state
    target: torch.Tensor  # [N] the response tokens
    seq_index: torch.Tensor  # [N] 0..2B-1
    index: torch.Tensor  # [B] positions of the pairs in their PairDataset

    @property
    def num_pairs(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens that the model computes (padding excluded)."""
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return int(self.input_ids.numel())

    def cu_seqlens(self) -> torch.Tensor:
        """[S+1] int32 start offsets of the row's sequences, for varlen kernels (packed only)."""
        assert self.segments is not None and self.layout == "packed"
        ends = [s.start + s.length for s in self.segments]
        return torch.tensor([0, *ends], dtype=torch.int32)

    def to(self, device: torch.device | str) -> TokenBatch:
        move = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return replace(self, **move)


def layout_tokens(data: PairDataset, i: int, layout: str) -> int:
    """Tokens pair ``i`` puts through the model in ``layout`` (padding aside)."""
    p, c, r = len(data.prompt_ids[i]), len(data.chosen_ids[i]), len(data.rejected_ids[i])
    return p + c + r if layout == "shared" else 2 * p + c + r


def build_batch(data: PairDataset, indices: Sequence[int], layout: str, pad_token_id: int) -> TokenBatch:
    """The pairs ``data[indices]`` in ``layout`` (one of :data:`LAYOUTS`)."""
    if layout == "padded":
        return _padded(data, indices, pad_token_id)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    b = len(indices)
    ids: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    pred: list[int] = []
    target: list[int] = []
    seq: list[int] = []
    for k, i in enumerate(indices):
        prompt, chosen, rejected = data.prompt_ids[i], data.chosen_ids[i], data.rejected_ids[i]
        p = len(prompt)
        if layout == "shared":
            start = len(ids)
            ids += prompt + chosen + rejected
            positions += [*range(p + len(chosen)), *range(p, p + len(rejected))]
            segments.append(Segment(start, p + len(chosen) + len(rejected), p, len(chosen),
                                    len(rejected)))  # fmt: skip
            _responses(pred, target, seq, chosen, start + p, start + p - 1, k)
            _responses(pred, target, seq, rejected, start + p + len(chosen), start + p - 1, b + k)
        else:
            for response, s in ((chosen, k), (rejected, b + k)):
                start = len(ids)
                ids += prompt + response
                positions += range(p + len(response))
                segments.append(Segment(start, p + len(response)))
                _responses(pred, target, seq, response, start + p, start + p - 1, s)
    long = {"dtype": torch.long}
    return TokenBatch(
        layout=layout, input_ids=torch.tensor([ids], **long),
        position_ids=torch.tensor([positions], **long), attention_mask=None,
        segments=tuple(segments), pred_index=torch.tensor(pred, **long),
        target=torch.tensor(target, **long), seq_index=torch.tensor(seq, **long),
        index=torch.tensor(list(indices), **long),
    )  # fmt: skip


def _responses(pred: list[int], target: list[int], seq: list[int], response: list[int],
               first: int, first_pred: int, seq_id: int) -> None:  # fmt: skip
    """Append the tokens of a response that starts at row position ``first`` and whose first
    token is predicted from position ``first_pred``."""
    pred += [first_pred, *range(first, first + len(response) - 1)]
    target += response
    seq += [seq_id] * len(response)


def _padded(data: PairDataset, indices: Sequence[int], pad_token_id: int) -> TokenBatch:
    batch = collate_pairs(data, indices, pad_token_id)
    rows, width = batch.labels.shape
    row, col = (batch.labels != -100).nonzero(as_tuple=True)  # response tokens, row-major
    return TokenBatch(
        layout="padded", input_ids=batch.input_ids, position_ids=None,
        attention_mask=batch.attention_mask, segments=None, pred_index=row * width + col - 1,
        target=batch.labels[row, col], seq_index=row, index=batch.index,
    )  # fmt: skip
