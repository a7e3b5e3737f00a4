"""Collation: row layout, padding, masks and labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from direct_align.data import IGNORE_INDEX, PairDataset, collate_pairs, prepare_pairs

PAD = 0
DATA = PairDataset(
    prompt_ids=[[1, 10, 11], [1, 20], [1, 30, 31, 32]],
    chosen_ids=[[12, 2], [21, 22, 23, 2], [33, 2]],
    rejected_ids=[[13, 14, 15, 2], [24, 2], [34, 35, 2]],
)


def test_rows_are_chosen_then_rejected_and_right_padded() -> None:
    batch = collate_pairs(DATA, [2, 0], PAD)
    assert batch.num_pairs == 2
    assert batch.index.tolist() == [2, 0]
    assert batch.input_ids.tolist() == [
        [1, 30, 31, 32, 33, 2, PAD],
        [1, 10, 11, 12, 2, PAD, PAD],
        [1, 30, 31, 32, 34, 35, 2],
        [1, 10, 11, 13, 14, 15, 2],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [
        [x, x, x, x, 33, 2, x],
        [x, x, x, 12, 2, x, x],
        [x, x, x, x, 34, 35, 2],
        [x, x, x, 13, 14, 15, 2],
    ]
    for tensor in (batch.input_ids, batch.attention_mask, batch.labels, batch.index):
        assert tensor.dtype == torch.long


def test_pad_to_multiple_of() -> None:
    batch = collate_pairs(DATA, [0, 1, 2], PAD, pad_to_multiple_of=8)
    assert batch.input_ids.shape == (6, 8)
    assert batch.attention_mask.sum().item() == sum(
        len(DATA.prompt_ids[i]) + len(r[i]) for r in (DATA.chosen_ids, DATA.rejected_ids)
        for i in range(3)
    )  # fmt: skip
    assert collate_pairs(DATA, [1], PAD, pad_to_multiple_of=3).input_ids.shape == (2, 6)


def test_to_moves_every_tensor() -> None:
    batch = collate_pairs(DATA, [1], PAD).to("cpu")
    assert batch.input_ids.device.type == "cpu"
    assert batch.labels.shape == batch.attention_mask.shape == (2, 6)


@pytest.mark.parametrize(("indices", "kwargs"), [([], {}), ([0], {"pad_to_multiple_of": 0})])
def test_bad_arguments(indices: list[int], kwargs: dict) -> None:
    with pytest.raises(ValueError):
        collate_pairs(DATA, indices, PAD, **kwargs)


def test_labels_cover_exactly_the_responses_of_prepared_data(
    tmp_path: Path, tiny_tokenizer
) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "the movie", "chosen": " was great.", "rejected": " was dull and long."},
        {"prompt": "i watched the film and", "chosen": " loved it.", "rejected": " left."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs = prepare_pairs(str(path), tiny_tokenizer, max_length=64).pairs
    batch = collate_pairs(pairs, [0, 1], tiny_tokenizer.pad_token_id)
    for row in range(4):
        pair = row % 2
        response = (pairs.chosen_ids if row < 2 else pairs.rejected_ids)[pair]
        start, end = len(pairs.prompt_ids[pair]), len(pairs.prompt_ids[pair]) + len(response)
        labels = batch.labels[row]
        assert (labels[:start] == IGNORE_INDEX).all()
        assert labels[start:end].tolist() == response
        assert (labels[end:] == IGNORE_INDEX).all()
        assert batch.attention_mask[row].sum().item() == end
        assert (batch.input_ids[row, end:] == tiny_tokenizer.pad_token_id).all()
