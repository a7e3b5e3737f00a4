"""The sample report a training run draws at each evaluation: on the built-in task its hidden
reward on its held-out prompts; on own data, with ``--eval-prompts-file``, the judge's reward
(``--eval-judge``, or the run's own judge) on the file's prompts. Either way the run logs
``eval/policy/*``: reward, win rate over the reference, KL and lengths."""

from __future__ import annotations

from typing import Any

from direct_align.builtin.inputs import Inputs
from direct_align.builtin.report import hidden_reward_report
from direct_align.data.prompts import load_prompts
from direct_align.evaluation.report import SampleReport
from direct_align.rewards import Rewards, load_rewards


def prompt_keep(cfg: Any) -> int | None:
    """How many prompt tokens a sampled prompt keeps (its last ones): --max-prompt-length, else
    half of --max-length, leaving room for the response (None: all, where there is no
    --max-length, as in ppo)."""
    max_length = getattr(cfg, "max_length", None)
    if max_length is None:
        return cfg.max_prompt_length
    return max(1, min(cfg.max_prompt_length or max_length // 2, max_length - 1))


def run_report(cfg: Any, inputs: Inputs, tokenizer: Any, reference: Any, *, device: Any,
               judge: Rewards | list[str] | None = None) -> SampleReport | None:  # fmt: skip
    """The report of a run whose settings have ``dataset``, ``eval_prompts``,
    ``eval_prompts_file``, ``eval_judge``, ``eval_reward_model``, ``log_generations``, ``seed``
    and ``max_new_tokens``; None on own data without ``--eval-prompts-file``.

    ``reference``: a model, or the path to load it from when first needed. ``judge``: the run's
    own judge, used when no ``--eval-judge`` is given (loaded judges, or their specs).
    """
    if cfg.dataset is None and inputs.assets is not None:
        return hidden_reward_report(reference, tokenizer, inputs.assets, prompts=cfg.eval_prompts,
                                    seed=cfg.seed, rows=cfg.log_generations,
                                    proxy=cfg.eval_reward_model)  # fmt: skip
    if not cfg.eval_prompts_file:
        return None
    prompts = load_prompts(cfg.eval_prompts_file, tokenizer, keep=prompt_keep(cfg), unique=True)
    prompts.texts, prompts.ids = prompts.texts[: cfg.eval_prompts], prompts.ids[: cfg.eval_prompts]
    if cfg.eval_judge:
        judge = cfg.eval_judge
    if not isinstance(judge, Rewards):
        judge = load_rewards(judge or [], max_length=getattr(cfg, "max_length", None), device=device)
    return SampleReport(reference, tokenizer, prompts, judge, key="reward",
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        rows=cfg.log_generations)  # fmt: skip
