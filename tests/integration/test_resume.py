"""Every training command survives a stop: SIGTERM mid-run, then ``--resume``, ends with the weights
of an uninterrupted run (`train` offline: integration/test_cli_train.py). Each run is a real
`direct-align` process on a tiny local model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from commands import JUDGES_PY, assert_ok, run_cli, run_here
from safetensors.torch import load_file

from direct_align.builtin.task import sample_prompts
from prefdata import rows, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Preference pairs, prompts, a judge module and a small reward model trained on the pairs."""
    path = tmp_path_factory.mktemp("resume")
    files = {"cache": path / "cache", "pairs": write_jsonl(path / "pairs.jsonl", rows("standard", 200, seed=3)),
             "prompts": write_jsonl(path / "prompts.jsonl", [{"prompt": p} for p in sample_prompts(48, seed=5)]),
             "judges": path / "judges.py", "rm": path / "rm"}  # fmt: skip
    files["judges"].write_text(JUDGES_PY)
    assert_ok(run_cli(["train-rm", "--model", str(tiny_model_dir), "--dataset", str(files["pairs"]),
                       "--output-dir", str(files["rm"]), "--max-steps", "5", "--batch-size", "8",
                       "--max-length", "64", "--eval-every", "0", "--report-to", "none"],
                      files["cache"]))  # fmt: skip
    return files


def commands(name: str, model: Path, files: dict[str, Path]) -> list[str]:
    """The command line of each training command, long enough to be stopped mid-run."""
    lines = {
        "train-rm": ["train-rm", "--model", str(model), "--dataset", str(files["pairs"]),
                     "--max-steps", "80", "--batch-size", "4", "--learning-rate", "1e-3",
                     "--max-length", "64", "--eval-every", "40", "--save-every", "0"],
        "ppo": ["ppo", "--model", str(model), "--reward-model", str(files["rm"] / "final"),
                "--dataset", str(files["prompts"]), "--rollouts", "20", "--rollout-batch-size", "8",
                "--mini-batch-size", "4", "--max-new-tokens", "8", "--learning-rate", "1e-3",
                "--eval-every", "0", "--save-every", "0"],
        "train --online": ["train", "--online", "--model", str(model), "--dataset",
                           str(files["prompts"]), "--reward", f"{files['judges']}:letter_e",
                           "--rounds", "14", "--prompts-per-round", "8", "--max-new-tokens", "8",
                           "--max-length", "48", "--batch-size", "4", "--learning-rate", "5e-2",
                           "--eval-every", "0", "--save-every", "0"],
    }  # fmt: skip
    # the critic-free RL baseline: every prompt's whole group, with the sampling log-probs
    lines["train --online --loss rloo"] = [*lines["train --online"], "--loss", "rloo",
                                           "--samples-per-prompt", "3"]  # fmt: skip
    return lines[name]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def stop_mid_run(args: list[str], out: Path, cache: Path, *, kill: bool = False,
                 records: int = 1) -> str:
    """Start ``args``; once it logs ``records`` train records past those already in
    ``out/metrics.jsonl``, send SIGTERM (or with ``kill`` SIGKILL: no chance to save); returns
    its stderr after checking how it ended."""
    env = {**os.environ, "DIRECT_ALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "direct_align", *args, "--output-dir", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = out / "metrics.jsonl"

    def train_records() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return sum('"train/' in line or '"objective/' in line for line in lines)

    before = train_records()
    deadline = time.monotonic() + 300
    while train_records() < before + records:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    if kill:
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
        return stderr
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "checkpoint saved, continue with --resume" in stderr
    assert not (out / "final").exists() and any((out / "checkpoints").glob("step-*"))
    return stderr


@pytest.mark.parametrize("command", ["train-rm", "ppo", "train --online",
                                     "train --online --loss rloo"])
def test_stopped_twice_then_resumed_it_ends_with_the_weights_of_an_uninterrupted_run(
        command: str, files: dict[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    """Stopped by --max-steps-per-run, resumed and stopped by SIGTERM mid-run, resumed and
    killed (SIGKILL) mid-run, resumed to the end: the weights and the logged steps are those of
    one uninterrupted run."""
    args = commands(command, tiny_model_dir, files)
    straight = tmp_path / "straight"
    assert run_here([*args, "--output-dir", str(straight)], files["cache"]) == 0  # the reference
    out = tmp_path / "stopped"
    # (in this process where no signal or exit code is involved: a process start saved)
    assert run_here([*args, "--output-dir", str(out), "--max-steps-per-run", "3"], files["cache"]) == 0
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and not (out / "final").exists()
    state = json.loads((out / "checkpoints" / checkpoints[0] / "trainer_state.json").read_text())
    assert state["step"] >= 3  # online stops at the end of the round that reached 3 steps
    stderr = stop_mid_run([*args, "--resume"], out, files["cache"])
    assert "resuming from" in stderr
    # killed: the newest checkpoint (every 2 steps here) is where the next run starts
    stop_mid_run([*args, "--resume", "--save-every", "2"], out, files["cache"], kill=True,
                 records=3)  # fmt: skip
    assert run_here([*args, "--output-dir", str(out), "--resume"], files["cache"]) == 0
    assert_same(final_weights(out), final_weights(straight))
    assert (out / "summary.json").is_file()

    def logged(run: Path) -> list[int]:  # the steps of train records: one run's, in order
        return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"train/' in line or '"objective/' in line]  # fmt: skip

    assert logged(out) == logged(straight)
