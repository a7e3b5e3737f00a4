"""The built-in task's verdict on a trained policy: the hidden reward of its samples and their KL."""

from __future__ import annotations

from typing import Any

from direct_align.builtin.build import BuiltinAssets, BuiltinSpec
from direct_align.builtin.task import true_reward
from direct_align.generation import generation_report
from direct_align.models.loading import load_causal_lm


def hidden_reward_report(model: Any, reference: Any, tokenizer: Any, assets: BuiltinAssets, *,
                         prompts: int, seed: int, rows: int = 0,
                         ) -> tuple[dict[str, float], list[dict[str, Any]]]:  # fmt: skip
    """True reward and length of the reference's and ``model``'s samples on ``prompts`` held-out
    prompts, and KL(policy‖reference), with a table of the first ``rows`` samples
    (:func:`~direct_align.generation.generation_report`); ``reference``: a model, or the path
    to load it from."""
    if isinstance(reference, str):
        reference = load_causal_lm(reference).to(next(model.parameters()).device)
    return generation_report(model, reference, tokenizer, assets.held_out_prompts(prompts),
                             reward=true_reward, max_new_tokens=BuiltinSpec().max_new_tokens,
                             seed=seed, rows=rows)  # fmt: skip
