"""Unpaired feedback (prompt, completion, label): reading it, pairs as it, and the mismatched
completions that estimate KTO's reference point."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from direct_align.data import prepare_pairs
from direct_align.data.unpaired import mismatched
from direct_align.errors import DataError
from prefdata import rows, write_jsonl


def unpaired_rows(n: int) -> list[dict]:
    out = []
    for row in rows("standard", n, seed=5):
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_mismatched_is_a_seeded_derangement(n: int) -> None:
    other = mismatched(n, seed=4)
    assert sorted(other) == list(range(n)) and all(other[i] != i for i in range(n))
    assert mismatched(n, seed=4) == other


def test_unpaired_jsonl_becomes_labelled_pair_shaped_rows(tmp_path: Path, tiny_tokenizer) -> None:
    data = unpaired_rows(12)
    path = write_jsonl(tmp_path / "thumbs.jsonl", data)
    prepared = prepare_pairs(str(path), tiny_tokenizer, max_length=64, unpaired=True, seed=1)
    pairs = prepared.pairs
    assert prepared.unpaired and prepared.format == "standard"
    assert pairs.labels == [row["label"] for row in data]
    other = mismatched(len(data), seed=1)
    for i in (0, 5, 17):
        completion = tiny_tokenizer(data[i]["completion"], add_special_tokens=False).input_ids
        assert pairs.chosen_ids[i][: len(completion)] == completion
        assert pairs.rejected_ids[i] == pairs.chosen_ids[other[i]]  # another row's completion
    subset = pairs.subset([3, 0])
    assert subset.labels == [pairs.labels[3], pairs.labels[0]]


def test_pairs_can_be_read_as_unpaired(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", rows("standard", 10, seed=2))
    assert not prepare_pairs(str(path), tiny_tokenizer, max_length=64).unpaired
    prepared = prepare_pairs(str(path), tiny_tokenizer, max_length=64, unpaired=True,
                             unpaired_from_pairs=True)
    assert prepared.pairs.labels == [True] * 10 + [False] * 10


def test_conversational_unpaired_rows(tmp_path: Path, tiny_tokenizer) -> None:
    data = [{"prompt": [{"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": text}], "label": label}
            for text, label in (("great film.", True), ("awful film.", False))]  # fmt: skip
    prepared = prepare_pairs(str(write_jsonl(tmp_path / "chat.jsonl", data)), tiny_tokenizer,
                             max_length=64, unpaired=True)  # fmt: skip
    assert prepared.unpaired and prepared.format == "conversational"
    assert "great film.<|im_end|>" in tiny_tokenizer.decode(prepared.pairs.chosen_ids[0])


@pytest.mark.parametrize(("row", "problem"), [
    ({"prompt": "a", "completion": "b", "label": "maybe"}, "row 2: field 'label' is a string ('maybe'), expected true or false"),
    ({"prompt": "a", "completion": " ", "label": True}, "row 2: field 'completion' is empty"),
])  # fmt: skip
def test_bad_unpaired_rows_name_row_and_field(tmp_path: Path, tiny_tokenizer, row: dict, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "completion": "y", "label": True}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: {problem}")):
        prepare_pairs(str(path), tiny_tokenizer, max_length=64, unpaired=True)


def test_unpaired_feedback_is_refused_where_pairs_are_needed(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "thumbs.jsonl", unpaired_rows(2))
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: these rows are unpaired feedback "
                                                        "(prompt, completion, label); this needs "
                                                        "preference pairs")):  # fmt: skip
        prepare_pairs(str(path), tiny_tokenizer, max_length=64)
