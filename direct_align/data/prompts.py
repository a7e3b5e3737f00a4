"""Prompts to sample from (online DPO, `label`, PPO, evaluation): the prompts of any data source.

Two kinds of source are read:

* a preference file (columns ``chosen`` and ``rejected``), in any format ``train`` reads
  (standard, conversational with or without a ``prompt`` column, implicit HH-RLHF texts): its
  prompts are exactly those training uses (:func:`~direct_align.data.formats.to_text_pairs`),
  rows with identical chosen and rejected skipped;
* a prompt file (a ``prompt`` column, no ``chosen``/``rejected``): every row's prompt, text or
  a list of chat messages.

A text prompt is tokenized as training tokenizes a standard-format prompt (BOS, if the
tokenizer has one, then the text); a chat prompt is rendered with the tokenizer's chat template
and an open assistant turn, which supplies its own BOS. Duplicate prompts are kept (the data
decides their weight) unless ``unique`` asks for each text once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from direct_align.data.conversation import (
    ChatRenderer,
    RowProblem,
    check_messages,
    require_chat_template,
)
from direct_align.data.formats import check_format_name, to_text_pairs
from direct_align.data.loading import load_source
from direct_align.data.tokenize import left_truncate
from direct_align.errors import DataError

PAIR_COLUMNS = ("chosen", "rejected")


@dataclass
class Prompts:
    """``texts[i]``, as a judge reads it (a chat prompt rendered by the template), and its
    token ids ``ids[i]``, as the policy samples from it."""

    texts: list[str]
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.texts)


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt ids as training sees a standard-format prompt: BOS (if any) then the text."""
    ids = tokenizer(list(prompts), add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return [[bos, *p] if bos is not None and (not p or p[0] != bos) else p for p in ids]


def load_prompts(source: str, tokenizer: Any, *, split: str | None = None,
                 keep: int | None = None, fmt: str = "auto",
                 unique: bool = False) -> Prompts:  # fmt: skip
    """The prompts of ``source``; with ``keep``, their last ``keep`` tokens (a leading BOS kept).

    ``fmt`` (``"auto"`` or a format of :data:`~direct_align.data.formats.FORMATS`) is how a
    preference file is read, as ``train --format`` reads it; a prompt file ignores it. With
    ``unique``, a repeated prompt text is kept only where it first occurs.

    Raises:
        DataError: an unknown format, a source with neither a `prompt` column nor preference
            pairs, no prompts, or a bad row (naming the source, row and field).
    """
    check_format_name(fmt)
    ds = load_source(source, split=split)
    if all(name in ds.column_names for name in PAIR_COLUMNS):
        pairs = to_text_pairs(ds, fmt=fmt, tokenizer=tokenizer, source=source)
        texts, templated = pairs.prompts, [pairs.templated] * len(pairs)
    elif "prompt" in ds.column_names:
        texts, templated = _prompt_column(ds, tokenizer, source)
    else:
        raise DataError(f"{source}: no prompts: expected a 'prompt' column or preference pairs "
                        f"('chosen', 'rejected') (columns: {', '.join(ds.column_names)})")  # fmt: skip
    if unique:
        first: dict[str, int] = {}
        for i, text in enumerate(texts):
            first.setdefault(text, i)
        kept = list(first.values())  # in order of first occurrence
        texts, templated = [texts[i] for i in kept], [templated[i] for i in kept]
    if not texts:
        raise DataError(f"{source}: no prompts")
    bos = tokenizer.bos_token_id
    ids = [list(p) if t or bos is None or (p and p[0] == bos) else [bos, *p]  # as encode_prompts
           for p, t in zip(tokenizer(texts, add_special_tokens=False).input_ids, templated)]  # fmt: skip
    if keep is not None:
        ids = [left_truncate(p, keep, bos) for p in ids]
    return Prompts(texts, ids)


def _prompt_column(
    ds: datasets.Dataset, tokenizer: Any, source: str
) -> tuple[list[str], list[bool]]:
    """Every row's ``prompt`` as text, and whether the chat template rendered it (row numbers
    in errors are 0-based, as they always were here)."""
    texts: list[str] = []
    templated: list[bool] = []
    renderer: ChatRenderer | None = None
    for row, value in enumerate(ds["prompt"]):
        try:
            if isinstance(value, str):
                if not value.strip():
                    raise RowProblem("field 'prompt' is empty")
                texts.append(value)
                templated.append(False)
            else:
                if renderer is None:
                    require_chat_template(tokenizer, source)
                    renderer = ChatRenderer(tokenizer)
                texts.append(renderer.prompt(check_messages(value, "prompt")))
                templated.append(True)
        except RowProblem as e:
            raise DataError(f"{source}: row {row}: {e}") from None
    return texts, templated
