"""Own data drawn along training: `train`, `train --online` and `ppo` with --eval-prompts-file
report the judge's reward, win rate and KL of the policy's samples, and the online stages read
the prompts of an HH-style preference file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from commands import JUDGES_PY, ONLINE, fail, run_here, train_args

from direct_align.engine.tracking import read_metrics
from prefdata import rows, write_jsonl


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("own-eval")
    judges = tmp / "judges.py"
    judges.write_text(JUDGES_PY)
    return {"tmp": tmp, "judge": judges,
            "prefs": write_jsonl(tmp / "prefs.jsonl", rows("standard", 48, seed=1)),
            "hh": write_jsonl(tmp / "hh.jsonl", rows("implicit", 24, seed=2))}  # fmt: skip


def sample_evals(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "eval/policy/reward" in r]


def check_report(report: dict) -> None:
    for key in ("reference/reward", "policy/reward", "policy/kl", "policy/win_rate",
                "policy/win_rate_low", "policy/win_rate_high", "policy/lc_win_rate",
                "reference/response_tokens", "policy/response_tokens"):  # fmt: skip
        assert isinstance(report[key], float), key
    assert 0 <= report["policy/win_rate_low"] <= report["policy/win_rate"] <= report["policy/win_rate_high"] <= 1


def test_train_draws_reward_and_kl_along_training(own: dict[str, Path], tiny_model_dir: Path) -> None:
    out = own["tmp"] / "train"
    args = train_args(tiny_model_dir, own["prefs"], out, "--max-steps", "4", "--eval-every", "2",
                      "--learning-rate", "1e-2", "--batch-size", "8", "--max-length", "48",
                      "--max-new-tokens", "8", "--eval-prompts-file", str(own["hh"]),
                      "--eval-prompts", "6", "--eval-judge", f"{own['judge']}:letter_e",
                      "--report-to", "none")  # fmt: skip
    assert run_here(args, own["tmp"] / "cache") == 0
    summary = json.loads((out / "summary.json").read_text())
    check_report(summary["evaluation"])
    assert summary["evaluation"]["policy/kl"] > 0  # the policy moved from its reference
    assert [r["step"] for r in sample_evals(out)] == [2, 4]  # along training and at the end


def test_online_reads_hh_prompts_and_is_judged_by_its_own_reward(own: dict[str, Path],
                                                                 tiny_model_dir: Path) -> None:  # fmt: skip
    out = own["tmp"] / "online"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(own["hh"]), "--output-dir",
            str(out), *ONLINE, "--rounds", "2", "--prompts-per-round", "8", "--eval-every", "1",
            "--reward", f"{own['judge']}:letter_e", "--eval-prompts-file", str(own["hh"]),
            "--eval-prompts", "5"]  # fmt: skip
    assert run_here(args, own["tmp"] / "cache") == 0
    summary = json.loads((out / "summary.json").read_text())
    check_report(summary["evaluation"])
    assert len(sample_evals(out)) >= 2
    config = json.loads((out / "summary.json").read_text())
    assert config["rounds"] == 2


def test_ppo_reads_hh_prompts_and_reports_the_eval_judge(own: dict[str, Path],
                                                         tiny_model_dir: Path) -> None:  # fmt: skip
    out = own["tmp"] / "ppo"
    args = ["ppo", "--model", str(tiny_model_dir), "--reward-model", str(tiny_model_dir),
            "--dataset", str(own["hh"]), "--output-dir", str(out), "--rollouts", "2",
            "--rollout-batch-size", "8", "--mini-batch-size", "4", "--max-new-tokens", "8",
            "--learning-rate", "1e-3", "--eval-every", "1", "--eval-prompts-file", str(own["hh"]),
            "--eval-prompts", "5", "--eval-judge", f"{own['judge']}:letter_e", "--report-to", "none"]  # fmt: skip
    assert run_here(args, own["tmp"] / "cache") == 0
    summary = json.loads((out / "summary.json").read_text())
    check_report(summary["evaluation"])
    assert summary["prompts"] == 24  # every row's prompt of the HH file
    assert "initial/reward" in summary["evaluation"]


def test_eval_prompts_flags_refuse_what_cannot_work(own: dict[str, Path], tiny_model_dir: Path,
                                                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = own["tmp"] / "never"
    base = train_args(tiny_model_dir, own["prefs"], out)
    assert "needs a judge" in fail(capsys, [*base, "--eval-prompts-file", str(own["hh"])])
    assert "give that too" in fail(capsys, [*base, "--eval-judge", "builtin"])
    assert "for own data" in fail(capsys, ["train", "--eval-prompts-file", str(own["hh"]),
                                           "--eval-judge", "builtin", "--output-dir", str(out)])  # fmt: skip
    bad_file = fail(capsys, [*base, "--eval-prompts-file", str(own["tmp"] / "none.jsonl"),
                             "--eval-judge", f"{own['judge']}:letter_e"])  # fmt: skip
    assert "none.jsonl" in bad_file
    assert not out.exists()
