"""Judges: whatever scores a policy's responses for online DPO and `direct-align label`.

A judge maps ``(prompts, responses)`` — two lists of N texts, ``responses[i]`` answering
``prompts[i]`` — to N finite scores, higher meaning better. Specs (``--reward SPEC[=WEIGHT]``):

- ``builtin``: the built-in task's hidden sentiment reward (:func:`builtin.task.true_reward`);
- ``module:function`` or ``path/to/file.py:function``: a Python function with the signature
  ``def judge(prompts: list[str], responses: list[str]) -> Sequence[float]`` returning one number
  per response (a list, tuple, NumPy array or ``[N]`` tensor);
- a directory: a reward model, i.e. a sequence classifier with one output that
  ``AutoModelForSequenceClassification`` loads, with its tokenizer (what `train-rm` writes to
  ``final/``); it scores prompt + response as `train-rm` trained it (:func:`rm.model.score`).

Several specs form a weighted sum (weight 1 unless ``=WEIGHT`` is given); each judge's mean score
is logged on its own. A length penalty (per response token) and a missing-EOS penalty (for a
response cut off at the token limit) are subtracted from the sum. A judge that raises or returns
NaN, infinity or the wrong number of scores stops the run with a :class:`JudgeError` naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from direct_align.errors import ConfigError, DirectAlignError, one_line


class Judge(Protocol):
    """Scores ``[N]`` (higher is better) of ``responses[i]`` to ``prompts[i]``."""

    def __call__(self, prompts: list[str], responses: list[str]) -> Sequence[float] | torch.Tensor: ...


class JudgeError(DirectAlignError):
    """A judge raised, or returned something other than N finite numbers."""


def parse_spec(text: str) -> tuple[str, float]:
    """``"SPEC=WEIGHT"`` → (SPEC, WEIGHT); a spec without a numeric ``=WEIGHT`` has weight 1."""
    spec, sep, weight = text.rpartition("=")
    if sep and spec:
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise ConfigError(f"--reward '{text}': the weight must be a finite number")
        return spec, value
    return text, 1.0


def builtin_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """The built-in task's hidden reward of each response (the prompt holds no sentiment)."""
    from direct_align.builtin.task import true_reward

    return [true_reward(r) for r in responses]


