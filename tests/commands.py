"""Running `direct-align` from tests: in-process for one-line errors, in a subprocess for runs,
and the small settings the tests' runs share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from direct_align.cli import main


def fail(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    """Run the CLI in-process; return its single error line after checking exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0].removeprefix("error: ")


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--dataset", str(data), "--output-dir", str(out),
            "--max-steps", "1", *extra]  # fmt: skip


TINY_RUN = ["--learning-rate", "1e-2", "--batch-size", "16", "--epochs", "2", "--max-length", "64",
            "--eval-fraction", "0.15", "--eval-every", "0", "--save-every", "0"]  # fmt: skip


def run_cli(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m direct_align ARGS`` with its own cache directory; output captured."""
    full_env = {**os.environ, "DIRECT_ALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run([sys.executable, "-m", "direct_align", *args], capture_output=True,
                          text=True, env=full_env, timeout=600)  # fmt: skip


def run_here(args: list[str], cache: Path, **env: str) -> int:
    """`direct-align ARGS` in this process (no start-up cost), with its own cache directory and
    ``env``; returns its exit status. For runs whose process does not matter (no signals, no
    exit codes of a real process)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"DIRECT_ALIGN_CACHE": str(cache), **env}.items():
            mp.setenv(key, value)
        try:
            main(args)
        except SystemExit as e:
            return int(e.code or 0)
    return 0


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


JUDGES_PY = """
import os

def letter_e(prompts, responses):
    return [float(r.count("e")) for r in responses]

def flaky(prompts, responses):
    flag = os.environ["FLAKY"]
    calls = int(open(flag).read()) + 1 if os.path.exists(flag) else 0
    if os.path.exists(flag):
        open(flag, "w").write(str(calls))
        if calls >= 2:
            return [float("nan")] * len(responses)
    return [-float(len(r)) for r in responses]

def three(prompts, responses):
    return [0.0, 1.0, 2.0]
"""
ONLINE = ["--online", "--max-length", "48", "--max-new-tokens", "12", "--learning-rate", "5e-2",
          "--beta", "0.5", "--batch-size", "8", "--eval-every", "0", "--save-every", "0",
          "--report-to", "none"]  # fmt: skip


def train_here(args: list[str], cache: Path, caplog: pytest.LogCaptureFixture) -> str:
    """`direct-align train ARGS` in this process with its own cache; returns what it logged,
    after checking it exited cleanly."""
    import logging

    caplog.clear()
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="direct_align"):
        mp.setenv("DIRECT_ALIGN_CACHE", str(cache))
        try:
            main(["train", *args])
        except SystemExit as e:
            assert e.code in (0, None), caplog.text[-3000:]
    return caplog.text
