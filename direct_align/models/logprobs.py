"""Per-sequence log-prob sums of response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from direct_align.data.collate import PairBatch

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label token under the logits of the position before it.

    logits: [rows, T, vocab]; labels: [rows, T] (unshifted, IGNORE where no loss).
    Returns (logps [rows, T-1] zero where masked, mask [rows, T-1] bool).
    """
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logps = -F.cross_entropy(
        logits.float().flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none"
    ).view_as(labels)
    return torch.where(mask, logps, 0.0), mask  # not logps * mask: -inf * 0 would be NaN


def sequence_logps(
    model: PreTrainedModel, batch: PairBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy log-prob sums of the chosen and rejected responses of a batch of pairs.

    Returns (chosen_logps [B], rejected_logps [B], chosen_lengths [B], rejected_lengths [B]),
    sums in fp32. ``use_cache=False``: no KV cache is built during training or scoring.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logps, mask = token_logps(out.logits, batch.labels)
    sums, lengths = logps.sum(-1), mask.sum(-1)
    b = batch.num_pairs
    return sums[:b], sums[b:], lengths[:b], lengths[b:]
