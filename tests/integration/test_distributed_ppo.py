"""`train-rm` and `ppo` in two CPU processes (gloo): the reward model trains exactly what one
process trains with the same global batch, PPO splits each rollout's prompts between the
processes and whitens with the statistics of all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import FSDP_ENV, free_port
from safetensors.torch import load_file

from direct_align.cli import main
from direct_align.config import resolve
from direct_align.errors import ConfigError
from direct_align.ppo.core import masked_moments, masked_whiten, mean_var
from direct_align.ppo.run import builtin_rm_config
from direct_align.ppo.settings import PPOConfig, check_processes
from prefdata import rows, write_jsonl

# 20 training pairs: 5 micro-batches of 4, so the epoch's last step has one, for one process
RM_ARGS = ["--batch-size", "4", "--grad-accum", "2", "--epochs", "1", "--eval-fraction", "0.25",
           "--learning-rate", "1e-2", "--max-length", "64", "--eval-every", "0"]  # fmt: skip
PPO_ARGS = ["--rollouts", "2", "--rollout-batch-size", "4", "--mini-batch-size", "2",
            "--max-new-tokens", "6", "--ppo-epochs", "1", "--learning-rate", "1e-2"]  # fmt: skip


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`direct-align ARGS` in two processes (torchrun, gloo on CPU), on this checkout's code,
    with ``env`` added to the environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2]),
           **(env or {})}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "direct_align", *args]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("mp") / "pairs.jsonl", rows("standard", 26, seed=5))


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_train_rm_in_two_processes_matches_one(tiny_model_dir, pairs, tmp_path, engine) -> None:
    """Also at the end of the epoch, where the last step's one micro-batch goes to process 0
    and process 1 runs a stand-in weighted 0 (else DDP would wait for it forever). Under FSDP
    (the variables of configs/accelerate/fsdp.yaml) process 1 builds the model without reading
    it and receives its shards, the fresh head included, from process 0."""
    common = ["--model", str(tiny_model_dir), "--dataset", str(pairs), *RM_ARGS]
    main(["train-rm", *common, "--output-dir", str(tmp_path / "one")])
    result = torchrun("train-rm", *common, "--output-dir", str(tmp_path / "two"),
                      env=FSDP_ENV if engine == "fsdp" else None)  # fmt: skip
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["engine"] == {"ddp": "DDP", "fsdp": "FSDP"}[engine]
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert one.keys() == two.keys()
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(one[k], initial[k]) for k in initial if k in one)  # trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (a["processes"], b["processes"], b["steps"], b["train_pairs"]) == (1, 2, 3, 20)
    assert b["final"]["eval/rewards/accuracies"] == a["final"]["eval/rewards/accuracies"]
    assert b["final"]["eval/loss"] == pytest.approx(a["final"]["eval/loss"], abs=1e-4)
    last = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert [r["step"] for r in last if "train/loss" in r] == [1, 2, 3]  # logged once, by main
    assert result.stdout.count("steps, ") == 1


def test_ppo_in_two_processes_splits_each_rollout(tiny_model_dir, pairs, tmp_path) -> None:
    out = tmp_path / "ppo"
    result = torchrun("ppo", "--model", str(tiny_model_dir), "--reward-model", str(tiny_model_dir),
                      "--dataset", str(pairs), "--output-dir", str(out), *PPO_ARGS,
                      "--critic", "shared")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["rollouts"] == 2
    assert summary["responses"] == 2 * 4  # rollouts of 4 prompts in all, not 4 per process
    assert summary["updates"] == 2 * 2  # 2 minibatches of 2 responses per rollout
    assert 8 <= summary["tokens_generated"] <= 8 * 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2]  # written once, by the main process
    assert records[-1]["perf/tokens_generated"] == summary["tokens_generated"]
    assert result.stdout.count("2 rollouts, 8 responses") == 1
    trained = load_file(str(out / "final" / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_under_fsdp_trains_what_ddp_trains(tiny_model_dir, pairs, tmp_path, critic) -> None:
    """Under FSDP (the variables of configs/accelerate/fsdp.yaml) all four models are sharded:
    policy and critic (or value head) as the prepared module, the reference and the reward
    model as frozen ones; process 1 reads no weights. Each process samples its own prompts in
    step with the other (a sharded policy gathers its layers in every forward), so it draws
    what the same process draws under DDP, and the trained policy and value function match."""
    args = ["ppo", "--model", str(tiny_model_dir), "--reward-model", str(tiny_model_dir),
            "--dataset", str(pairs), *PPO_ARGS, "--critic", critic]  # fmt: skip
    torchrun(*args, "--output-dir", str(tmp_path / "ddp"))
    torchrun(*args, "--output-dir", str(tmp_path / "fsdp"), env=FSDP_ENV)
    ddp, fsdp = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ddp", "fsdp"))
    assert (ddp["engine"], fsdp["engine"]) == ("DDP", "FSDP")
    assert fsdp["tokens_generated"] == ddp["tokens_generated"]  # the same samples
    metrics = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").open()]
               for d in ("ddp", "fsdp")]  # fmt: skip
    for a, b in zip(*metrics):
        for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "val/mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    one = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert one.keys() == two.keys()
    assert any(not torch.equal(one[k], initial[k]) for k in initial)  # trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)
    # process 1 built its models without reading them; memory is reported per process
    assert [m["process"] for m in fsdp["memory_by_process"]] == [0, 1]


def test_ppo_under_fsdp_reports_the_hidden_reward_of_final(default_run, tmp_path) -> None:
    """On the built-in task no process holds a sharded policy whole, so the main process
    evaluates final/ alone; the initial policy's true reward is the reference's, whose samples
    (the same weights, the same seed) are the initial policy's, as one process shows."""
    cache, _, first = default_run
    assert first.returncode == 0, first.stderr[-2000:]
    args = ["ppo", "--reward-model", str(next((cache / "builtin").glob("*/base"))),
            "--rollouts", "1", "--rollout-batch-size", "8", "--mini-batch-size", "4",
            "--eval-prompts", "8", "--max-new-tokens", "8"]  # fmt: skip
    env = {"DIRECT_ALIGN_CACHE": str(cache)}
    torchrun(*args, "--output-dir", str(tmp_path / "fsdp"), env={**FSDP_ENV, **env})
    subprocess.run([sys.executable, "-m", "direct_align", *args, "--output-dir",
                    str(tmp_path / "one")], env={**os.environ, **env}, check=True,
                   capture_output=True)  # fmt: skip
    for run, evaluations in (("fsdp", [1]), ("one", [0, 1])):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        builtin = summary["builtin"]
        assert builtin["initial/true_reward"] == builtin["reference/true_reward"]
        assert builtin["policy/kl"] != 0  # the trained policy samples otherwise
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        assert [r["step"] for r in records if "eval/policy/true_reward" in r] == evaluations


