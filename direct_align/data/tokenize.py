"""Tokenize text pairs, add BOS/EOS, and fit each pair into ``max_length`` tokens.

Truncation rule, for one pair with ``L = max_length``, ``P`` prompt tokens, ``R`` the longer
response's tokens and ``M = max_prompt_length`` (default ``L // 2``):

1. If ``P + R <= L`` the pair is kept unchanged.
2. Otherwise the prompt is cut from the left (its oldest tokens go first) to
   ``P' = max(L - R, min(P, M), 1)`` tokens, never more than ``P``. A leading BOS token is
   kept: the tokens right after it are removed instead.
3. Each response is then cut from the right to ``L - P'`` tokens. The pair counts as
   truncated.
4. The pair is dropped as ``too_long`` if ``L - P' < 1`` (no room for a response token; this
   happens only when ``M >= L``), and as ``identical`` if its chosen and rejected tokens are
   equal after truncation.

So a prompt is shortened only as far as the responses need, and never below ``M`` tokens
to make room for them; the responses give up their ends first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import xxhash

from direct_align.data.formats import TextPairs
from direct_align.errors import DataError


@dataclass
class PairDataset:
    """Token ids of preference pairs: pair ``i`` is ``prompt_ids[i]`` followed by either
    ``chosen_ids[i]`` or ``rejected_ids[i]``. Each list holds ``N`` lists of ints."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    # unpaired feedback (KTO): whether "chosen" is desirable; "rejected" is then a mismatched
    # completion (:mod:`direct_align.data.unpaired`). None for preference pairs.
    labels: list[bool] | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.prompt_ids), len(self.chosen_ids), len(self.rejected_ids)}
        if self.labels is not None:
            sizes.add(len(self.labels))
        if len(sizes) != 1:
            raise ValueError(f"prompt, chosen, rejected and label lists differ in length: {sizes}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, indices: Sequence[int]) -> PairDataset:
        """A new data set of the pairs at ``indices``, in that order (the id lists are shared)."""
        return PairDataset(
            [self.prompt_ids[i] for i in indices],
            [self.chosen_ids[i] for i in indices],
            [self.rejected_ids[i] for i in indices],
            None if self.labels is None else [self.labels[i] for i in indices],
        )

    def labels_of(self, index: Any, device: Any = None) -> Any:
        """The labels ``[B]`` (bool tensor) of the examples at ``index`` (a ``[B]`` tensor of
        dataset positions), or None for pairs."""
        if self.labels is None:
            return None
        import torch

        return torch.tensor([self.labels[i] for i in index.tolist()], dtype=torch.bool, device=device)

    def fingerprint(self) -> str:
        """xxh3-128 hex digest of every id and every sequence length, in order.

        Equal for equal data; any changed, added, removed or moved token changes it (lengths
        are hashed, so moving a token from a prompt to its response does too).
        """
        digest = xxhash.xxh3_128()
        digest.update(np.array([len(self)], dtype=np.int64).tobytes())
        for part in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            lengths = np.fromiter((len(ids) for ids in part), dtype=np.int64, count=len(part))
            flat = np.fromiter(chain.from_iterable(part), dtype=np.int64, count=int(lengths.sum()))
            digest.update(lengths.tobytes())
            digest.update(flat.tobytes())
        return digest.hexdigest()

    def pair_tokens(self, i: int) -> int:
        """Tokens that pair ``i`` puts through the model: its prompt twice and both responses."""
        return 2 * len(self.prompt_ids[i]) + len(self.chosen_ids[i]) + len(self.rejected_ids[i])


@dataclass
class DropStats:
    """What :func:`tokenize_pairs` did to the pairs: ``kept + too_long + identical == total``."""

    total: int
    kept: int
    truncated: int
    too_long: int
    identical: int
    max_length: int | None = field(default=None)
    unit: str = "pairs"  # "examples" for unpaired feedback

    def describe(self) -> str:
        """One line, e.g. ``kept 980 of 1000 pairs (12 truncated; dropped 5 identical ...)``."""
        notes = [f"{self.truncated} truncated"] if self.truncated else []
        dropped = []
        if self.too_long:
            limit = f" max_length={self.max_length}" if self.max_length is not None else ""
            dropped.append(f"{self.too_long} that cannot fit{limit}")
        if self.identical:
            dropped.append(f"{self.identical} with identical chosen and rejected")
        if dropped:
            notes.append("dropped " + ", ".join(dropped))
        text = f"kept {self.kept} of {self.total} {self.unit}"
        return f"{text} ({'; '.join(notes)})" if notes else text


def check_lengths(max_length: int, max_prompt_length: int | None) -> None:
    """Raise DataError unless ``max_length >= 2`` and ``max_prompt_length`` is None or >= 1."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 (got {max_length})")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise DataError(f"max_prompt_length must be at least 1 (got {max_prompt_length})")


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
    return [list(ids) for ids in encoded["input_ids"]]


def left_truncate(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last ``keep`` tokens of ``ids``; a leading BOS stays first."""
    if keep >= len(ids):
        return ids
    if bos_id is not None and ids[0] == bos_id:
        return ids[:1] + (ids[len(ids) - keep + 1 :] if keep > 1 else [])
    return ids[len(ids) - keep :]


def fit_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    bos_id: int | None = None,
) -> tuple[list[int], list[int], list[int], bool] | None:
    """Apply the module's truncation rule to one pair.

    Returns:
        ``(prompt, chosen, rejected, truncated)``, or None when no response token fits.
    """
    p_len, r_len = len(prompt), max(len(chosen), len(rejected))
    if p_len + r_len <= max_length:
        return prompt, chosen, rejected, False
    limit = max_length // 2 if max_prompt_length is None else max_prompt_length
    keep = min(p_len, max(max_length - r_len, min(p_len, limit), 1))
    budget = max_length - keep
    if budget < 1:
        return None
    return left_truncate(prompt, keep, bos_id), chosen[:budget], rejected[:budget], True


