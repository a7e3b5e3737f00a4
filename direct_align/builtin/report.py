"""The built-in task's verdict on a trained policy: the hidden reward of its samples and their KL."""

from __future__ import annotations

import time
from typing import Any

from direct_align.builtin.build import BuiltinAssets, BuiltinSpec
from direct_align.builtin.task import true_reward
from direct_align.generation import generation_report
from direct_align.models.loading import load_causal_lm


class HiddenRewardReport:
    """True reward and length of the reference's and a policy's samples on ``prompts``
    held-out prompts, and KL(policy‖reference), with a table of the first ``rows`` samples
    (:func:`~direct_align.generation.generation_report`), as often as a run evaluates.

    ``reference``: a model, or the path to load it from (on first use, onto the policy's
    device; then kept). ``proxy``: a reward-model directory that also scores the samples
    (``policy/proxy_reward``, ``reference/proxy_reward``). The reference's samples are the
    same at every evaluation, so they are drawn and scored once. ``seconds`` adds up the time
    spent in reports (what a run spends on evaluation rather than training).
    """

    def __init__(self, reference: Any, tokenizer: Any, assets: BuiltinAssets, *, prompts: int,
                 seed: int, rows: int = 0, proxy: str | None = None) -> None:  # fmt: skip
        self.reference, self.tokenizer, self.assets = reference, tokenizer, assets
        self.prompts, self.seed, self.rows = prompts, seed, rows
        self.proxy_path = proxy
        self.proxy: Any = None
        self.cache: dict[str, Any] = {}
        self.seconds = 0.0

    def __call__(self, model: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        started = time.perf_counter()
        device = next(model.parameters()).device
        if isinstance(self.reference, str):
            self.reference = load_causal_lm(self.reference).to(device)
        if self.proxy_path is not None and self.proxy is None:
            from direct_align.rewards import RewardModelJudge

            self.proxy = RewardModelJudge(self.proxy_path, device=device)
        report = generation_report(model, self.reference, self.tokenizer,
                                   self.assets.held_out_prompts(self.prompts), reward=true_reward,
                                   max_new_tokens=BuiltinSpec().max_new_tokens, seed=self.seed,
                                   rows=self.rows, proxy=self.proxy, reference_cache=self.cache)  # fmt: skip
        self.seconds += time.perf_counter() - started
        return report
