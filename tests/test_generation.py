"""Sampling and response scoring."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import eos_prone_model, make_tiny_model
from direct_align.builtin.task import sample_prompts
from direct_align.data.prompts import encode_prompts
from direct_align.generation import sample, score_responses
from fastpath import manual_logp

CPU = torch.device("cpu")
TOL = {"rel": 1e-6, "abs": 1e-5}


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    return encode_prompts(tiny_tokenizer, sample_prompts(12, seed=4))


# ----------------------------------------------------------------------------- encode_prompts


def test_encode_prompts_adds_bos_once(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    bos = tiny_tokenizer.bos_token_id
    plain = tiny_tokenizer("the film", add_special_tokens=False).input_ids
    ids = encode_prompts(tiny_tokenizer, ["the film", "<s>the film"])
    assert ids == [[bos, *plain], [bos, *plain]]


# ----------------------------------------------------------------------------- sample


def test_sample_is_seeded_and_stops_at_eos(
    tiny_tokenizer: PreTrainedTokenizerFast, prompt_ids: list[list[int]]
) -> None:
    model = eos_prone_model(tiny_tokenizer, seed=0)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=pad, batch_size=5)
    first = sample(model, prompt_ids, seed=7, **kw)
    assert sample(model, prompt_ids, seed=7, **kw) == first
    assert sample(model, prompt_ids, seed=8, **kw) != first

    assert len(first) == len(prompt_ids)
    ended = [r for r in first if eos in r]
    assert ended and len(ended) < len(first)  # both kinds occur, so the checks below bite
    for response in first:
        assert 1 <= len(response) <= 10
        assert eos not in response[:-1]  # EOS only ever as the last token
        if response[-1] != eos:
            assert len(response) == 10  # no EOS: ran to max_new_tokens
    assert any(len(r) < 10 for r in ended)  # some stopped early


def test_sample_leaves_the_global_rng_and_mode_alone(
    tiny_tokenizer: PreTrainedTokenizerFast, prompt_ids: list[list[int]]
) -> None:
    model = make_tiny_model(tiny_tokenizer, seed=1)
    model.train()
    kw = dict(max_new_tokens=6, eos_token_id=tiny_tokenizer.eos_token_id,
              pad_token_id=tiny_tokenizer.pad_token_id, seed=3)  # fmt: skip
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out_a = sample(model, prompt_ids[:4], **kw)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    torch.manual_seed(456)  # another global state: same samples, they depend on `seed` only
    assert sample(model, prompt_ids[:4], **kw) == out_a


def test_sample_does_not_depend_on_left_padding(
    tiny_tokenizer: PreTrainedTokenizerFast, prompt_ids: list[list[int]]
) -> None:
    # Near-greedy sampling (very low temperature) must continue each prompt the same way alone
    # and left-padded next to a much longer prompt. Attention outputs are scaled up so that
    # attending to the padding (a wrong mask) would visibly change the continuations.
    model = make_tiny_model(tiny_tokenizer, seed=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(10.0)
    kw = dict(max_new_tokens=6, eos_token_id=tiny_tokenizer.eos_token_id,
              pad_token_id=tiny_tokenizer.pad_token_id, temperature=1e-4)  # fmt: skip
    long = prompt_ids[0] + prompt_ids[1] + prompt_ids[2]
    shorts = prompt_ids[3:9]
    assert all(len(long) > len(p) + 5 for p in shorts)
    alone = [sample(model, [p], **kw)[0] for p in shorts]
    padded = sample(model, [long, *shorts], **kw)
    assert padded[1:] == alone


# ----------------------------------------------------------------------------- score_responses


def test_score_responses_matches_manual_computation(
    tiny_tokenizer: PreTrainedTokenizerFast, prompt_ids: list[list[int]]
) -> None:
    model = make_tiny_model(tiny_tokenizer, seed=3)
    model.train()
    eos = tiny_tokenizer.eos_token_id
    responses = [[40, 41, eos], [50, 51, 52, 53, 54, 55, 56, 57, eos], [60], [70, 71, 72, 73]]
    prompts = prompt_ids[:4]
    sums = score_responses(model, prompts, responses, pad_token_id=tiny_tokenizer.pad_token_id,
                           batch_size=3)  # fmt: skip
    assert model.training
    assert sums.shape == (4,) and sums.dtype == torch.float32
    model.eval()
    for k in range(4):
        assert sums[k].item() == pytest.approx(manual_logp(model, prompts[k], responses[k]), **TOL)
