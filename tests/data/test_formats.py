"""Format detection, row validation, implicit prompts and chat-template rendering."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest

from direct_align.data import detect_format, load_source, to_text_pairs
from direct_align.data.formats import split_implicit
from direct_align.errors import DataError

SRC = "data.jsonl"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def from_rows(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def from_jsonl(tmp_path: Path, rows: list[dict]) -> datasets.Dataset:
    """Rows through a real JSONL file, where a column may mix JSON types."""
    path = tmp_path / SRC
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return load_source(str(path))


def pairs_error(ds: datasets.Dataset, tokenizer=None, fmt: str = "auto") -> str:
    with pytest.raises(DataError) as info:
        to_text_pairs(ds, fmt=fmt, tokenizer=tokenizer, source=SRC)
    assert "\n" not in str(info.value)
    return str(info.value)


STANDARD = {"prompt": "the movie", "chosen": " was great.", "rejected": " was dull.", "id": 3}
HH = {
    "chosen": "\n\nHuman: how was it?\n\nAssistant: It was great.",
    "rejected": "\n\nHuman: how was it?\n\nAssistant: Dull.",
}
ULTRAFEEDBACK = {
    "prompt": "how was it?",
    "chosen": [user("how was it?"), assistant("It was great.")],
    "rejected": [user("how was it?"), assistant("Dull.")],
    "score_chosen": 9.0,
}


# --- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [(STANDARD, "standard"), (HH, "implicit"), (ULTRAFEEDBACK, "conversational")],
)
def test_detects_each_format(row: dict, expected: str) -> None:
    assert detect_format(from_rows([row]), SRC) == expected


def test_detects_explicit_conversational_prompt() -> None:
    row = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go")]}
    assert detect_format(from_rows([row]), SRC) == "conversational"


def test_missing_column_lists_the_columns() -> None:
    ds = from_rows([{"prompt": "p", "chosen": "c"}])
    assert pairs_error(ds) == "data.jsonl: missing column 'rejected' (columns: prompt, chosen)"


def test_mixed_types_in_a_column_name_the_rows(tmp_path: Path) -> None:
    ds = from_jsonl(tmp_path, [HH, ULTRAFEEDBACK])
    assert pairs_error(ds) == (
        "data.jsonl: column 'chosen' mixes strings and lists (row 1 holds a string, row 2 a list)"
    )


def test_chosen_and_rejected_of_different_types() -> None:
    row = {"chosen": [assistant("a")], "rejected": "b"}
    assert "column 'chosen' holds lists of messages but 'rejected' holds strings" in pairs_error(
        from_rows([row])
    )


def test_non_text_value_names_row_field_and_type(tmp_path: Path) -> None:
    ds = from_jsonl(tmp_path, [STANDARD, {**STANDARD, "chosen": 5}])
    assert pairs_error(ds) == (
        "data.jsonl: row 2: field 'chosen' is a number, expected a string or a list of messages"
    )


def test_unknown_format() -> None:
    assert pairs_error(from_rows([STANDARD]), fmt="foo") == (
        "unknown format 'foo' (choose from auto, standard, conversational, implicit)"
    )


def test_forced_format_must_match_the_columns(tiny_tokenizer) -> None:
    message = pairs_error(from_rows([STANDARD]), tiny_tokenizer, fmt="conversational")
    assert "format 'conversational' needs lists of messages" in message
    assert "missing column 'prompt'" in pairs_error(from_rows([HH]), fmt="standard")


def test_forced_implicit_ignores_the_prompt_column() -> None:
    row = {**HH, "prompt": "ignored"}
    pairs = to_text_pairs(from_rows([row]), fmt="implicit", tokenizer=None, source=SRC)
    assert pairs.prompts == ["\n\nHuman: how was it?\n\nAssistant:"]


# --- standard -------------------------------------------------------------------------------


def test_standard_rows_pass_through() -> None:
    pairs = to_text_pairs(from_rows([STANDARD]), fmt="auto", tokenizer=None, source=SRC)
    assert (pairs.prompts, pairs.chosen, pairs.rejected) == (
        ["the movie"], [" was great."], [" was dull."],
    )  # fmt: skip
    assert (pairs.format, pairs.templated) == ("standard", False)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [("prompt", None, "is missing"), ("chosen", "", "is empty"), ("rejected", " \n", "is empty")],
)
def test_standard_row_errors(field: str, value: str | None, problem: str) -> None:
    ds = from_rows([STANDARD, STANDARD, {**STANDARD, field: value}])
    assert pairs_error(ds) == f"data.jsonl: row 3: field '{field}' {problem}"


def test_identical_pairs_are_skipped_and_counted(tiny_tokenizer) -> None:
    same = {**STANDARD, "rejected": STANDARD["chosen"]}
    pairs = to_text_pairs(from_rows([STANDARD, same, STANDARD]), fmt="auto", tokenizer=None,
                          source="data.jsonl")  # fmt: skip
    assert (len(pairs), pairs.identical) == (2, 1)
    assert pairs_error(from_rows([same])) == (
        "data.jsonl: all 1 rows have identical 'chosen' and 'rejected'")


# --- implicit -------------------------------------------------------------------------------


def test_hh_prompt_ends_after_the_last_assistant_marker() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how was it?\n\nAssistant: Great."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how was it?\n\nAssistant: Dull."
    prompt, good, bad = split_implicit(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how was it?\n\nAssistant:"
    assert (good, bad) == (" Great.", " Dull.")


def test_hh_responses_sharing_a_first_word_keep_it() -> None:
    prompt, good, bad = split_implicit(
        "\n\nHuman: q\n\nAssistant: It was great.", "\n\nHuman: q\n\nAssistant: It was dull."
    )
    assert (prompt, good, bad) == ("\n\nHuman: q\n\nAssistant:", " It was great.", " It was dull.")


def test_plain_text_backs_off_to_a_word_boundary() -> None:
    assert split_implicit("the answer is 4", "the answer is 42") == (
        "the answer is", " 4", " 42",
    )  # fmt: skip
    assert split_implicit("the movie was great", "the movie was grim") == (
        "the movie was", " great", " grim",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("chosen", "rejected", "problem"),
    [
        ("Great movie", "Grim movie", "share no prompt"),
        (
            "\n\nHuman: q\n\nAssistant:",
            "\n\nHuman: q\n\nAssistant: a",
            "field 'chosen' has an empty",
        ),
    ],
)
def test_implicit_row_errors(chosen: str, rejected: str, problem: str) -> None:
    ds = from_rows([HH, {"chosen": chosen, "rejected": rejected}])
    message = pairs_error(ds)
    assert message.startswith("data.jsonl: row 2: ")
    assert problem in message


# --- conversational -------------------------------------------------------------------------


def test_ultrafeedback_rows_render_with_the_chat_template(tiny_tokenizer) -> None:
    pairs = to_text_pairs(
        from_rows([ULTRAFEEDBACK]), fmt="auto", tokenizer=tiny_tokenizer, source=SRC
    )
    assert (pairs.format, pairs.templated) == ("conversational", True)
    assert pairs.prompts == ["<s><|im_start|>user\nhow was it?<|im_end|>\n<|im_start|>assistant\n"]
    assert pairs.chosen == ["It was great.<|im_end|>\n"]
    assert pairs.rejected == ["Dull.<|im_end|>\n"]


def test_explicit_prompt_messages(tiny_tokenizer) -> None:
    rows = [
        {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go")]},
        # The prompt repeated at the start of both responses is removed.
        {
            "prompt": [user("hi")],
            "chosen": [user("hi"), assistant("hello")],
            "rejected": [user("hi"), assistant("go")],
        },
    ]
    pairs = to_text_pairs(from_rows(rows), fmt="auto", tokenizer=tiny_tokenizer, source=SRC)
    assert pairs.prompts == ["<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"] * 2
    assert pairs.chosen == ["hello<|im_end|>\n"] * 2
    assert pairs.rejected == ["go<|im_end|>\n"] * 2


def test_multi_turn_prompt_is_the_shared_leading_messages(tiny_tokenizer) -> None:
    history = [
        {"role": "system", "content": "be brief"},
        user("hi"),
        assistant("hey"),
        user("and?"),
    ]
    row = {"chosen": [*history, assistant("fine")], "rejected": [*history, assistant("bad")]}
    pairs = to_text_pairs(from_rows([row]), fmt="auto", tokenizer=tiny_tokenizer, source=SRC)
    assert pairs.prompts[0].count("<|im_start|>") == 5
    assert pairs.prompts[0].endswith("<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n")
    assert pairs.chosen == ["fine<|im_end|>\n"]


@pytest.mark.parametrize(
    ("chosen", "rejected", "problem"),
    [
        ([user("q"), {"role": "assistant"}], [user("q"), assistant("b")],
         "field 'chosen' message 2 has no 'content'"),
        ([user("q"), assistant("a")], [{"content": "q"}, assistant("b")],
         "field 'rejected' message 1 has no 'role'"),
        ([], [user("q"), assistant("b")], "field 'chosen' is empty"),
        ([user("q"), assistant("a")], [user("q")], "field 'rejected' has no response messages"),
        ([user("q"), assistant("a")], [user("other"), assistant("b")], "share no leading messages"),
        ([user("q"), assistant("a")], [user("q"), user("b")], "must start with an assistant"),
        ([user("q"), assistant(" ")], [user("q"), assistant("b")], "field 'chosen' has an empty"),
        ([{"role": "usr", "content": "q"}, assistant("a")], [user("q"), assistant("b")],
         "field 'chosen' message 1 has an unknown role 'usr' (known: system, developer, user, "
         "assistant, tool, function, ipython)"),
    ],
)  # fmt: skip
def test_conversational_row_errors(tiny_tokenizer, chosen, rejected, problem: str) -> None:
    ds = from_rows([ULTRAFEEDBACK, {"chosen": chosen, "rejected": rejected}])
    message = pairs_error(ds, tiny_tokenizer)
    assert message.startswith("data.jsonl: row 2: ")
    assert problem in message


def test_conversational_needs_a_chat_template(tiny_tokenizer) -> None:
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    message = pairs_error(from_rows([ULTRAFEEDBACK]), plain)
    assert message == (
        "data.jsonl: conversational data needs a tokenizer with a chat template, "
        "and this tokenizer has none"
    )


def test_template_that_is_not_prefix_consistent(tiny_tokenizer) -> None:
    odd = copy.deepcopy(tiny_tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<answer>{% endif %}"
    )
    message = pairs_error(from_rows([ULTRAFEEDBACK]), odd)
    assert message.startswith("data.jsonl: row 1: the chat template is not prefix-consistent")
