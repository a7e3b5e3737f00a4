"""Unpaired feedback (thumbs up or down): rows of ``prompt``, ``completion`` and a boolean
``label``, as TRL's unpaired preference format, with text or chat messages.

KTO needs, besides each example's completion, a completion that does *not* answer its prompt, to
estimate the reference point (the policy's KL to the reference) from mismatched pairs. Here each
example ``i`` is paired with the completion of example ``m(i)``, a seeded derangement of the
examples, and becomes a pair-shaped row: ``(prompt_i, completion_i, completion_m(i))`` with
``label_i``. Everything built for pairs — packing with one shared prompt, the cached reference
log-probs of both completions, batching — then serves unpaired data unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch

from direct_align.data.conversation import (
    ChatRenderer,
    RowProblem,
    check_messages,
    require_chat_template,
)
from direct_align.data.diagnose import json_kind
from direct_align.data.formats import TextPairs, text_field
from direct_align.errors import DataError

COLUMNS = ("prompt", "completion", "label")


def is_unpaired(ds: datasets.Dataset) -> bool:
    """Whether ``ds`` has the unpaired columns (and no ``chosen``: pairs win)."""
    return {"completion", "label"} <= set(ds.column_names) and "chosen" not in ds.column_names


@dataclass(frozen=True)
class UnpairedTexts:
    """Labelled completions as texts: ``completions[i]`` answers ``prompts[i]``."""

    prompts: list[str]
    completions: list[str]
    labels: list[bool]
    format: str
    templated: bool

    def __len__(self) -> int:
        return len(self.prompts)


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):  # CSV cells are text
        return value.lower() == "true"
    raise RowProblem(f"field 'label' is a {json_kind(value)} ({value!r}), expected true or false")


def to_unpaired_texts(ds: datasets.Dataset, *, tokenizer: Any, source: str) -> UnpairedTexts:
    """Validate every row of unpaired data and render it as text (chat messages with the
    tokenizer's template). Raises DataError naming the source, row and field."""
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: unpaired data needs columns prompt, completion and label "
                        f"(missing: {', '.join(missing)})")  # fmt: skip
    columns = ds.select_columns(list(COLUMNS)).with_format(None)[:]
    chat = any(isinstance(v, list) for v in columns["completion"][:1])
    renderer = None
    if chat:
        require_chat_template(tokenizer, source)
        renderer = ChatRenderer(tokenizer)
    prompts, completions, labels = [], [], []
    for row, (p, c, label) in enumerate(zip(*(columns[k] for k in COLUMNS)), start=1):
        try:
            if renderer is None:
                prompt, completion = text_field(p, "prompt"), text_field(c, "completion")
            else:
                messages = check_messages(p, "prompt")
                prompt = renderer.prompt(messages)
                completion = renderer.response(prompt, messages, check_messages(c, "completion"),
                                               "completion")  # fmt: skip
            labels.append(_label(label))
        except RowProblem as problem:
            raise DataError(f"{source}: row {row}: {problem}") from None
        prompts.append(prompt)
        completions.append(completion)
    return UnpairedTexts(prompts, completions, labels, format="conversational" if chat else "standard",
                         templated=chat)  # fmt: skip


def from_pairs(pairs: TextPairs) -> UnpairedTexts:
    """Pairs as unpaired feedback: each chosen response desirable, each rejected one not."""
    n = len(pairs)
    return UnpairedTexts(pairs.prompts * 2, pairs.chosen + pairs.rejected, [True] * n + [False] * n,
                         format=pairs.format, templated=pairs.templated)  # fmt: skip


def mismatched(n: int, seed: int) -> list[int]:
    """A seeded derangement of ``range(n)`` (no example keeps its own completion), n ≥ 2."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    # a random cycle through all examples: each takes the completion of the next one in it
    out = [0] * n
    for k, i in enumerate(order):
        out[i] = order[(k + 1) % n]
    return out


def as_pairs(unpaired: UnpairedTexts, seed: int) -> tuple[TextPairs, list[bool]]:
    """Pair-shaped rows (prompt, completion, a mismatched completion) and their labels."""
    if len(unpaired) < 2:
        raise DataError("unpaired data needs at least 2 rows (the reference point is estimated "
                        "from other rows' completions)")  # fmt: skip
    other = mismatched(len(unpaired), seed)
    pairs = TextPairs(list(unpaired.prompts), list(unpaired.completions),
                      [unpaired.completions[j] for j in other], format=unpaired.format,
                      templated=unpaired.templated)  # fmt: skip
    return pairs, list(unpaired.labels)
