"""The three preference formats: detect which one a data set uses and turn rows into texts.

* ``standard``: string columns ``prompt``, ``chosen``, ``rejected``.
* ``conversational``: ``chosen``/``rejected`` are lists of ``{"role", "content"}`` messages; the
  prompt is a ``prompt`` column of messages, or else the leading messages both share.
* ``implicit``: ``chosen``/``rejected`` are full texts that start with the same prompt.

Other columns are ignored. Row numbers in errors are 1-based.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import datasets

from direct_align.data.conversation import (
    ChatRenderer,
    IdenticalPair,
    RowProblem,
    check_messages,
    require_chat_template,
    split_conversation,
)
from direct_align.data.diagnose import json_kind
from direct_align.errors import DataError

FORMATS = ("standard", "conversational", "implicit")
FORMAT_CHOICES = ("auto", *FORMATS)
#: In implicit texts, the prompt ends right after the last occurrence of this marker (HH-RLHF).
ASSISTANT_MARKER = "\n\nAssistant:"


@dataclass(frozen=True)
class TextPairs:
    """Preference pairs as texts, one entry per row, ready to tokenize.

    ``templated`` is True when the texts were rendered with the chat template, which already
    supplies the BOS token and the end-of-turn tokens. ``identical`` counts the rows skipped
    because their chosen and rejected were the same.
    """

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    format: str
    templated: bool
    identical: int = 0  # rows skipped because chosen and rejected were the same

    def __len__(self) -> int:
        return len(self.prompts)


def check_format_name(fmt: str) -> str:
    """Return ``fmt`` if it is one of ``auto, standard, conversational, implicit``."""
    if fmt not in FORMAT_CHOICES:
        raise DataError(f"unknown format '{fmt}' (choose from {', '.join(FORMAT_CHOICES)})")
    return fmt


def _plural(kind: str) -> str:
    return {"string": "strings", "list": "lists of messages", "null": "only nulls"}[kind]


def _column_kind(ds: datasets.Dataset, name: str, source: str) -> str:
    """``"string"``, ``"list"`` or ``"null"`` (no values) for column ``name``."""
    feature = ds.features[name]
    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string"):
            return "string"
        if feature.dtype == "null":
            return "null"
        raise DataError(
            f"{source}: column '{name}' holds {feature.dtype} values, expected text or "
            "lists of messages"
        )
    if isinstance(feature, datasets.List | datasets.LargeList):
        return "list"
    # A column of mixed JSON values: look at the values themselves.
    first: dict[str, int] = {}
    for row, value in enumerate(ds.select_columns([name]).with_format(None)[name], start=1):
        if value is None:
            continue
        kind = "string" if isinstance(value, str) else "list" if isinstance(value, list) else ""
        if not kind:
            raise DataError(
                f"{source}: row {row}: field '{name}' is a {json_kind(value)}, expected a "
                "string or a list of messages"
            )
        first.setdefault(kind, row)
    if len(first) > 1:
        raise DataError(
            f"{source}: column '{name}' mixes strings and lists (row {first['string']} holds a "
            f"string, row {first['list']} a list)"
        )
    return next(iter(first), "null")


def _check_columns(ds: datasets.Dataset, names: tuple[str, ...], source: str) -> None:
    missing = [name for name in names if name not in ds.column_names]
    if missing:
        label = "column" if len(missing) == 1 else "columns"
        quoted = ", ".join(f"'{name}'" for name in missing)
        raise DataError(
            f"{source}: missing {label} {quoted} (columns: {', '.join(ds.column_names)})"
        )


def _response_kind(ds: datasets.Dataset, source: str) -> str:
    """The kind shared by ``chosen`` and ``rejected``: ``"string"`` or ``"list"``."""
    _check_columns(ds, ("chosen", "rejected"), source)
    kinds = {name: _column_kind(ds, name, source) for name in ("chosen", "rejected")}
    for name, kind in kinds.items():
        if kind == "null":
            raise DataError(f"{source}: column '{name}' has no values (every row is null)")
    if kinds["chosen"] != kinds["rejected"]:
        raise DataError(
            f"{source}: column 'chosen' holds {_plural(kinds['chosen'])} but 'rejected' holds "
            f"{_plural(kinds['rejected'])}"
        )
    return kinds["chosen"]


def detect_format(ds: datasets.Dataset, source: str) -> str:
    """``"standard"``, ``"conversational"`` or ``"implicit"``, from the columns and their types.

    Lists of messages in ``chosen``/``rejected`` mean conversational; strings with a ``prompt``
    column mean standard; strings without one mean implicit.

    Raises:
        DataError: a missing ``chosen``/``rejected`` column or mismatched column types.
    """
    if _response_kind(ds, source) == "list":
        return "conversational"
    if "prompt" not in ds.column_names:
        return "implicit"
    if _column_kind(ds, "prompt", source) == "list":
        raise DataError(
            f"{source}: column 'prompt' holds lists of messages but 'chosen' and 'rejected' hold "
            "strings; conversational data needs messages in all three"
        )
    return "standard"


def _check_forced(ds: datasets.Dataset, fmt: str, source: str) -> None:
    kind = _response_kind(ds, source)
    wanted = "list" if fmt == "conversational" else "string"
    if kind != wanted:
        raise DataError(
            f"{source}: format '{fmt}' needs {_plural(wanted)} in 'chosen' and 'rejected', "
            f"but they hold {_plural(kind)}"
        )
    if fmt == "standard":
        _check_columns(ds, ("prompt",), source)
        if _column_kind(ds, "prompt", source) == "list":
            raise DataError(f"{source}: format 'standard' needs strings in column 'prompt'")


def text_field(value: Any, field: str) -> str:
    """``value`` of row field ``field`` if it is non-blank text; RowProblem otherwise."""
    if value is None:
        raise RowProblem(f"field '{field}' is missing")
    if not isinstance(value, str):
        raise RowProblem(f"field '{field}' is a {json_kind(value)}, expected a string")
    if not value.strip():
        raise RowProblem(f"field '{field}' is empty")
    return value


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two full texts into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix, cut right after its last ``"\\n\\nAssistant:"``
    if it has one, else at the start of its last run of whitespace, so that the responses
    begin with the whitespace before their first word (as byte-level and SentencePiece
    tokenizers expect).

    Raises:
        RowProblem: identical texts, no usable common prefix, or an empty response.
    """
    if chosen == rejected:
        raise IdenticalPair("'chosen' and 'rejected' are identical")
    common = os.path.commonprefix([chosen, rejected])
    marker = common.rfind(ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(ASSISTANT_MARKER)
    else:
        cut = len(common)
        while cut > 0 and not common[cut - 1].isspace():
            cut -= 1
        while cut > 0 and common[cut - 1].isspace():
            cut -= 1
    prompt = chosen[:cut]
    if not prompt.strip():
        raise RowProblem("'chosen' and 'rejected' share no prompt (no common leading words)")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[cut:].strip():
            raise RowProblem(f"field '{field}' has an empty response after the shared prompt")
    return prompt, chosen[cut:], rejected[cut:]


def to_text_pairs(ds: datasets.Dataset, *, fmt: str, tokenizer: Any, source: str) -> TextPairs:
    """Validate every row of ``ds`` and turn it into a (prompt, chosen, rejected) text triple.

    ``fmt`` is ``"auto"`` (see :func:`detect_format`) or a format to force. The tokenizer is
    used only for conversational data, whose messages are rendered with its chat template.

    Raises:
        DataError: naming the source, and the row (1-based) and field of the first bad row.
    """
    check_format_name(fmt)
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    if fmt == "auto":
        fmt = detect_format(ds, source)
    else:
        _check_forced(ds, fmt, source)

    explicit_prompt = fmt == "standard" or (
        fmt == "conversational"
        and "prompt" in ds.column_names
        and _column_kind(ds, "prompt", source) == "list"
    )
    names = ["prompt", "chosen", "rejected"] if explicit_prompt else ["chosen", "rejected"]
    columns = ds.select_columns(names).with_format(None)[:]
    prompt_values = columns["prompt"] if explicit_prompt else [None] * len(ds)

    renderer: ChatRenderer | None = None
    if fmt == "conversational":
        require_chat_template(tokenizer, source)
        renderer = ChatRenderer(tokenizer)

    prompts: list[str] = []
    chosen: list[str] = []
    rejected: list[str] = []
    identical = 0  # rows whose chosen equals rejected carry no preference: skipped, counted
    rows = zip(prompt_values, columns["chosen"], columns["rejected"])
    for row, (p, c, r) in enumerate(rows, start=1):
        try:
            if fmt == "standard":
                triple = (text_field(p, "prompt"), text_field(c, "chosen"), text_field(r, "rejected"))
                if triple[1] == triple[2]:
                    raise IdenticalPair("'chosen' and 'rejected' are identical")
            elif fmt == "implicit":
                triple = split_implicit(text_field(c, "chosen"), text_field(r, "rejected"))
            else:
                assert renderer is not None
                triple = _render_row(renderer, p, c, r, explicit_prompt)
        except IdenticalPair:
            identical += 1
            continue
        except RowProblem as problem:
            raise DataError(f"{source}: row {row}: {problem}") from None
        prompts.append(triple[0])
        chosen.append(triple[1])
        rejected.append(triple[2])
    if not prompts:
        raise DataError(f"{source}: all {identical} rows have identical 'chosen' and 'rejected'")
    return TextPairs(prompts, chosen, rejected, format=fmt, templated=fmt == "conversational",
                     identical=identical)  # fmt: skip


def _render_row(
    renderer: ChatRenderer, prompt: Any, chosen: Any, rejected: Any, explicit_prompt: bool
) -> tuple[str, str, str]:
    prompt_messages = check_messages(prompt, "prompt") if explicit_prompt else None
    prompt_messages, chosen_messages, rejected_messages = split_conversation(
        check_messages(chosen, "chosen"), check_messages(rejected, "rejected"), prompt_messages
    )
    prompt_text = renderer.prompt(prompt_messages)
    return (
        prompt_text,
        renderer.response(prompt_text, prompt_messages, chosen_messages, "chosen"),
        renderer.response(prompt_text, prompt_messages, rejected_messages, "rejected"),
    )
