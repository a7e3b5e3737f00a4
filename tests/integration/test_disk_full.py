"""A full disk: `direct-align train` stops with one line naming what it was writing, leaves its
earlier checkpoints intact, and ``--resume`` after freeing space ends where an uninterrupted run
does. The disk is a small tmpfs mounted in a private mount namespace (``unshare -m``, as root)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from commands import assert_ok, run_cli
from safetensors.torch import load_file

from prefdata import rows, write_jsonl

SCRIPT = """
set -u
mount -t tmpfs -o size=900k tmpfs "$MNT"
"$PY" -m direct_align "$@" --output-dir "$MNT/run" > "$LOGS/first.out" 2> "$LOGS/first.err"
echo $? > "$LOGS/first.rc"
ls "$MNT/run/checkpoints" > "$LOGS/checkpoints.txt"
cp "$MNT/run/metrics.jsonl" "$LOGS/metrics.jsonl"
mount -o remount,size=64m "$MNT"
"$PY" -m direct_align "$@" --output-dir "$MNT/run" --resume > "$LOGS/second.out" 2> "$LOGS/second.err"
echo $? > "$LOGS/second.rc"
cp "$MNT/run/final/model.safetensors" "$LOGS/final.safetensors"
"""


def can_mount() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs in its own namespace")
def test_a_full_disk_stops_in_one_line_and_resumes_after_space_is_freed(tmp_path: Path,
                                                                        tiny_model_dir: Path) -> None:  # fmt: skip
    data = write_jsonl(tmp_path / "prefs.jsonl", rows("standard", 120, seed=2))
    args = ["train", "--loss", "dpo", "--model", str(tiny_model_dir), "--dataset", str(data),
            "--max-steps", "40", "--save-every", "2", "--save-total-limit", "2", "--batch-size",
            "4", "--max-length", "64", "--eval-every", "0", "--report-to", "none"]  # fmt: skip
    straight = tmp_path / "straight"
    assert_ok(run_cli([*args, "--output-dir", str(straight)], tmp_path / "cache"))
    mnt, logs = tmp_path / "mnt", tmp_path / "logs"
    mnt.mkdir()
    logs.mkdir()
    env = {"MNT": str(mnt), "LOGS": str(logs), "PY": sys.executable, "PATH": "/usr/bin:/bin",
           "DIRECT_ALIGN_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", SCRIPT, "sh", *args],
                   env=env, cwd=Path(__file__).parents[2], check=True, timeout=600)  # fmt: skip

    first = (logs / "first.err").read_text()
    assert (logs / "first.rc").read_text().strip() == "1", first[-2000:]
    assert "Traceback" not in first
    error = [line for line in first.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "no space left on device writing " in error[0], first[-2000:]
    assert "free space, then --resume" in error[0]
    # the earlier checkpoints are whole, nothing half-written is left, the log reads
    assert (logs / "checkpoints.txt").read_text().split() == ["step-000002", "step-000004"]
    assert all(json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines())

    second = (logs / "second.err").read_text()
    assert (logs / "second.rc").read_text().strip() == "0", second[-2000:]
    a = load_file(str(logs / "final.safetensors"))
    b = load_file(str(straight / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
