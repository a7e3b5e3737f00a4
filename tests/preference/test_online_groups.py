"""Online training on every sample's reward: the group losses and online KTO learn what a judge
rewards, and log what they are (a tiny model, a Python-function judge, in this process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from commands import JUDGES_PY, ONLINE, train_here

from prefdata import write_jsonl

pytestmark = pytest.mark.slow  # five whole training runs (about 100 s): not in the fast loop


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("online-groups")
    (path / "judges.py").write_text(JUDGES_PY)
    from direct_align.builtin.task import sample_prompts

    write_jsonl(path / "prompts.jsonl", [{"prompt": p} for p in sample_prompts(40, seed=5)])
    return path


@pytest.mark.parametrize(("loss", "flags"), [
    ("rebel", ["--beta", "0.05", "--eta", "3"]),
    ("lipo", ["--beta", "0.1"]),
    ("sppo", ["--eta", "10"]),
    ("rloo", ["--beta", "0.05"]),
    ("kto", ["--beta", "0.5"]),
])  # fmt: skip
def test_every_sample_loss_learns_what_the_judge_rewards(loss: str, flags: list[str], inputs: Path,
                                                         tiny_model_dir: Path, tmp_path: Path,
                                                         caplog) -> None:  # fmt: skip
    out = tmp_path / "run"
    train_here(["--loss", loss, *ONLINE, *flags, "--model", str(tiny_model_dir), "--dataset",
                str(inputs / "prompts.jsonl"), "--reward", f"{inputs / 'judges.py'}:letter_e",
                "--rounds", "6", "--prompts-per-round", "16", "--samples-per-prompt", "3",
                "--epochs", "4", "--batch-size", "4", "--output-dir", str(out)],
               tmp_path / "cache", caplog)  # fmt: skip
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "online/round" in r]
    key = f"online/reward/{inputs / 'judges.py'}:letter_e"
    first, last = rounds[0][key], rounds[-1][key]
    assert last > first + 0.75, (first, last)  # from about 1.1 e's a response
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge_calls"] == 6 * 16 * 3 and summary["loss"] == loss
    if loss == "kto":  # every sample of a prompt whose rewards differ is a thumb
        assert all(r["online/pairs"] % 3 == 0 for r in rounds)
        assert all("train/kl" in r for r in rounds if r["online/pairs"])
    else:  # each prompt's whole group, its loss's own metrics logged
        assert all(r["online/pairs"] <= 16 and "train/group/reward_std" in r for r in rounds)
        assert summary["eval_loss"] == "dpo"
