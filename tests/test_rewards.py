"""Judges: spec parsing and loading, weighted sums and penalties, and clear failures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from direct_align.builtin.task import true_reward
from direct_align.errors import ConfigError
from direct_align.rewards import (
    JudgeError,
    Rewards,
    WeightedJudge,
    call_judge,
    load_judge,
    load_rewards,
    parse_spec,
)
from direct_align.rm.model import load_reward_model, score

PROMPTS = ["the film", "the plot", "i watched"]
RESPONSES = [" was great.", " was dull and boring.", " it twice"]

JUDGES_PY = """
def length(prompts, responses):
    return [float(len(r)) for r in responses]

def positive(prompts, responses):
    return [float("great" in r) for r in responses]

def short(prompts, responses):
    return [1.0]

def nan(prompts, responses):
    return [float("nan")] * len(responses)

def boom(prompts, responses):
    raise ValueError("the judge broke")

def matrix(prompts, responses):
    return [[1.0, 2.0]] * len(responses)

def words(prompts, responses):
    return ["good"] * len(responses)

NOT_CALLABLE = 3
"""


@pytest.fixture
def judges_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_judges.py"
    path.write_text(JUDGES_PY)
    return path


@pytest.mark.parametrize(("text", "expected"), [
    ("builtin", ("builtin", 1.0)),
    ("mod:fn=0.7", ("mod:fn", 0.7)),
    ("runs/rm/final=0.3", ("runs/rm/final", 0.3)),
    ("a=b:fn", ("a=b:fn", 1.0)),  # not a number after '=': part of the spec
    ("x.py:fn=-1", ("x.py:fn", -1.0)),
])  # fmt: skip
def test_parse_spec(text: str, expected: tuple[str, float]) -> None:
    assert parse_spec(text) == expected


def test_parse_spec_refuses_an_infinite_weight() -> None:
    with pytest.raises(ConfigError, match="finite"):
        parse_spec("builtin=inf")


def test_builtin_judge_is_the_hidden_reward() -> None:
    scores = call_judge("builtin", load_judge("builtin"), PROMPTS, RESPONSES)
    assert scores.tolist() == [true_reward(r) for r in RESPONSES] == [1.0, 0.0, 0.5]


def test_path_and_module_functions_load(judges_file: Path, monkeypatch) -> None:
    by_path = load_judge(f"{judges_file}:length")
    assert call_judge("p", by_path, PROMPTS, RESPONSES).tolist() == [11.0, 21.0, 9.0]
    monkeypatch.syspath_prepend(str(judges_file.parent))
    by_module = load_judge("my_judges:positive")
    assert call_judge("m", by_module, PROMPTS, RESPONSES).tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(("spec", "message"), [
    ("nowhere.py:fn", "file 'nowhere.py' does not exist"),
    ("{file}:missing", "has no attribute 'missing'"),
    ("{file}:NOT_CALLABLE", "is not callable"),
    ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
    ("not-a-judge", "not 'builtin', a reward-model directory"),
])  # fmt: skip
def test_bad_specs_name_themselves(spec: str, message: str, judges_file: Path) -> None:
    spec = spec.format(file=judges_file)
    with pytest.raises(ConfigError) as info:
        load_judge(spec)
    assert f"--reward '{spec}'" in str(info.value) and message in str(info.value)


def test_a_judge_file_that_fails_to_import(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("def fn(:\n")
    with pytest.raises(ConfigError, match="cannot import .*SyntaxError"):
        load_judge(f"{path}:fn")


@pytest.mark.parametrize(("name", "message"), [
    ("short", "returned 1 scores for 3 responses"),
    ("nan", "returned nan for response 0 (3 of 3 scores are not finite)"),
    ("boom", "raised ValueError: the judge broke"),
    ("matrix", "returned shape (3, 2) for 3 responses"),
    ("words", "returned list, not a sequence of 3 numbers"),
])  # fmt: skip
def test_bad_judges_fail_with_their_name(name: str, message: str, judges_file: Path) -> None:
    spec = f"{judges_file}:{name}"
    with pytest.raises(JudgeError) as info:
        call_judge(spec, load_judge(spec), PROMPTS, RESPONSES)
    assert str(info.value) == f"judge '{spec}': {message}"


def test_weighted_sum_logs_each_judge(judges_file: Path) -> None:
    rewards = load_rewards([f"{judges_file}:length=0.5", "builtin=2"])
    total, metrics = rewards(PROMPTS, RESPONSES)
    # 0.5 × (11, 21, 9) + 2 × (1, 0, 0.5)
    assert total.tolist() == [7.5, 10.5, 5.5]
    assert metrics[f"reward/{judges_file}:length"] == pytest.approx(41 / 3)
    assert metrics["reward/builtin"] == pytest.approx(0.5)
    assert metrics["reward/total"] == pytest.approx(23.5 / 3)


def test_length_and_eos_penalties() -> None:
    rewards = Rewards([WeightedJudge("builtin", 1.0, load_judge("builtin"))],
                      length_penalty=0.01, eos_penalty=0.25)  # fmt: skip
    total, metrics = rewards(PROMPTS, RESPONSES, lengths=[4, 10, 50], ended=[True, True, False])
    # (1, 0, 0.5) − 0.01 × (4, 10, 50) − 0.25 × (0, 0, 1)
    assert total.tolist() == pytest.approx([0.96, -0.10, -0.25])
    assert metrics["reward/length_penalty"] == pytest.approx(0.64 / 3)
    assert metrics["reward/missing_eos"] == pytest.approx(1 / 3)


def test_a_judge_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        load_rewards(["builtin", "builtin=0.5"])


def test_reward_model_directory_scores_as_rm_score(tiny_model_dir: Path, tiny_tokenizer:
                                                   PreTrainedTokenizerFast, tmp_path: Path) -> None:  # fmt: skip
    torch.manual_seed(0)
    model = load_reward_model(str(tiny_model_dir), tiny_tokenizer)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a head that tells responses apart
    model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    judge = load_judge(str(tmp_path / "rm"), max_length=64)
    scores = call_judge("rm", judge, PROMPTS, RESPONSES)
    expected = score(model.eval(), tiny_tokenizer, PROMPTS, RESPONSES, max_length=64)
    assert torch.allclose(scores.float(), expected, atol=1e-5)
    assert len(set(scores.tolist())) == 3 and all(math.isfinite(s) for s in scores.tolist())


def test_a_directory_that_is_no_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"--reward '{tmp_path}'"):
        load_judge(str(tmp_path))
