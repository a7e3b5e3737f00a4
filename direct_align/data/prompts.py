"""Prompts to sample from (online DPO, `label`, PPO): the `prompt` column of any data source.

A prompt is text, tokenized as training tokenizes a standard-format prompt (BOS, if the
tokenizer has one, then the text), or a list of chat messages, rendered with the tokenizer's
chat template and an open assistant turn. Duplicate prompts are kept: the data decides their
weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from direct_align.data.conversation import (
    ChatRenderer,
    RowProblem,
    check_messages,
    require_chat_template,
)
from direct_align.data.loading import load_source
from direct_align.data.tokenize import left_truncate
from direct_align.errors import DataError


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
                 keep: int | None = None) -> Prompts:  # fmt: skip
    """Every row's ``prompt``; with ``keep``, its last ``keep`` tokens (a leading BOS kept).

    Raises:
        DataError: no `prompt` column, or a row whose prompt is empty or of another type.
    """
    ds = load_source(source, split=split)
    if "prompt" not in ds.column_names:
        raise DataError(f"{source}: no 'prompt' column (columns: {', '.join(ds.column_names)})")
    texts, templated = [], []
    renderer = None
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
    bos = tokenizer.bos_token_id
    ids = [list(p) if t or bos is None or (p and p[0] == bos) else [bos, *p]  # as encode_prompts
           for p, t in zip(tokenizer(texts, add_special_tokens=False).input_ids, templated)]  # fmt: skip
    if keep is not None:
        ids = [left_truncate(p, keep, bos) for p in ids]
    return Prompts(texts, ids)