def test_whitening_with_summed_moments_equals_whitening_the_whole() -> None:
    """Two processes' halves whitened with their summed moments give the whole's whitening."""
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 2
    mask = (torch.rand(6, 5) > 0.3).float()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    moments = [masked_moments(*half) for half in halves]
    total = {k: moments[0][k] + moments[1][k] for k in moments[0]}
    split = torch.cat([masked_whiten(*half, moments=total) for half in halves])
    torch.testing.assert_close(split, masked_whiten(x, mask), atol=1e-6, rtol=1e-6)
    # one half's own statistics would whiten differently
    assert not torch.allclose(masked_whiten(*halves[0]), split[:3], atol=1e-3)
    mean, var = mean_var(total, unbiased=True)
    values = x[mask.bool()].double()
    assert (mean, var) == pytest.approx((values.mean().item(), values.var().item()))


def test_process_counts_that_do_not_share_a_rollout_equally_are_refused(tmp_path) -> None:
    cfg = resolve(PPOConfig, {"rollout_batch_size": 6, "mini_batch_size": 3})
    check_processes(cfg, 3)
    with pytest.raises(ConfigError, match="--mini-batch-size 3 must be multiples of the 2 proc"):
        check_processes(cfg, 2)
    rm = builtin_rm_config(cfg, tmp_path, 2)  # the RM stage: 32-pair steps, split
    assert (rm.batch_size, rm.grad_accum) == (16, 2)
    with pytest.raises(ConfigError, match="steps of 32 pairs do not divide among 3 processes"):
        builtin_rm_config(cfg, tmp_path, 3)
