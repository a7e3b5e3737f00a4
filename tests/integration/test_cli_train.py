"""`direct-align train` end to end, in a subprocess, on a tiny local Llama and local files."""

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
from commands import TINY_RUN, assert_ok, run_cli, run_here
from safetensors.torch import load_file

from prefdata import rows, write_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prefs")
    write_jsonl(path / "standard.jsonl", rows("standard", 400, seed=1))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_resume_after_a_stop_gives_the_same_weights(data_dir, cache, tiny_model_dir, tmp_path):
    common = ["train", "--loss", "dpo", "--model", str(tiny_model_dir), "--dataset",
              str(data_dir / "standard.jsonl"), "--max-steps", "9", "--grad-accum", "2",
              *TINY_RUN]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    # the uninterrupted run and the stopped one in this process (no signal involved); the
    # resume in a real process
    assert run_here([*common, "--output-dir", str(straight)], cache) == 0
    assert run_here([*common, "--output-dir", str(stopped), "--max-steps-per-run", "4"], cache) == 0
    assert not (stopped / "final").exists() and (stopped / "checkpoints" / "step-000004").is_dir()
    again = run_cli([*common, "--output-dir", str(stopped), "--resume"], cache)
    assert_ok(again)
    assert "resuming from" in again.stderr and "step 4 of 9" in again.stderr

    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(stopped / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]  # fmt: skip
    assert steps == list(range(1, 10))
    assert summary_of(stopped)["steps"] == 9


def test_python_module_and_help(cache):
    result = run_cli(["train", "--help"], cache)
    assert_ok(result)
    for flag in ("--loss", "--model", "--dataset", "--eval-dataset", "--output-dir", "--config",
                 "--max-steps", "--epochs", "--batch-size", "--grad-accum", "--learning-rate",
                 "--beta", "--max-length", "--seed", "--report-to", "--resume", "--overwrite"):
        assert flag in result.stdout, flag
    assert "dpo|ipo|hinge|robust|orpo|simpo" in result.stdout


def test_sigterm_saves_a_checkpoint_and_exits_143(data_dir, cache, tiny_model_dir, tmp_path):
    """A preempted job: SIGTERM mid-training leaves a complete checkpoint to --resume from."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "direct_align", "train", "--loss", "simpo", "--model",
           str(tiny_model_dir), "--dataset", str(data_dir / "standard.jsonl"), "--output-dir",
           str(out), "--max-steps", "100000", "--eval-every", "0", "--save-every", "0"]  # fmt: skip
    env = {**os.environ, "DIRECT_ALIGN_CACHE": str(cache)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and "checkpoint saved, continue with --resume" in stderr
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())["train_state"]
    assert state["step"] >= 1 and checkpoints[0].name == f"step-{state['step']:06d}"
    assert not (out / "final").exists()


def test_push_to_hub_failing_keeps_final_and_says_so_in_one_line(data_dir, cache, tiny_model_dir,
                                                                  tmp_path) -> None:  # fmt: skip
    out = tmp_path / "run"
    result = run_cli(["train", "--loss", "dpo", "--model", str(tiny_model_dir), "--dataset",
                      str(data_dir / "standard.jsonl"), "--output-dir", str(out), "--max-steps", "2",
                      "--push-to-hub", "someone/tiny-dpo"], cache,
                     HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith("error: --push-to-hub someone/tiny-dpo: upload failed")
    assert f"the model is saved in {out / 'final'}" in error[0]
    card = (out / "final" / "README.md").read_text()
    assert "base_model: " in card and "direct-align train" in card
    assert (out / "summary.json").is_file()