class RewardModelJudge:
    """A reward-model directory as a judge: rewards ``[N]`` from its scalar head."""

    def __init__(self, path: str, *, max_length: int | None = None, batch_size: int = 32,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        from direct_align.models.loading import load_tokenizer
        from direct_align.rm.model import load_reward_model

        option = f"--reward '{path}'"
        self.tokenizer = load_tokenizer(path, option=option)
        self.model = load_reward_model(path, self.tokenizer, option=option).to(device).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        from direct_align.rm.model import score

        return score(self.model, self.tokenizer, prompts, responses, batch_size=self.batch_size,
                     max_length=self.max_length)  # fmt: skip


def _load_function(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:function`` or ``path.py:function``."""
    target, _, name = spec.rpartition(":")
    where = f"--reward '{spec}'"
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise ConfigError(f"{where}: file '{target}' does not exist")
            module_name = f"direct_align_judge_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # an import runs arbitrary code: any failure is the judge's
        raise ConfigError(f"{where}: cannot import '{target}': {type(e).__name__}: "
                          f"{one_line(e)}".rstrip(": ")) from None  # fmt: skip
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"{where}: '{target}' has no attribute '{name}'")
    if not callable(fn):
        raise ConfigError(f"{where}: '{name}' in '{target}' is not callable")
    return fn


def load_judge(spec: str, *, max_length: int | None = None,
               device: torch.device | str = "cpu") -> Judge:  # fmt: skip
    """The judge named by ``spec`` (see the module docstring); ConfigError if it cannot load."""
    if spec == "builtin":
        return builtin_judge
    if Path(spec).expanduser().is_dir():
        return RewardModelJudge(spec, max_length=max_length, device=device)
    target, sep, name = spec.rpartition(":")
    if sep and target and name:
        return _load_function(spec)
    raise ConfigError(f"--reward '{spec}': not 'builtin', a reward-model directory, "
                      "'module:function' or 'path.py:function'")  # fmt: skip


def call_judge(name: str, judge: Judge, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """``judge(prompts, responses)`` as a float64 ``[N]`` tensor, or a JudgeError naming ``name``."""
    n = len(responses)
    try:
        raw = judge(list(prompts), list(responses))
    except Exception as e:  # the judge is user code: report any failure as the judge's
        raise JudgeError(f"judge '{name}': raised {type(e).__name__}: {e}") from e
    try:
        if isinstance(raw, torch.Tensor):
            scores = raw.detach().to("cpu", torch.float64)
        else:
            scores = torch.as_tensor(list(raw) if not hasattr(raw, "shape") else raw,
                                     dtype=torch.float64)  # fmt: skip
    except (TypeError, ValueError, RuntimeError):
        raise JudgeError(f"judge '{name}': returned {type(raw).__name__}, not a sequence of "
                         f"{n} numbers") from None  # fmt: skip
    if scores.shape != (n,):
        got = f"{scores.numel()} scores" if scores.dim() == 1 else f"shape {tuple(scores.shape)}"
        raise JudgeError(f"judge '{name}': returned {got} for {n} responses")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise JudgeError(f"judge '{name}': returned {scores[bad[0]].item()} for response {bad[0]} "
                         f"({len(bad)} of {n} scores are not finite)")  # fmt: skip
    return scores


@dataclass
class WeightedJudge:
    name: str  # the spec as given, used in messages and metric names
    weight: float
    judge: Judge


class Rewards:
    """A weighted sum of judges minus length and missing-EOS penalties."""

    def __init__(self, judges: list[WeightedJudge], *, length_penalty: float = 0.0,
                 eos_penalty: float = 0.0) -> None:  # fmt: skip
        if not judges:
            raise ConfigError("--reward: no judge given")
        self.judges = judges
        self.length_penalty = length_penalty
        self.eos_penalty = eos_penalty

    def __call__(self, prompts: list[str], responses: list[str], *,
                 lengths: Sequence[int] | None = None,
                 ended: Sequence[bool] | None = None) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        """Total rewards ``[N]`` (float64) and metrics: each judge's mean score, the penalties'
        means and the total's mean. ``lengths`` [N]: response tokens (for the length penalty);
        ``ended`` [N]: whether each response ended with EOS (for the EOS penalty)."""
        total = torch.zeros(len(responses), dtype=torch.float64)
        metrics: dict[str, float] = {}
        for j in self.judges:
            scores = call_judge(j.name, j.judge, prompts, responses)
            metrics[f"reward/{j.name}"] = scores.mean().item()
            total += j.weight * scores
        if self.length_penalty:
            if lengths is None:
                raise ValueError("a length penalty needs the response lengths")
            penalty = self.length_penalty * torch.tensor(lengths, dtype=torch.float64)
            metrics["reward/length_penalty"] = penalty.mean().item()
            total -= penalty
        if self.eos_penalty:
            if ended is None:
                raise ValueError("an EOS penalty needs to know which responses ended")
            missing = ~torch.tensor(ended, dtype=torch.bool)
            metrics["reward/missing_eos"] = missing.double().mean().item()
            total -= self.eos_penalty * missing.double()
        metrics["reward/total"] = total.mean().item()
        return total, metrics


def load_rewards(specs: Sequence[str], *, length_penalty: float = 0.0, eos_penalty: float = 0.0,
                 max_length: int | None = None, device: torch.device | str = "cpu") -> Rewards:  # fmt: skip
    """The judges of ``--reward`` specs (``SPEC[=WEIGHT]``), loaded and checked up front."""
    judges = []
    for text in specs:
        spec, weight = parse_spec(text)
        judges.append(WeightedJudge(spec, weight, load_judge(spec, max_length=max_length,
                                                             device=device)))  # fmt: skip
    names = [j.name for j in judges]
    if len(set(names)) != len(names):
        raise ConfigError(f"--reward: a judge is given twice ({', '.join(names)})")
    return Rewards(judges, length_penalty=length_penalty, eos_penalty=eos_penalty)
