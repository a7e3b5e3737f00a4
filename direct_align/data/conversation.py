"""Conversational rows: validate messages, find the prompt, render with the chat template."""

from __future__ import annotations

from typing import Any

from direct_align.data.diagnose import json_kind, short_reason
from direct_align.errors import DataError

Message = dict[str, Any]
# the roles chat templates know (OpenAI's, Llama 3's ipython, the legacy function role)
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


class RowProblem(Exception):
    """What is wrong with one row; the caller prefixes the source and the row number."""


class IdenticalPair(RowProblem):
    """Chosen and rejected are the same: the row carries no preference and is skipped."""


def check_messages(value: Any, field: str) -> list[Message]:
    """Validate a list of ``{"role", "content"}`` messages and drop keys whose value is null.

    Null keys appear when Arrow merges messages of different shapes (one message with a
    ``name`` gives every message a ``name``); passing them on would confuse chat templates.

    Raises:
        RowProblem: the value is missing, not a list, empty, or a message lacks role or content
            or has a role no chat template knows.
    """
    if value is None:
        raise RowProblem(f"field '{field}' is missing")
    if not isinstance(value, list):
        raise RowProblem(f"field '{field}' is a {json_kind(value)}, expected a list of messages")
    if not value:
        raise RowProblem(f"field '{field}' is empty")
    messages = []
    for number, message in enumerate(value, start=1):
        where = f"field '{field}' message {number}"
        if not isinstance(message, dict):
            raise RowProblem(
                f"{where} is a {json_kind(message)}, expected an object with 'role' and 'content'"
            )
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise RowProblem(f"{where} has no 'role'")
        if not isinstance(role, str) or not role.strip():
            raise RowProblem(f"{where} has an invalid 'role' ({json_kind(role)} {role!r})")
        if role not in ROLES:  # a template would drop or mangle it without a word
            raise RowProblem(f"{where} has an unknown role '{role}' (known: {', '.join(ROLES)})")
        if content is None:
            raise RowProblem(f"{where} has no 'content'")
        if isinstance(content, list):  # OpenAI-style parts: [{"type": "text", "text": ...}]
            content = _text_parts(content, where)
        if not isinstance(content, str):
            raise RowProblem(f"{where}: 'content' is a {json_kind(content)}, expected a string")
        messages.append({key: val for key, val in message.items() if val is not None}
                        | {"content": content})
    return messages


def _text_parts(parts: list[Any], where: str) -> str:
    """The text of a content given as parts (``{"type": "text", "text": ...}``), joined."""
    texts = []
    for number, part in enumerate(parts, start=1):
        if not isinstance(part, dict) or part.get("type", "text") != "text":
            kind = part.get("type") if isinstance(part, dict) else json_kind(part)
            raise RowProblem(f"{where}: 'content' part {number} is a {kind} part; only text parts "
                             "are supported")  # fmt: skip
        if not isinstance(part.get("text"), str):
            raise RowProblem(f"{where}: 'content' part {number} has no 'text'")
        texts.append(part["text"])
    return "".join(texts)


def split_conversation(
    chosen: list[Message], rejected: list[Message], prompt: list[Message] | None
) -> tuple[list[Message], list[Message], list[Message]]:
    """Split a pair of conversations into ``(prompt, chosen_response, rejected_response)``.

    With an explicit ``prompt`` the responses are ``chosen`` and ``rejected``; when both repeat
    the prompt messages first, the repetition is removed. Without one, the prompt is the longest
    run of leading messages that ``chosen`` and ``rejected`` share, and the rest of each is its
    response. Each response must start with an assistant message and hold some text.

    Raises:
        RowProblem: identical conversations, no shared prompt, or an empty or non-assistant
            response.
    """
    if chosen == rejected:
        raise IdenticalPair("'chosen' and 'rejected' are identical")
    if prompt is not None:
        n = len(prompt)
        repeats = chosen[:n] == prompt and rejected[:n] == prompt
        if repeats and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise RowProblem(
                "'chosen' and 'rejected' share no leading messages to use as the prompt "
                "(and there is no 'prompt' column of messages)"
            )
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise RowProblem(f"field '{field}' has no response messages after the prompt")
        if response[0]["role"] != "assistant":
            raise RowProblem(
                f"field '{field}': the response must start with an assistant message, "
                f"found role '{response[0]['role']}'"
            )
        if not any(message["content"].strip() for message in response):
            raise RowProblem(f"field '{field}' has an empty response")
    return prompt, chosen, rejected


def require_chat_template(tokenizer: Any, source: str) -> None:
    """Raise DataError unless ``tokenizer`` has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: conversational data needs a tokenizer with a chat template, "
            "and this tokenizer has none"
        )


class ChatRenderer:
    """Renders ``(prompt, response)`` messages to text with the tokenizer's chat template.

    The prompt is rendered with ``add_generation_prompt=True``; a response is the render of the
    whole conversation minus that prompt text, so the template's end-of-turn tokens belong to
    the response.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _apply(self, messages: list[Message], *, add_generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:
            raise RowProblem(f"the chat template failed: {short_reason(exc)}") from exc
        if not isinstance(text, str):
            raise RowProblem(f"the chat template returned a {type(text).__name__}, not text")
        return text

    def prompt(self, prompt: list[Message]) -> str:
        """The prompt text, ending with the template's opening of an assistant turn."""
        return self._apply(prompt, add_generation_prompt=True)

    def response(
        self, prompt_text: str, prompt: list[Message], response: list[Message], field: str
    ) -> str:
        """The text that the template adds after ``prompt_text`` for ``response``.

        Raises:
            RowProblem: the template is not prefix-consistent, or the response renders empty.
        """
        full = self._apply(prompt + response, add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise RowProblem(
                "the chat template is not prefix-consistent: the prompt rendered with "
                "add_generation_prompt=True is not the start of the conversation rendered "
                f"with its '{field}' response"
            )
        text = full[len(prompt_text) :]
        if not text.strip():
            raise RowProblem(f"field '{field}' renders to an empty response")
        return text
