"""What a policy's samples are worth against its reference's, on held-out prompts.

:class:`SampleReport` samples one response per prompt from the reference (once; they are the
same at every evaluation) and from the policy, with the same seed, judges both, and reports per
model the mean reward and response tokens, and for the policy its KL to the reference, its win
rate over the reference on the same prompts and the length-controlled readings of
:mod:`direct_align.evaluation.stats`. The built-in task's report (its hidden reward,
``true_reward``), `train --eval-prompts-file`, `ppo --eval-prompts-file` and `direct-align
evaluate` are all this one report.

KL(policy‖reference) is the sequence-level Monte-Carlo estimate used in the DPO paper's
reward/KL frontier: the mean over policy samples y of log π(y|x) − log π_ref(y|x), in nats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from direct_align.data.prompts import Prompts
from direct_align.evaluation.stats import (
    length_controlled_gain,
    length_controlled_win_rate,
    win_rate,
)
from direct_align.generation import sample, score_responses
from direct_align.models.loading import load_causal_lm
from direct_align.rewards import Rewards


@dataclass
class Drawn:
    """One model's samples, one per prompt: token ids, texts, rewards and proxy scores."""

    ids: list[list[int]]
    texts: list[str]
    rewards: list[float]
    proxy: list[float] | None = None

    @property
    def tokens(self) -> list[int]:
        return [len(r) for r in self.ids]


class SampleReport:
    """The report of a policy's samples on ``prompts`` against ``reference``'s, judged by
    ``rewards`` (metric ``{model}/{key}``), as often as a run evaluates.

    ``reference``: a model, or the path to load it from (on first use, onto the policy's device;
    then kept). ``proxy``: a judge ((prompts, responses) → ``[N]``, e.g. a reward
    model) that also scores both models' samples (``{model}/proxy_reward``), or a callable that
    loads one onto a device. ``seconds`` adds up the time spent in reports (what a run spends on
    evaluation rather than training). ``name``: where a run's summary keeps the last report,
    ``seconds_key`` the seconds.
    """

    def __init__(self, reference: Any, tokenizer: Any, prompts: Prompts, rewards: Rewards, *,
                 key: str, max_new_tokens: int, seed: int, rows: int = 0,
                 proxy: Callable[..., Any] | None = None, batch_size: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, name: str = "evaluation",
                 seconds_key: str = "eval_s") -> None:  # fmt: skip
        self.reference, self.tokenizer, self.prompts, self.rewards = reference, tokenizer, prompts, rewards
        self.key, self.rows, self.name, self.seconds_key = key, rows, name, seconds_key
        self.sampling = {"max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size,
                         "temperature": temperature, "top_p": top_p}  # fmt: skip
        self.proxy_source = proxy
        self.proxy: Callable[[list[str], list[str]], torch.Tensor] | None = None
        self.reference_drawn: Drawn | None = None
        self.generations: list[dict[str, Any]] = []  # every prompt's row of the last report
        self.seconds = 0.0

    def _draw(self, model: Any) -> Drawn:
        tok = self.tokenizer
        ids = sample(model, self.prompts.ids, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, **self.sampling)  # fmt: skip
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        ended = [bool(r) and r[-1] == tok.eos_token_id for r in ids]
        scores, _ = self.rewards(self.prompts.texts, texts, lengths=[len(r) for r in ids], ended=ended)
        proxy = None
        if self.proxy is not None:
            proxy = self.proxy(list(self.prompts.texts), texts).double().tolist()
        return Drawn(ids, texts, scores.tolist(), proxy)

    def __call__(self, model: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(the report, the first ``rows`` prompts' rows for a table)."""
        started = time.perf_counter()
        device = next(model.parameters()).device
        if isinstance(self.reference, str):  # loaded when first needed, beside the policy
            self.reference = load_causal_lm(self.reference).to(device)
        if self.proxy_source is not None and self.proxy is None:
            self.proxy = self.proxy_source(device)
        if self.reference_drawn is None:
            self.reference_drawn = self._draw(self.reference)
        ref, pol = self.reference_drawn, self._draw(model)
        pad = self.tokenizer.pad_token_id
        kl = (score_responses(model, self.prompts.ids, pol.ids, pad_token_id=pad)
              - score_responses(self.reference, self.prompts.ids, pol.ids, pad_token_id=pad))  # fmt: skip
        report = self.compare(pol, ref, kl)
        self.generations = [{"prompt": self.prompts.texts[i], "reference": ref.texts[i],
                             "policy": pol.texts[i], "reference_reward": ref.rewards[i],
                             "policy_reward": pol.rewards[i], "reference_tokens": ref.tokens[i],
                             "policy_tokens": pol.tokens[i], "policy_kl": kl[i].item()}
                            for i in range(len(self.prompts))]  # fmt: skip
        self.seconds += time.perf_counter() - started
        return report, self.generations[: self.rows]

    def compare(self, pol: Drawn, ref: Drawn, kl: torch.Tensor) -> dict[str, float]:
        """Per model its mean reward, proxy score and response tokens; for the policy its KL,
        win rate (with its 95% interval) and the length-controlled readings."""
        report: dict[str, float] = {}
        for name, drawn in (("reference", ref), ("policy", pol)):
            report[f"{name}/{self.key}"] = statistics.mean(drawn.rewards)
            if drawn.proxy is not None:
                report[f"{name}/proxy_reward"] = statistics.mean(drawn.proxy)
            report[f"{name}/response_tokens"] = float(statistics.mean(drawn.tokens))
        report["policy/kl"] = kl.mean().item()
        wins = win_rate(pol.rewards, ref.rewards)
        lc_rate, length_coef = length_controlled_win_rate(pol.rewards, ref.rewards, pol.tokens,
                                                          ref.tokens)  # fmt: skip
        lc_gain, slope = length_controlled_gain(pol.rewards, ref.rewards, pol.tokens, ref.tokens)
        report |= {"policy/win_rate": wins.rate, "policy/win_rate_low": wins.low,
                   "policy/win_rate_high": wins.high, "policy/lc_win_rate": lc_rate,
                   "policy/length_coef": length_coef, "policy/lc_reward_gain": lc_gain,
                   "policy/reward_per_token": slope}  # fmt: skip
        return report


def report_rows(report: dict[str, float], key: str) -> list[tuple[str, Any, Any]]:
    """The rows (what, reference, policy) of a report for the tables the commands print."""
    what = "true reward of samples (hidden, ↑)" if key == "true_reward" else "reward of samples (↑)"
    rows: list[tuple[str, Any, Any]] = [
        (what, report[f"reference/{key}"], report[f"policy/{key}"]),
        ("KL(policy‖reference) of samples, nats", 0.0, report["policy/kl"]),
        ("response tokens per sample", report["reference/response_tokens"],
         report["policy/response_tokens"]),
    ]  # fmt: skip
    if "policy/win_rate" in report:
        rows += [("win rate over the reference (95% interval)", None,
                  f"{report['policy/win_rate']:.3f} [{report['policy/win_rate_low']:.3f}, "
                  f"{report['policy/win_rate_high']:.3f}]"),
                 ("length-controlled win rate", None, report["policy/lc_win_rate"])]  # fmt: skip
    return rows


def reward_key(report: dict[str, Any]) -> str:
    """``true_reward`` (the built-in task's hidden reward) or ``reward`` (a judge's)."""
    return "true_reward" if "policy/true_reward" in report else "reward"
