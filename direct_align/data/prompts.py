"""Prompts for sampling (PPO rollouts): the `prompt` column of any data source, tokenized.

A prompt is text, tokenized as training tokenizes a standard-format prompt (BOS, if the
tokenizer has one, then the text), or a list of chat messages, rendered with the tokenizer's
chat template and an open assistant turn. Duplicate prompts are kept: the data decides their
weight.
"""

from __future__ import annotations

from typing import Any

from direct_align.data.conversation import (
    ChatRenderer,
    RowProblem,
    check_messages,
    require_chat_template,
)
from direct_align.data.loading import load_source
from direct_align.errors import DataError
from direct_align.evaluate import encode_prompts


def load_prompts(source: str, tokenizer: Any, *, split: str | None = None,
                 max_prompt_length: int | None = None) -> list[list[int]]:  # fmt: skip
    """Token ids of every row's ``prompt``; with ``max_prompt_length``, its last tokens (BOS kept).

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
    plain = encode_prompts(tokenizer, texts)
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    prompts = [list(i) if t else p for p, i, t in zip(plain, ids, templated)]
    if max_prompt_length is not None:
        bos = tokenizer.bos_token_id
        prompts = [p if len(p) <= max_prompt_length
                   else ([bos] if p[0] == bos else []) + p[len(p) - max_prompt_length + (p[0] == bos):]
                   for p in prompts]  # fmt: skip
    return prompts
