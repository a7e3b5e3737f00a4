"""Sampling, response scoring and the generation report."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.builtin.task import sample_prompts
from direct_align.data.prompts import encode_prompts
from direct_align.generation import generation_report, sample, score_responses
from fastpath import manual_logp

CPU = torch.device("cpu")
TOL = {"rel": 1e-6, "abs": 1e-5}


def eos_prone_model(tokenizer: PreTrainedTokenizerFast, seed: int, eos_bias: float = 4.0):
    """A tiny model whose output layer favours EOS (p ~ 0.1 a step), so samples end early."""
    model = make_tiny_model(tokenizer, seed=seed)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head = head
    return model.eval()


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


# ----------------------------------------------------------------------------- generation_report


def test_generation_report_of_a_model_against_itself(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    model = eos_prone_model(tiny_tokenizer, seed=4)
    prompts = sample_prompts(6, seed=5)
    report, rows = generation_report(model, model, tiny_tokenizer, prompts,
                                     reward=lambda text: float(len(text)), max_new_tokens=8,
                                     seed=11, batch_size=4, rows=3)  # fmt: skip
    assert [r["prompt"] for r in rows] == list(prompts[:3])
    assert all(r["policy"] == r["reference"] and r["policy_kl"] == 0.0 for r in rows)
    assert all(r["policy_reward"] == float(len(r["policy"])) for r in rows)
    assert set(report) == {
        "reference/true_reward",
        "reference/response_tokens",
        "policy/true_reward",
        "policy/response_tokens",
        "policy/kl",
    }
    for value in report.values():
        assert isinstance(value, float | int) and not isinstance(value, bool)
        assert math.isfinite(value)
    assert isinstance(report["policy/kl"], float)
    assert isinstance(report["policy/true_reward"], float)
    assert report["policy/kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["policy/true_reward"] == report["reference/true_reward"]
    assert report["policy/response_tokens"] == report["reference/response_tokens"]
    assert 0 < report["policy/response_tokens"] <= 8
    # The reward is the mean decoded length of the samples (special tokens skipped).
    responses = sample(model, encode_prompts(tiny_tokenizer, prompts), max_new_tokens=8,
                       eos_token_id=tiny_tokenizer.eos_token_id,
                       pad_token_id=tiny_tokenizer.pad_token_id, seed=11, batch_size=4)  # fmt: skip
    texts = [tiny_tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    assert report["policy/true_reward"] == pytest.approx(sum(map(len, texts)) / len(texts))
    assert report["policy/response_tokens"] == pytest.approx(
        sum(map(len, responses)) / len(responses)
    )


def test_generation_report_scores_both_models_samples_with_a_proxy_judge(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    policy, reference = eos_prone_model(tiny_tokenizer, seed=6), eos_prone_model(tiny_tokenizer, seed=7)
    prompts = sample_prompts(5, seed=8)
    seen: list[tuple[list[str], list[str]]] = []

    def proxy(batch_prompts: list[str], responses: list[str]) -> torch.Tensor:
        seen.append((batch_prompts, responses))
        return torch.tensor([float(r.count("a")) for r in responses])

    report, _ = generation_report(policy, reference, tiny_tokenizer, prompts, reward=len,
                                  max_new_tokens=8, seed=3, proxy=proxy)  # fmt: skip
    assert [s[0] for s in seen] == [list(prompts)] * 2  # the reference's samples, then the policy's
    for (_, texts), name in zip(seen, ("reference", "policy"), strict=True):
        assert report[f"{name}/proxy_reward"] == pytest.approx(sum(t.count("a") for t in texts) / 5)
        assert report[f"{name}/true_reward"] == pytest.approx(sum(map(len, texts)) / 5)


def test_generation_report_kl_is_measured_on_policy_samples(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    policy = eos_prone_model(tiny_tokenizer, seed=6)
    reference = eos_prone_model(tiny_tokenizer, seed=7)
    prompts = sample_prompts(5, seed=8)
    report, _ = generation_report(policy, reference, tiny_tokenizer, prompts,
                                  reward=lambda text: text.count("e") / (1 + len(text)),
                                  max_new_tokens=6, seed=2)  # fmt: skip
    ids = encode_prompts(tiny_tokenizer, prompts)
    common = dict(max_new_tokens=6, eos_token_id=tiny_tokenizer.eos_token_id,
                  pad_token_id=tiny_tokenizer.pad_token_id, seed=2)  # fmt: skip
    policy_samples = sample(policy, ids, **common)
    reference_samples = sample(reference, ids, **common)
    assert policy_samples != reference_samples
    kl = sum(manual_logp(policy, p, r) - manual_logp(reference, p, r)
             for p, r in zip(ids, policy_samples)) / len(ids)  # fmt: skip
    assert report["policy/kl"] == pytest.approx(kl, rel=1e-5, abs=1e-5)
    assert report["reference/response_tokens"] == pytest.approx(
        sum(map(len, reference_samples)) / len(ids)
    )
    assert report["policy/response_tokens"] == pytest.approx(
        sum(map(len, policy_samples)) / len(ids)
    )
