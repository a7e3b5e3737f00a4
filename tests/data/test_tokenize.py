"""Tokenization: BOS/EOS, the truncation rule, drop counts, fingerprints, and prepare_pairs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from direct_align.data import (
    DropStats,
    PairDataset,
    TextPairs,
    fit_pair,
    prepare_pairs,
    tokenize_pairs,
)
from direct_align.errors import DataError

SRC = "data.jsonl"


def text_pairs(prompts: list[str], chosen: list[str], rejected: list[str], templated=False):
    return TextPairs(prompts, chosen, rejected, format="standard", templated=templated)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- special tokens ---------------------------------------------------------------------------


def test_bos_and_eos_are_added_to_plain_text(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    pairs = text_pairs(["the plot"], [" was clever."], [" was dull."])
    data, stats = tokenize_pairs(pairs, tok, max_length=64, source=SRC)
    assert data.prompt_ids == [[tok.bos_token_id, *ids(tok, "the plot")]]
    assert data.chosen_ids == [[*ids(tok, " was clever."), tok.eos_token_id]]
    assert data.rejected_ids == [[*ids(tok, " was dull."), tok.eos_token_id]]
    assert stats == DropStats(1, 1, 0, 0, 0, max_length=64)


def test_bos_and_eos_already_in_the_text_are_not_doubled(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    pairs = text_pairs(["<s>the plot"], [" was clever.</s>"], [" was dull."])
    data, _ = tokenize_pairs(pairs, tok, max_length=64, source=SRC)
    assert data.prompt_ids[0].count(tok.bos_token_id) == 1
    assert data.chosen_ids[0].count(tok.eos_token_id) == 1
    assert data.rejected_ids[0][-1] == tok.eos_token_id


def test_no_bos_when_the_tokenizer_has_none(tiny_tokenizer) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = None
    data, _ = tokenize_pairs(
        text_pairs(["the plot"], [" a"], [" b"]), tok, max_length=64, source=SRC
    )
    assert data.prompt_ids == [ids(tok, "the plot")]


def test_templated_text_gets_no_extra_tokens(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    prompt = "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    pairs = text_pairs([prompt], ["hello<|im_end|>\n"], ["go<|im_end|>\n"], templated=True)
    data, _ = tokenize_pairs(pairs, tok, max_length=64, source=SRC)
    assert data.prompt_ids == [ids(tok, prompt)]
    assert data.prompt_ids[0][0] == tok.bos_token_id
    assert data.chosen_ids == [ids(tok, "hello<|im_end|>\n")]
    assert tok.eos_token_id not in data.chosen_ids[0]


# --- the truncation rule on hand-made ids --------------------------------------------------------

PROMPT = list(range(100, 108))  # P = 8


def test_pair_that_fits_is_unchanged() -> None:
    assert fit_pair([1, 2, 3], [4, 5], [6, 7, 8, 9], max_length=7) == (
        [1, 2, 3], [4, 5], [6, 7, 8, 9], False,
    )  # fmt: skip


def test_prompt_is_cut_from_the_left_first() -> None:
    # L=10, R=4: P' = max(10-4, min(8, 5), 1) = 6, so the responses keep all their tokens.
    prompt, chosen, rejected, cut = fit_pair(PROMPT, [1, 2, 3], [4, 5, 6, 7], max_length=10)
    assert prompt == PROMPT[2:]
    assert (chosen, rejected, cut) == ([1, 2, 3], [4, 5, 6, 7], True)


def test_prompt_keeps_max_prompt_length_and_responses_are_cut_from_the_right() -> None:
    # L=10, R=9: P' = max(1, min(8, 10 // 2), 1) = 5, so each response keeps 5 tokens.
    long = list(range(1, 10))
    prompt, chosen, rejected, cut = fit_pair(PROMPT, long, long[::-1], max_length=10)
    assert prompt == PROMPT[-5:]
    assert (chosen, rejected, cut) == (long[:5], long[::-1][:5], True)


def test_explicit_max_prompt_length() -> None:
    prompt, chosen, _, _ = fit_pair(PROMPT, list(range(9)), [1], max_length=10, max_prompt_length=2)
    assert (prompt, chosen) == (PROMPT[-2:], list(range(8)))


def test_short_prompt_is_never_padded_up_to_max_prompt_length() -> None:
    prompt, chosen, _, _ = fit_pair([7, 8], list(range(20)), [1], max_length=10)
    assert (prompt, chosen) == ([7, 8], list(range(8)))


def test_leading_bos_survives_left_truncation() -> None:
    prompt, *_ = fit_pair([1, *PROMPT], [2, 3, 4, 5], [6], max_length=10, bos_id=1)
    assert prompt == [1, *PROMPT[-5:]]


def test_pair_that_cannot_fit_is_none() -> None:
    # max_prompt_length >= max_length leaves no room for a response when the prompt is long.
    assert fit_pair(PROMPT, [1], [2], max_length=6, max_prompt_length=6) is None


# --- drop counting ----------------------------------------------------------------------------


def test_drop_counts_and_description(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    fits = ("the plot", " a.", " b.")
    truncated = ("the plot", " was clever. " * 4, " was dull.")
    too_long = ("the movie was great and the plot was clever " * 3, " a", " b")
    same_start = ("the plot", " the movie was great and fun", " the movie was great but dull")
    rows = [fits, truncated, too_long, same_start]
    pairs = text_pairs(*map(list, zip(*rows)))
    # BOS + "the plot" is 3 tokens; a 6-token budget leaves the shared " the movie was great".
    data, stats = tokenize_pairs(pairs, tok, max_length=9, max_prompt_length=9, source=SRC)
    assert stats == DropStats(total=4, kept=2, truncated=1, too_long=1, identical=1, max_length=9)
    assert stats.describe() == (
        "kept 2 of 4 pairs (1 truncated; dropped 1 that cannot fit max_length=9, "
        "1 with identical chosen and rejected)"
    )
    assert len(data) == 2
    assert all(data.pair_tokens(i) <= 2 * 9 for i in range(len(data)))
    assert all(len(data.prompt_ids[i]) + len(data.chosen_ids[i]) <= 9 for i in range(2))


def test_describe_without_drops() -> None:
    assert DropStats(5, 5, 0, 0, 0, max_length=8).describe() == "kept 5 of 5 pairs"
    assert DropStats(5, 5, 2, 0, 0).describe() == "kept 5 of 5 pairs (2 truncated)"


def test_no_pair_left_is_an_error(tiny_tokenizer) -> None:
    pairs = text_pairs(["the movie was great and fun"], [" a"], [" b"])
    with pytest.raises(DataError) as info:
        tokenize_pairs(pairs, tiny_tokenizer, max_length=3, max_prompt_length=3, source=SRC)
    assert str(info.value).startswith("data.jsonl: no pair fits max_length=3 (of 1 pairs, 1 cannot")


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(1, None), (0, None), (8, 0)])
def test_invalid_lengths(tiny_tokenizer, max_length: int, max_prompt_length: int | None) -> None:
    pairs = text_pairs(["p"], [" a"], [" b"])
    with pytest.raises(DataError, match="must be at least"):
        tokenize_pairs(
            pairs,
            tiny_tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            source=SRC,
        )


# --- PairDataset -------------------------------------------------------------------------------


def sample_data() -> PairDataset:
    return PairDataset([[1, 2], [1, 3, 4]], [[5, 2], [6]], [[7], [8, 9]])


def test_fingerprint_is_stable_and_sees_every_id() -> None:
    base = sample_data().fingerprint()
    assert sample_data().fingerprint() == base
    assert len(base) == 32
    for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
        changed = sample_data()
        getattr(changed, field)[1][0] += 1
        assert changed.fingerprint() != base, field


def test_fingerprint_sees_boundaries_and_order() -> None:
    a = PairDataset([[1, 2]], [[3]], [[4]])
    b = PairDataset([[1]], [[2, 3]], [[4]])
    assert a.fingerprint() != b.fingerprint()
    data = sample_data()
    assert data.subset([1, 0]).fingerprint() != data.fingerprint()
    assert data.subset([0, 1]).fingerprint() == data.fingerprint()


def test_subset_and_pair_tokens() -> None:
    data = sample_data()
    sub = data.subset([1])
    assert (sub.prompt_ids, sub.chosen_ids, sub.rejected_ids) == ([[1, 3, 4]], [[6]], [[8, 9]])
    assert len(sub) == 1
    assert data.pair_tokens(1) == 2 * 3 + 1 + 2


# --- end to end ---------------------------------------------------------------------------------


def test_prepare_pairs_from_a_file(tmp_path: Path, tiny_tokenizer) -> None:
    path = tmp_path / "hh.jsonl"
    row = {"chosen": "\n\nHuman: q\n\nAssistant: the plot was clever.",
           "rejected": "\n\nHuman: q\n\nAssistant: the plot was dull."}  # fmt: skip
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    prepared = prepare_pairs(str(path), tiny_tokenizer, max_length=64)
    assert (prepared.format, prepared.source, len(prepared.pairs)) == ("implicit", str(path), 1)
    assert prepared.stats.describe() == "kept 1 of 1 pairs"
    decoded = tiny_tokenizer.decode(prepared.pairs.prompt_ids[0])
    assert decoded == "<s>\n\nHuman: q\n\nAssistant:"


def test_prepare_pairs_checks_options_before_loading(tiny_tokenizer) -> None:
    with pytest.raises(DataError, match="unknown format 'foo'"):
        prepare_pairs("missing.jsonl", tiny_tokenizer, fmt="foo", max_length=8)
    with pytest.raises(DataError, match="max_length must be at least 2"):
        prepare_pairs("missing.jsonl", tiny_tokenizer, max_length=1)
