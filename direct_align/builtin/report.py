"""The built-in task's verdict on a trained policy: the hidden reward of its samples and their KL."""

from __future__ import annotations

from typing import Any

from direct_align.builtin.build import BuiltinAssets, BuiltinSpec
from direct_align.data.prompts import Prompts, encode_prompts
from direct_align.evaluation.report import SampleReport
from direct_align.rewards import Rewards, WeightedJudge, builtin_judge


def hidden_reward_report(reference: Any, tokenizer: Any, assets: BuiltinAssets, *, prompts: int,
                         seed: int, rows: int = 0, proxy: str | None = None) -> SampleReport:  # fmt: skip
    """The :class:`~direct_align.evaluation.report.SampleReport` of the built-in task: its first
    ``prompts`` held-out prompts, judged by the hidden reward (``{model}/true_reward``), with
    the task's response length. ``reference``: a model, or the path to load it from; ``proxy``:
    a reward-model directory that also scores the samples (``{model}/proxy_reward``)."""
    texts = assets.held_out_prompts(prompts)
    judge = None
    if proxy is not None:
        from direct_align.rewards import RewardModelJudge

        judge = lambda device: RewardModelJudge(proxy, device=device)  # noqa: E731
    return SampleReport(reference, tokenizer, Prompts(texts, encode_prompts(tokenizer, texts)),
                        Rewards([WeightedJudge("builtin", 1.0, builtin_judge)]), key="true_reward",
                        max_new_tokens=BuiltinSpec().max_new_tokens, seed=seed, rows=rows,
                        proxy=judge, name="builtin", seconds_key="builtin_eval_s")  # fmt: skip
