"""The sample report: both models' samples judged, KL on the policy's, win rate per prompt."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import eos_prone_model
from direct_align.builtin.task import sample_prompts
from direct_align.data.prompts import Prompts, encode_prompts
from direct_align.evaluation.report import SampleReport
from direct_align.generation import sample
from direct_align.rewards import Rewards, WeightedJudge
from fastpath import manual_logp


def judge(fn) -> Rewards:
    return Rewards([WeightedJudge("test", 1.0, lambda prompts, responses: [fn(r) for r in responses])])


def prompts_of(tokenizer: PreTrainedTokenizerFast, n: int, seed: int) -> Prompts:
    texts = sample_prompts(n, seed=seed)
    return Prompts(texts, encode_prompts(tokenizer, texts))


def test_a_model_against_itself(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = eos_prone_model(tiny_tokenizer, seed=4)
    prompts = prompts_of(tiny_tokenizer, 6, seed=5)
    report = SampleReport(model, tiny_tokenizer, prompts, judge(lambda t: float(len(t))),
                          key="reward", max_new_tokens=8, seed=11, batch_size=4, rows=3)  # fmt: skip
    metrics, rows = report(model)
    assert [r["prompt"] for r in rows] == list(prompts.texts[:3])
    assert len(report.generations) == 6
    # the same weights and seed draw the same samples: every prompt ties, KL is exactly 0
    assert all(r["policy"] == r["reference"] and r["policy_kl"] == 0.0 for r in report.generations)
    assert all(r["policy_reward"] == float(len(r["policy"])) for r in rows)
    assert metrics["policy/kl"] == 0.0
    assert metrics["policy/win_rate"] == metrics["policy/win_rate_low"] == 0.5
    assert metrics["policy/lc_win_rate"] == pytest.approx(0.5)
    assert metrics["policy/lc_reward_gain"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["policy/reward"] == metrics["reference/reward"]
    assert metrics["policy/response_tokens"] == metrics["reference/response_tokens"]
    for value in metrics.values():
        assert isinstance(value, float) and math.isfinite(value)
    # the reward is the mean decoded length of the samples (special tokens skipped)
    responses = sample(model, prompts.ids, max_new_tokens=8, eos_token_id=tiny_tokenizer.eos_token_id,
                       pad_token_id=tiny_tokenizer.pad_token_id, seed=11, batch_size=4)  # fmt: skip
    texts = tiny_tokenizer.batch_decode(responses, skip_special_tokens=True)
    assert metrics["policy/reward"] == pytest.approx(sum(map(len, texts)) / len(texts))
    assert metrics["policy/response_tokens"] == pytest.approx(sum(map(len, responses)) / len(responses))


def test_kl_win_rate_and_proxy_of_two_models(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    policy, reference = eos_prone_model(tiny_tokenizer, seed=6), eos_prone_model(tiny_tokenizer, seed=7)
    prompts = prompts_of(tiny_tokenizer, 7, seed=8)
    seen: list[list[str]] = []

    def proxy(batch_prompts: list[str], responses: list[str]) -> torch.Tensor:
        seen.append(responses)
        return torch.tensor([float(r.count("a")) for r in responses])

    report = SampleReport(reference, tiny_tokenizer, prompts, judge(lambda t: t.count("e") / (1 + len(t))),
                          key="reward", max_new_tokens=6, seed=2, proxy=lambda device: proxy)  # fmt: skip
    metrics, _ = report(policy)
    common = dict(max_new_tokens=6, eos_token_id=tiny_tokenizer.eos_token_id,
                  pad_token_id=tiny_tokenizer.pad_token_id, seed=2)  # fmt: skip
    policy_samples = sample(policy, prompts.ids, **common)
    reference_samples = sample(reference, prompts.ids, **common)
    assert policy_samples != reference_samples
    kl = sum(manual_logp(policy, p, r) - manual_logp(reference, p, r)
             for p, r in zip(prompts.ids, policy_samples)) / len(prompts)  # fmt: skip
    assert metrics["policy/kl"] == pytest.approx(kl, rel=1e-5, abs=1e-5)
    assert metrics["reference/response_tokens"] == pytest.approx(
        sum(map(len, reference_samples)) / len(prompts))
    # the win rate is the share of prompts whose policy sample scores higher, a tie one half
    rows = report.generations
    expected = sum(1.0 if r["policy_reward"] > r["reference_reward"] else
                   0.5 if r["policy_reward"] == r["reference_reward"] else 0.0 for r in rows) / len(rows)  # fmt: skip
    assert metrics["policy/win_rate"] == pytest.approx(expected)
    assert metrics["policy/win_rate_low"] <= expected <= metrics["policy/win_rate_high"]
    # the proxy judged the reference's samples, then the policy's
    assert len(seen) == 2
    for texts, name in zip(seen, ("reference", "policy"), strict=True):
        assert metrics[f"{name}/proxy_reward"] == pytest.approx(sum(t.count("a") for t in texts) / 7)
    # a second report draws only the policy again: the reference's samples are kept
    report(policy)
    assert len(seen) == 3
