"""Online DPO: prompt order, pairing, pair building, settings, and the CLI end to end with
Python-function judges on a tiny model (good judges, failing judges, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from commands import JUDGES_PY, ONLINE, assert_ok, run_cli, train_here
from transformers import AutoModelForCausalLM

from conftest import train_settings
from direct_align.errors import ConfigError
from direct_align.preference.online import round_prompts
from direct_align.preference.round_work import make_pairs, pairs_from_samples
from prefdata import write_jsonl

# "letter_e" rewards responses by their count of the letter e, which a random tiny model can
# learn to raise within a few rounds; "flaky" fails on its second call (the second round) while
# the file FLAKY exists, as a judge service might.
# ----------------------------------------------------------------------------- pure parts


def test_round_prompts_cover_every_prompt_once_per_cycle() -> None:
    rounds = [round_prompts(10, 4, seed=3, round_index=r) for r in range(5)]
    assert all(len(r) == 4 for r in rounds)
    flat = [i for r in rounds for i in r]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new order each cycle
    assert round_prompts(10, 4, seed=3, round_index=2) == rounds[2]  # a function of the round
    assert round_prompts(3, 7, seed=0, round_index=0)[:3] != []  # more per round than prompts
    assert sorted(round_prompts(3, 6, seed=0, round_index=0)) == [0, 0, 1, 1, 2, 2]


def test_make_pairs_best_against_worst_and_ties() -> None:
    scores = torch.tensor([[0.2, 0.9, 0.1], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0]])
    # row 0: best 1, worst 2; row 1: all tie; row 2: first best 0, worst 1
    assert make_pairs(scores) == [(0, 1, 2), (2, 0, 1)]


def test_make_pairs_every_pair_past_a_margin() -> None:
    scores = torch.tensor([[0.0, 0.3, 1.0]])
    # differences: 1-0 = 0.3, 2-0 = 1.0, 2-1 = 0.7; margin 0.5 keeps the last two
    assert make_pairs(scores, margin=0.5) == [(0, 2, 0), (0, 2, 1)]
    assert make_pairs(scores, margin=0.0) == [(0, 1, 0), (0, 2, 0), (0, 2, 1)]


def test_pairs_from_samples_fit_and_drop_identical() -> None:
    prompts = [[1, 5, 6], [1, 7]]
    responses = [[10, 11, 2], [12, 2], [10, 11, 2], [20, 21, 22, 23, 24, 2]]  # k = 2
    data = pairs_from_samples(prompts, responses, 2, [(0, 0, 1), (1, 1, 0)], max_length=6,
                              max_prompt_length=None, bos_id=1)  # fmt: skip
    assert data.prompt_ids == [[1, 5, 6], [1, 7]]
    assert data.chosen_ids == [[10, 11, 2], [20, 21, 22, 23]]  # cut to 6 - 2 tokens
    assert data.rejected_ids == [[12, 2], [10, 11, 2]]
    same = pairs_from_samples(prompts, [[3, 2], [3, 2], [4], [5]], 2, [(0, 0, 1)], max_length=6,
                              max_prompt_length=None, bos_id=1)  # fmt: skip
    assert len(same) == 0


@pytest.mark.parametrize(("flags", "message"), [
    ({"samples_per_prompt": 1}, "--samples-per-prompt must be at least 2"),
    ({"top_p": 0}, "--top-p must be in (0, 1]"),
    ({"online": True, "max_steps": 5}, "--max-steps does not apply to --online"),
    ({"online": True, "dataset": "p.jsonl", "model": "m"}, "needs a judge: --reward"),
    ({"online": True, "rounds": 0}, "--rounds must be at least 1"),
    ({"refresh_reference": True}, "--refresh-reference applies to --online only"),
    ({"online": True, "refresh_reference": True, "loss": "simpo"},
     "--refresh-reference: simpo uses no reference here"),
    ({"loss": "kto", "rpo_alpha": 1.0}, "--rpo-alpha adds the chosen response's NLL"),
    ({"eval_reward_model": "/nonexistent/rm"},
     "--eval-reward-model '/nonexistent/rm': not a reward-model directory"),
    ({"eval_reward_model": ".", "dataset": "pairs.jsonl"}, "--eval-reward-model scores the built-in"),
])  # fmt: skip
def test_impossible_online_settings_are_refused(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_settings({**flags, "output_dir": "unused"})


def test_reward_flags_repeat_and_yaml_takes_one_or_a_list(tmp_path: Path) -> None:
    assert train_settings({"reward": ("a:f=0.5", "b"), "output_dir": "x"}).reward == ["a:f=0.5", "b"]
    (tmp_path / "c.yaml").write_text("reward: builtin\n")
    assert train_settings({"output_dir": "x"}, str(tmp_path / "c.yaml")).reward == ["builtin"]
    (tmp_path / "c.yaml").write_text("reward: [builtin, 'm:f=2']\n")
    assert train_settings({"reward": (), "output_dir": "x"}, str(tmp_path / "c.yaml")).reward == [
        "builtin", "m:f=2"]  # fmt: skip


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("online")
    (path / "judges.py").write_text(JUDGES_PY)
    from direct_align.builtin.task import sample_prompts

    write_jsonl(path / "prompts.jsonl", [{"prompt": p, "id": i}
                                         for i, p in enumerate(sample_prompts(40, seed=5))])  # fmt: skip
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("refresh", [False, True])
def test_refresh_reference_scores_each_round_with_the_policy_as_it_starts(
    refresh: bool, inputs: Path, tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    """One optimizer step per round: with the reference refreshed, each round's only step is
    taken where the policy equals its reference (log-ratios 0, loss log 2, margins 0), while
    the fixed reference is left behind after the first round."""
    out = tmp_path / "run"
    train_here(["--loss", "dpo", *ONLINE, "--model", str(tiny_model_dir), "--dataset",
                str(inputs / "prompts.jsonl"), "--reward", f"{inputs / 'judges.py'}:letter_e",
                "--rounds", "3", "--prompts-per-round", "8", "--epochs", "1",
                "--output-dir", str(out), *(["--refresh-reference"] if refresh else [])],
               tmp_path / "cache", caplog)  # fmt: skip
    rounds = [r for r in records(out) if "online/round" in r and "train/loss" in r]
    assert len(rounds) >= 2 and all(r["online/pairs"] <= 8 for r in rounds)
    later = rounds[1:]
    if refresh:
        assert all(r["train/loss"] == pytest.approx(math.log(2), abs=1e-4) for r in rounds)
        assert all(abs(r["train/rewards/chosen"]) < 1e-4 for r in rounds)
    else:
        assert all(abs(r["train/rewards/chosen"]) > 1e-3 for r in later)


@pytest.mark.slow  # a subprocess run
def test_online_dpo_learns_what_the_judge_rewards(inputs: Path, tiny_model_dir: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "run"
    result = run_cli(["train", "--loss", "dpo", *ONLINE, "--model", str(tiny_model_dir),
                      "--dataset", str(inputs / "prompts.jsonl"), "--reward",
                      f"{inputs / 'judges.py'}:letter_e", "--rounds", "6", "--prompts-per-round", "16",
                      "--samples-per-prompt", "3", "--epochs", "4", "--output-dir", str(out)],
                     tmp_path / "cache")  # fmt: skip
    assert_ok(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge_calls"] == 6 * 16 * 3 and summary["rounds"] == 6
    assert "online: 6 rounds, 288 judge calls" in result.stdout
    rounds = [r for r in records(out) if "online/round" in r]
    assert [r["online/judge_calls"] for r in rounds] == [48 * (i + 1) for i in range(6)]
    assert all(0 < r["online/pairs"] <= 16 and "train/loss" in r for r in rounds)
    # the judge's own reward of fresh samples rises
    key = f"online/reward/{inputs / 'judges.py'}:letter_e"
    first, last = rounds[0][key], rounds[-1][key]
    assert last > first + 5, (first, last)
    AutoModelForCausalLM.from_pretrained(out / "final")


@pytest.mark.slow  # a subprocess run
def test_failing_judge_stops_after_a_checkpoint_and_resume_continues(
    inputs: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out, flag = tmp_path / "run", tmp_path / "flaky"
    flag.write_text("0")
    args = ["train", "--loss", "simpo", *ONLINE, "--model", str(tiny_model_dir), "--dataset",
            str(inputs / "prompts.jsonl"), "--reward", f"{inputs / 'judges.py'}:flaky",
            "--rounds", "3", "--prompts-per-round", "8", "--output-dir", str(out)]  # fmt: skip
    failed = run_cli(args, tmp_path / "cache", FLAKY=str(flag))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: round 2: judge '{inputs / 'judges.py'}:flaky': returned nan")
    assert "rounds done: 1, checkpoint" in message and "--resume" in message
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["online_state"]["round"] == 1

    flag.unlink()  # the judge is fixed
    resumed = run_cli([*args, "--resume"], tmp_path / "cache", FLAKY=str(flag))
    assert_ok(resumed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["judge_calls"] == 3 * 8 * 2
    assert [r["online/round"] for r in records(out) if "online/round" in r] == [1, 2, 3]


@pytest.mark.slow  # a subprocess run
def test_a_judge_with_the_wrong_shape_stops_before_any_update(inputs: Path, tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "run"
    result = run_cli(["train", "--loss", "dpo", *ONLINE, "--model", str(tiny_model_dir),
                      "--dataset", str(inputs / "prompts.jsonl"), "--reward",
                      f"{inputs / 'judges.py'}:three", "--prompts-per-round", "4",
                      "--output-dir", str(out)], tmp_path / "cache")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: round 1: judge '{inputs / 'judges.py'}:three': returned 3 scores for 8 "
        "responses; no round was trained; nothing to checkpoint")
    assert not list((out / "checkpoints").glob("step-*"))
