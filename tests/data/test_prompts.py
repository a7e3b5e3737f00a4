"""`load_prompts` on preference files of every format `train` reads, and on prompt files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from direct_align.data import prepare_pairs
from direct_align.data.prompts import Prompts, encode_prompts, load_prompts
from direct_align.errors import DataError
from prefdata import rows, write_jsonl

HH_PROMPT = "\n\nHuman: hi there\n\nAssistant:"
HH_ROWS = [
    {"chosen": HH_PROMPT + " hello", "rejected": HH_PROMPT + " go away"},
    {"chosen": "\n\nHuman: and you?\n\nAssistant: fine", "rejected": "\n\nHuman: and you?\n\nAssistant: no"},
]  # fmt: skip


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def training_prompt_ids(path: Path, tokenizer, fmt: str = "auto") -> list[list[int]]:
    """The prompt ids `train` builds for ``path`` (nothing truncated)."""
    return prepare_pairs(str(path), tokenizer, fmt=fmt, max_length=4096).pairs.prompt_ids


def load_error(path: Path, tokenizer, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_prompts(str(path), tokenizer, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_implicit_pairs_give_the_shared_prompt_as_training_tokenizes_it(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    loaded = load_prompts(str(path), tiny_tokenizer)
    assert isinstance(loaded, Prompts) and len(loaded) == 2
    assert loaded.texts == [HH_PROMPT, "\n\nHuman: and you?\n\nAssistant:"]
    assert loaded.ids == training_prompt_ids(path, tiny_tokenizer)
    assert loaded.ids == encode_prompts(tiny_tokenizer, loaded.texts)
    assert all(p[0] == tiny_tokenizer.bos_token_id for p in loaded.ids)
    short = load_prompts(str(path), tiny_tokenizer, keep=3).ids
    assert short == [[p[0], *p[-2:]] for p in loaded.ids]


def test_standard_pairs_give_the_prompt_column(tmp_path, tiny_tokenizer):
    data = rows("standard", 5, seed=3)
    path = write_jsonl(tmp_path / "std.jsonl", data)
    loaded = load_prompts(str(path), tiny_tokenizer)
    assert loaded.texts == [row["prompt"] for row in data]
    assert loaded.ids == training_prompt_ids(path, tiny_tokenizer)
    first = tiny_tokenizer(data[0]["prompt"], add_special_tokens=False).input_ids
    assert loaded.ids[0] == [tiny_tokenizer.bos_token_id, *first]


def test_pairs_with_identical_responses_are_skipped(tmp_path, tiny_tokenizer):
    data = [{"prompt": "a", "chosen": " b", "rejected": " c"},
            {"prompt": "same", "chosen": " x", "rejected": " x"},
            {"prompt": "d", "chosen": " e", "rejected": " f"}]  # fmt: skip
    path = write_jsonl(tmp_path / "skip.jsonl", data)
    assert load_prompts(str(path), tiny_tokenizer).texts == ["a", "d"]


def test_conversational_pairs_without_prompt_column_are_templated(tmp_path, tiny_tokenizer):
    assert tiny_tokenizer.chat_template  # the tiny tokenizer has a ChatML template
    data = [{"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("go")]},
            {"chosen": [user("yo"), assistant("hey")], "rejected": [user("yo"), assistant("no")]}]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", data)
    loaded = load_prompts(str(path), tiny_tokenizer)
    expected = tiny_tokenizer.apply_chat_template([user("hi")], tokenize=False,
                                                  add_generation_prompt=True)  # fmt: skip
    assert loaded.texts[0] == expected and expected.endswith("<|im_start|>assistant\n")
    bos = tiny_tokenizer.bos_token_id
    assert loaded.ids[0] == tiny_tokenizer(expected, add_special_tokens=False).input_ids
    assert loaded.ids[0][0] == bos and loaded.ids[0][1] != bos  # the template's BOS only
    assert loaded.ids == training_prompt_ids(path, tiny_tokenizer)
    short = load_prompts(str(path), tiny_tokenizer, keep=2).ids
    assert short == [[bos, p[-1]] for p in loaded.ids]


@pytest.mark.parametrize("kind", ["pairs", "prompt file"])
def test_chat_prompts_get_no_bos_beyond_the_template(tmp_path, tiny_tokenizer, kind):
    no_bos = copy.deepcopy(tiny_tokenizer)
    no_bos.chat_template = tiny_tokenizer.chat_template.replace("{{ bos_token }}", "")
    assert no_bos.chat_template != tiny_tokenizer.chat_template
    if kind == "pairs":
        data = [{"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("go")]}]  # fmt: skip
    else:
        data = [{"prompt": [user("hi")]}]
    path = write_jsonl(tmp_path / "chat.jsonl", data)
    loaded = load_prompts(str(path), no_bos)
    assert loaded.texts == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    assert loaded.ids == [no_bos(loaded.texts[0], add_special_tokens=False).input_ids]
    assert loaded.ids[0][0] != no_bos.bos_token_id
    if kind == "pairs":
        assert loaded.ids == training_prompt_ids(path, no_bos)


def test_conversational_pairs_with_prompt_messages(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "conv.jsonl", rows("conversational", 3, seed=4))
    loaded = load_prompts(str(path), tiny_tokenizer)
    assert loaded.ids == training_prompt_ids(path, tiny_tokenizer)
    assert all(text.endswith("<|im_start|>assistant\n") for text in loaded.texts)


def test_format_is_forced_as_train_forces_it(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    assert load_error(path, tiny_tokenizer, fmt="standard") == (
        f"{path}: missing column 'prompt' (columns: chosen, rejected)"
    )
    assert load_prompts(str(path), tiny_tokenizer, fmt="implicit").texts[0] == HH_PROMPT
    with pytest.raises(DataError, match="unknown format 'hh'"):
        load_prompts(str(path), tiny_tokenizer, fmt="hh")


def test_unique_drops_repeated_prompts_keeping_the_first_in_order(tmp_path, tiny_tokenizer):
    order = ["p1", "p2", "p1", "p3", "p2", "p1"]
    data = [{"prompt": p, "chosen": f" good {i}", "rejected": f" bad {i}"} for i, p in enumerate(order)]  # fmt: skip
    path = write_jsonl(tmp_path / "dup.jsonl", data)
    every = load_prompts(str(path), tiny_tokenizer)
    assert every.texts == order
    once = load_prompts(str(path), tiny_tokenizer, unique=True)
    assert once.texts == ["p1", "p2", "p3"]
    assert once.ids == encode_prompts(tiny_tokenizer, once.texts)
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in order])
    assert load_prompts(str(prompt_file), tiny_tokenizer).texts == order
    assert load_prompts(str(prompt_file), tiny_tokenizer, unique=True).texts == ["p1", "p2", "p3"]


def test_prompt_file_reads_the_prompt_column_as_before(tmp_path, tiny_tokenizer):
    data = [{"prompt": "tell me", "completion": " ok", "label": True},
            {"prompt": [user("hi")], "completion": " ok", "label": False}]  # fmt: skip
    text = write_jsonl(tmp_path / "text.jsonl", data[:1])
    loaded = load_prompts(str(text), tiny_tokenizer)
    assert loaded.texts == ["tell me"]
    assert loaded.ids == encode_prompts(tiny_tokenizer, ["tell me"])
    chat = write_jsonl(tmp_path / "chat.jsonl", data[1:])
    rendered = load_prompts(str(chat), tiny_tokenizer)
    assert rendered.ids == [tiny_tokenizer(rendered.texts[0], add_special_tokens=False).input_ids]


def test_source_without_prompts_or_pairs_is_one_line_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "none.jsonl", [{"text": "a", "chosen": "b"}])
    assert load_error(path, tiny_tokenizer) == (
        f"{path}: no prompts: expected a 'prompt' column or preference pairs "
        "('chosen', 'rejected') (columns: text, chosen)"
    )


def test_source_with_no_rows_or_no_usable_pair_is_one_line_error(tmp_path, tiny_tokenizer):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    assert load_error(blank, tiny_tokenizer) == f"{blank}: no rows"
    same = write_jsonl(tmp_path / "same.jsonl", [{"chosen": "x y", "rejected": "x y"}] * 2)
    assert load_error(same, tiny_tokenizer) == (
        f"{same}: all 2 rows have identical 'chosen' and 'rejected'"
    )


def test_bad_pair_rows_name_source_row_and_field(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [HH_ROWS[0], {"chosen": "  ", "rejected": "x"}])
    assert load_error(path, tiny_tokenizer) == f"{path}: row 2: field 'chosen' is empty"
