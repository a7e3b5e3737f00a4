"""A round's samples kept whole: fitting a group, the pair layout of its samples, the policy's
per-sample sums through that layout, and online KTO's thumbs."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from direct_align.generation import score_responses
from direct_align.models.loading import preference_model
from direct_align.preference.groups import (
    fit_group,
    group_round,
    thumbs,
    unpaired_from_samples,  # fmt: skip
)
from direct_align.preference.settings import TrainConfig


def test_fit_group_cuts_every_response_to_the_longest_ones_budget() -> None:
    """max_length 6, prompt of 4, responses of 3 and 1: the rule for (prompt, longest) keeps
    min(4, max(6 − 3, min(4, 3), 1)) = 3 prompt tokens (BOS kept) and 3 response tokens each."""
    prompt, responses = [1, 10, 11, 12], [[20, 21, 22], [30]]
    assert fit_group(prompt, responses, max_length=6, max_prompt_length=None, bos_id=1) == (
        [1, 11, 12], [[20, 21, 22], [30]])
    assert fit_group([1, 2], [[3], [4]], max_length=8, max_prompt_length=None, bos_id=1) == (
        [1, 2], [[3], [4]])  # fits: unchanged
    assert fit_group([1, 2], [[3], []], max_length=8, max_prompt_length=None, bos_id=1) is None


def test_a_group_round_lays_k_samples_into_pairs_and_reads_them_back() -> None:
    """k = 3: prompt p's samples go to pairs (y0, y1), (y2, y0); reading chosen and rejected
    sums back gives [y0, y1, y2] per prompt. A prompt whose group does not fit is left out."""
    prompts = [[1, 5], [1, 6], [1, 7, 8, 9]]
    responses = [[10], [11], [12], [20], [21], [22], [30, 31, 32, 33], [34], [35]]
    scores = torch.tensor([0.1, 0.2, 0.3, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0], dtype=torch.float64)
    round_ = group_round(prompts, responses, scores, 3, max_length=4, max_prompt_length=4, bos_id=1)
    assert round_.prompts == [0, 1] and len(round_) == 2 and round_.pairs_per_prompt == 2
    assert round_.data.chosen_ids == [[10], [12], [20], [22]]
    assert round_.data.rejected_ids == [[11], [10], [21], [20]]
    torch.testing.assert_close(round_.rewards, torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]))
    assert round_.pair_index([1]) == [2, 3]
    sums = round_.as_group(torch.tensor([10.0, 12.0, 20.0, 22.0]), torch.tensor([11.0, 10.0, 21.0, 20.0]))
    torch.testing.assert_close(sums, torch.tensor([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]]))


@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
def test_the_policy_scores_each_sample_of_a_group_as_it_scores_it_alone(tiny_tokenizer,
                                                                         layout: str) -> None:  # fmt: skip
    """Per-sample sums through the pair layout equal the plain forward of each (prompt,
    response) alone (generation.score_responses), in every layout."""
    lm = make_tiny_model(tiny_tokenizer)
    g = torch.Generator().manual_seed(0)
    k, prompts = 3, [[1, *torch.randint(5, 300, (n,), generator=g).tolist()] for n in (3, 7)]
    responses = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (2, 5, 1, 4, 3, 6)]
    round_ = group_round(prompts, responses, torch.zeros(6), k, max_length=64,
                         max_prompt_length=None, bos_id=1)  # fmt: skip
    model = preference_model(lm, TrainConfig(layout=layout), bf16=False)
    from direct_align.data.packing import build_batch

    with torch.no_grad():
        out = model(build_batch(round_.data, round_.pair_index([1, 0]), layout, 0))
    alone = score_responses(lm, [p for p in prompts for _ in range(k)], responses, pad_token_id=0)
    torch.testing.assert_close(round_.as_group(out.chosen, out.rejected),
                               alone.view(2, k)[[1, 0]], rtol=1e-5, atol=1e-4)  # fmt: skip


def test_thumbs_are_above_the_prompts_mean_and_ties_give_none() -> None:
    scores = torch.tensor([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0], [0.0, -1.0, 0.0]])
    assert thumbs(scores) == [(0, 0, False), (0, 1, False), (0, 2, True),
                              (2, 0, True), (2, 1, False), (2, 2, True)]  # fmt: skip


def test_online_kto_examples_take_the_next_prompts_sample_as_the_mismatched_one() -> None:
    prompts, responses = [[1, 5], [1, 6]], [[10], [11], [20], [21]]
    data = unpaired_from_samples(prompts, responses, 2, [(0, 1, True), (1, 0, False)],
                                 max_length=16, max_prompt_length=None, bos_id=1)  # fmt: skip
    assert data.prompt_ids == [[1, 5], [1, 6]] and data.labels == [True, False]
    assert data.chosen_ids == [[11], [20]] and data.rejected_ids == [[21], [10]]
