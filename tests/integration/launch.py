"""Launching `direct-align` in several CPU processes (torchrun, accelerate launch), as users do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ARGS = ["--loss", "dpo", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4",
        "--learning-rate", "1e-3", "--max-length", "64", "--eval-every", "0", "--save-every", "0",
        "--attn", "segments"]  # fmt: skip


# what `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports, in fp32
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
            "FSDP_SYNC_MODULE_STATES": "true"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = Path(__file__).parents[2]


def launch(processes: int, args: list[str], env: dict[str, str], check: bool = True,
           config: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """`direct-align ARGS` in ``processes`` processes (gloo on CPU): torchrun, or with a
    ``config`` of configs/accelerate/ `accelerate launch --config_file` it, as users run it."""
    command = [sys.executable, "-m", "direct_align"]
    if config is not None:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / config), "--num_processes",
                   str(processes), "--mixed_precision", "no", "--main_process_port",
                   str(free_port()), "-m", "direct_align"]  # fmt: skip
    elif processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={free_port()}", "-m", "direct_align"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines()
              if any(w in line for w in ("Error", "error:", "terminate", "enforce", "what()"))]
    assert result.returncode == 0 or not check, "\n".join([*errors[:10], result.stderr[-1500:]])
    return result


def train(processes: int, out: Path, model: Path, data: Path, cache: Path, *extra: str,
          config: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """`direct-align train` (offline) in ``processes`` processes (see :func:`launch`)."""
    return launch(processes, ["train", "--model", str(model), "--dataset", str(data),
                              "--output-dir", str(out), *ARGS, *extra],
                  {"DIRECT_ALIGN_CACHE": str(cache)}, config=config)  # fmt: skip


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def records(run: Path) -> list[dict]:
    """The run's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def last_train_record(run: Path) -> dict:
    return [r for r in records(run) if "train/loss" in r][-1]
