"""Online training on every sample's reward: the group losses and online KTO learn what a judge
rewards, and log what they are (a tiny model, a Python-function judge, in this process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from commands import JUDGES_PY, ONLINE, run_here, train_here
from safetensors.torch import load_file

from prefdata import write_jsonl


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


@pytest.mark.parametrize("loss", ["rebel", "lipo", "sppo", "kto"])
def test_stopped_and_resumed_it_ends_with_the_weights_of_an_uninterrupted_run(
        loss: str, inputs: Path, tiny_model_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    """Stopped by --max-steps-per-run at a round's end, then resumed: the same final weights as
    one run (RLOO is also stopped by SIGTERM and SIGKILL in integration/test_resume.py, through
    the same group path)."""
    args = ["train", "--loss", loss, *ONLINE, "--model", str(tiny_model_dir), "--dataset",
            str(inputs / "prompts.jsonl"), "--reward", f"{inputs / 'judges.py'}:letter_e",
            "--rounds", "3", "--prompts-per-round", "8", "--samples-per-prompt", "3",
            "--batch-size", "4", "--epochs", "2"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_here([*args, "--output-dir", str(straight)], tmp_path / "cache") == 0
    assert run_here([*args, "--output-dir", str(stopped), "--max-steps-per-run", "2"],
                    tmp_path / "cache") == 0  # fmt: skip
    assert not (stopped / "final").exists() and any((stopped / "checkpoints").glob("step-*"))
    assert run_here([*args, "--output-dir", str(stopped), "--resume"], tmp_path / "cache") == 0
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (straight, stopped))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