def tokenize_pairs(
    pairs: TextPairs,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    source: str,
    labels: list[bool] | None = None,
) -> tuple[PairDataset, DropStats]:
    """Tokenize ``pairs`` and fit them into ``max_length`` tokens (see the module docstring).

    ``labels``: unpaired examples (pair-shaped, :mod:`direct_align.data.unpaired`), whose
    labels the kept rows keep; their completion may equal the mismatched one (not dropped).

    Prompt and responses are tokenized separately without special tokens. Unless the texts
    come from a chat template (``pairs.templated``), BOS is put before each prompt (if the
    tokenizer has one and it is not there already) and EOS after each response (likewise).

    Raises:
        DataError: ``max_length < 2``, ``max_prompt_length < 1``, or no pair is left.
    """
    check_lengths(max_length, max_prompt_length)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    prompts = _encode(tokenizer, pairs.prompts)
    chosen = _encode(tokenizer, pairs.chosen)
    rejected = _encode(tokenizer, pairs.rejected)
    if not pairs.templated:
        if bos is not None:
            prompts = [ids if ids[:1] == [bos] else [bos, *ids] for ids in prompts]
        if eos is not None:
            chosen = [ids if ids[-1:] == [eos] else [*ids, eos] for ids in chosen]
            rejected = [ids if ids[-1:] == [eos] else [*ids, eos] for ids in rejected]

    out = PairDataset([], [], [], None if labels is None else [])
    truncated = too_long = identical = 0
    for row, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        fitted = fit_pair(
            p, c, r, max_length=max_length, max_prompt_length=max_prompt_length, bos_id=bos
        )
        if fitted is None:
            too_long += 1
            continue
        p, c, r, was_cut = fitted
        if c == r and labels is None:
            identical += 1
            continue
        truncated += was_cut
        out.prompt_ids.append(p)
        out.chosen_ids.append(c)
        out.rejected_ids.append(r)
        if labels is not None:
            out.labels.append(labels[row])
    identical += pairs.identical  # skipped rows of the source count as dropped here too
    stats = DropStats(len(prompts) + pairs.identical, len(out), truncated, too_long, identical,
                      max_length, unit="pairs" if labels is None else "examples")  # fmt: skip
    if not len(out):
        raise DataError(
            f"{source}: no pair fits max_length={max_length} (of {stats.total} pairs, "
            f"{too_long} cannot fit and {identical} have identical chosen and rejected)"
        )
    return out, stats
