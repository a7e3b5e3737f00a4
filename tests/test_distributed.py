"""Two CPU processes (gloo) train exactly what one process trains with the same global batch,
and a run checkpointed by two processes resumes in one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefdata import rows, write_jsonl

ARGS = ["--loss", "dpo", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4",
        "--learning-rate", "1e-3", "--max-length", "64", "--eval-every", "0", "--save-every", "0",
        "--attn", "segments"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(processes: int, out: Path, model: Path, data: Path, cache: Path,
          *extra: str) -> subprocess.CompletedProcess:  # fmt: skip
    """`direct-align train` in ``processes`` processes (torchrun, gloo on CPU)."""
    launch = [sys.executable, "-m", "direct_align"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                  f"--master_port={_free_port()}", "-m", "direct_align"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIRECT_ALIGN_CACHE": str(cache),
           "PYTHONPATH": str(Path(__file__).parents[1])}  # fmt: skip
    cmd = [*launch, "train", "--model", str(model), "--dataset", str(data),
           "--output-dir", str(out), *ARGS, *extra]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def last_train_record(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [r for r in records if "train/loss" in r][-1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(tmp / "pairs.jsonl", rows("standard", 60, seed=4))
    return tiny_model_dir, data, tmp


def test_two_processes_match_one_with_the_same_global_batch(setup) -> None:
    model, data, tmp = setup
    train(1, tmp / "one", model, data, tmp / "cache1")
    result = train(2, tmp / "two", model, data, tmp / "cache2")
    one, two = weights(tmp / "one"), weights(tmp / "two")
    assert one.keys() == two.keys()
    initial = load_file(str(model / "model.safetensors"))
    assert any(not torch.equal(one[k], initial[k]) for k in one)  # training moved the weights
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)
    a, b = last_train_record(tmp / "one"), last_train_record(tmp / "two")
    for key in ("train/loss", "train/rewards/accuracies", "train/rewards/margins"):
        assert b[key] == pytest.approx(a[key], abs=1e-4)
    summary = json.loads((tmp / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    # the reference pass was sharded and gathered into one cache, equal to the 1-process one
    caches = [sorted((tmp / c / "reference").glob("*.safetensors")) for c in ("cache1", "cache2")]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and caches[0]
    for p, q in zip(*caches):
        for name, tensor in load_file(str(p)).items():
            torch.testing.assert_close(load_file(str(q))[name], tensor, atol=1e-5, rtol=1e-5)
    # only the main process logged and wrote
    assert result.stdout.count("steps, ") == 1


def test_a_two_process_checkpoint_resumes_in_one_process(setup) -> None:
    model, data, tmp = setup
    if not (tmp / "one").exists():
        train(1, tmp / "one", model, data, tmp / "cache1")
    train(2, tmp / "split", model, data, tmp / "cache3", "--max-steps-per-run", "2")
    assert not (tmp / "split" / "final").exists()
    assert (tmp / "split" / "checkpoints" / "step-000002").is_dir()
    train(1, tmp / "split", model, data, tmp / "cache3", "--resume")
    one, resumed = weights(tmp / "one"), weights(tmp / "split")
    for key in one:
        torch.testing.assert_close(resumed[key], one[key], atol=2e-5, rtol=1e-4)


def test_grad_accum_must_divide_among_the_processes(setup) -> None:
    model, data, tmp = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "direct_align", "train", "--model", str(model),
           "--dataset", str(data), "--output-dir", str(tmp / "bad"), *ARGS, "--grad-accum", "3"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "--grad-accum 3 must be a multiple of the 2 processes" in result.stderr


def test_commands_without_multi_process_support_refuse_to_run_in_several(setup) -> None:
    model, data, tmp = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "direct_align", "train-rm", "--model",
           str(model), "--dataset", str(data), "--output-dir", str(tmp / "rm")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "error: direct-align train-rm runs in one process, and was launched in 2" in result.stderr
    assert not (tmp / "rm").exists()
