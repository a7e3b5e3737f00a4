"""Per-process peak host memory of `direct-align train` and `ppo` under FSDP, with and without
low-memory loading, against one process: the numbers of docs/distributed.md#loading-a-large-policy.

A Llama with random weights (the built-in task's tokenizer; no download), saved in fp32, trains a
few DPO steps on CPUs in fp32 (offline), one round of online DPO (``--online``), or one PPO
rollout with a separate critic (``--ppo``: policy, critic, reference and reward model, the last
three read from the same checkpoint as a sequence classifier with a fresh head):

- 1 process (no launcher);
- 2 processes under FSDP where every process reads the checkpoint (``torchrun`` with the
  variables of ``configs/accelerate/fsdp.yaml`` and ``FSDP_CPU_RAM_EFFICIENT_LOADING=false``);
- 2 processes under FSDP with low-memory loading (``accelerate launch --config_file
  configs/accelerate/fsdp.yaml``): the main process reads the checkpoint, the other builds the
  model without reading it and receives its shards.

Each process reports its resident memory before any model, its peak once the engine holds the
model (loaded and sharded, no step yet; in one process the reference pass comes before) and its
peak until ``final/`` is gathered (``memory_by_process`` in the run's ``summary.json``); the
launcher's ``os.wait4`` adds the largest peak of the whole run, the gathering of ``final/`` into
the main process included. The predicted load and state are the arithmetic of
:func:`predict_load` and :func:`predict`.

    python scripts/fsdp_loading_memory.py                 # 0.5B parameters, offline
    python scripts/fsdp_loading_memory.py --online        # the same, one round of online DPO
    python scripts/fsdp_loading_memory.py --ppo           # the same, one PPO rollout
    python scripts/fsdp_loading_memory.py --hidden 256 --layers 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from direct_align.builtin.build import BuiltinSpec, default_cache_dir, ensure_builtin
from direct_align.builtin.task import sample_prompts
from direct_align.engine.tracking import maxrss_mb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.fsdp_memory import build_model, free_port  # noqa: E402

MIB = 2**20
SETUPS = ("1 process", "2 × FSDP, every process reads", "2 × FSDP, main reads")
KEYS = ("one", "every", "main")  # --setups
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}  # fmt: skip


def launcher(setup: str) -> tuple[list[str], dict[str, str]]:
    """The command that starts `direct-align` for ``setup``, and the variables it needs."""
    if setup == "1 process":
        return [sys.executable, "-m", "direct_align"], {}
    if setup == "2 × FSDP, every process reads":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", "-m", "direct_align"], FSDP_ENV  # fmt: skip
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(free_port()),
            "-m", "direct_align"], {}  # fmt: skip


def run(setup: str, args: list[str], out: Path) -> dict:
    """Each process's memory (MiB), the whole run's peak and its wall time (``args``: the
    command and its options)."""
    command, extra = launcher(setup)
    env = {**os.environ, **extra, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    start = time.perf_counter()
    log_path = out.parent / f"{out.name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([*command, *args, "--output-dir", str(out)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log_path.read_text().splitlines()[-200:]
        sys.exit("\n".join([*tail, f"{setup}: the run failed (the log's end is above)"]))
    summary = json.loads((out / "summary.json").read_text())
    return {"processes": summary["memory_by_process"], "run_peak": maxrss_mb(usage.ru_maxrss),
            "seconds": time.perf_counter() - start}


def predict(setup: str, params: int, layer: int, trained: int, frozen: int) -> tuple[float, str]:
    """(MiB, how) of the fp32 state a process holds at its training peak, with ``trained``
    models that train (the policy; PPO's critic too) and ``frozen`` ones (online DPO's reference
    for the fresh pairs; PPO's reference and reward model), each of ``params`` parameters:

    - one process: 16 bytes per parameter of a trained model (weights, gradients, AdamW's two
      moments), 4 of a frozen one;
    - FSDP on 2 processes: its half of those, plus one decoder layer gathered whole with its
      gradient before the reduce-scatter (2 × 4 bytes per parameter of the layer).

    Loading adds, while it lasts, one fp32 copy of the weights (4 bytes per parameter) to each
    process that reads the checkpoint, next to its shards (4 / 2): 6 bytes per parameter on 2
    processes, below the training peak's 8, so there the copy shows only as memory the
    allocator keeps after freeing it. On N processes the copy is 4 against 16 / N: from 4
    processes on, a reading process peaks while loading. Activations and the allocator's slack
    come on top.
    """
    per_param = 16 * trained + 4 * frozen
    if setup == "1 process":
        return per_param * params / MIB, f"{per_param} B/param"
    return (per_param / 2 * params + 8 * layer) / MIB, f"{per_param}/2 B/param + 1 layer × 8 B"


def predict_load(reads: bool, params: int, trained: int, frozen: int) -> float:
    """MiB an FSDP process on 2 holds once its models are loaded and sharded (before any step):
    the fp32 shards of all of them (4 / 2 bytes per parameter each) and, in a process that reads
    the checkpoint, the trained models whole (4 each) while they are sharded together; the
    frozen ones are sharded one at a time before them and their whole copies freed. The
    checkpoint is memory-mapped, so weights take memory once first read (in one process that is
    during the first pass, so no prediction is made there). Where every process reads (no
    low-memory loading) FSDP shards in place, one tensor at a time, so the whole copies are an
    upper bound there."""
    return (4 * trained * params * reads + 2 * (trained + frozen) * params) / MIB


def layer_parameters(hidden: int) -> int:
    """Parameters of one decoder layer of :func:`build_model`'s Llama (no bias, full heads)."""
    inter = hidden * 8 // 3
    return 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--steps", type=int, default=2)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--online", action="store_true", help="one round of online DPO")
    kind.add_argument("--ppo", action="store_true", help="one PPO rollout, separate critic")
    parser.add_argument("--setups", nargs="+", choices=KEYS, default=list(KEYS),
                        help="which runs: one process, FSDP where every process reads, FSDP "
                        "where the main process reads")  # fmt: skip
    args = parser.parse_args()

    assets = ensure_builtin(default_cache_dir(), BuiltinSpec())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        params = build_model(tmp / "model", assets.model_dir, args.hidden, args.layers)
        layer = layer_parameters(args.hidden)
        weights_mib = 4 * params / MIB
        trained, frozen = 1, int(args.online)
        if args.ppo:
            prompts = [json.dumps({"prompt": p}) for p in sample_prompts(8, seed=0)]
            (tmp / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
            command = ["ppo", "--model", str(tmp / "model"), "--reward-model", str(tmp / "model"),
                       "--critic", "separate", "--dataset", str(tmp / "prompts.jsonl"),
                       "--rollouts", "1", "--rollout-batch-size", "4", "--mini-batch-size", "2",
                       "--max-new-tokens", "16", "--ppo-epochs", "1", "--eval-every", "0",
                       "--save-every", "0", "--report-to", "none"]  # fmt: skip
            what = "1 PPO rollout (4 prompts, 2 minibatches), separate critic"
            trained, frozen = 2, 2
        elif args.online:
            prompts = [json.dumps({"prompt": p}) for p in sample_prompts(8, seed=0)]
            (tmp / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
            task = ["--online", "--dataset", str(tmp / "prompts.jsonl"), "--reward", "builtin",
                    "--rounds", "1", "--prompts-per-round", "4", "--samples-per-prompt", "2",
                    "--max-new-tokens", "16", "--batch-size", "2", "--grad-accum", "2",
                    "--epochs", "1"]  # fmt: skip
            what = "1 round of online DPO (4 prompts × 2 samples)"
        else:
            rows = assets.train_file(0.0).read_text().splitlines()[:9]
            (tmp / "pairs.jsonl").write_text("\n".join(rows) + "\n")
            task = ["--dataset", str(tmp / "pairs.jsonl"), "--max-steps", str(args.steps),
                    "--batch-size", "2", "--grad-accum", "2"]  # fmt: skip
            what = f"{args.steps} DPO steps of 2 micro-batches of 2 pairs"
        if not args.ppo:
            command = ["train", "--loss", "dpo", "--model", str(tmp / "model"), *task,
                       "--max-length", "64", "--eval-every", "0", "--save-every", "0",
                       "--report-to", "none", "--attn", "segments"]  # fmt: skip
        print(f"Llama, hidden {args.hidden}, {args.layers} layers: {params / 1e6:.1f}M parameters "
              f"({weights_mib:,.0f} MiB in fp32; one decoder layer {layer / 1e6:.1f}M); {what}, "
              "fp32, CPU")  # fmt: skip
        print("| run | process | reads the checkpoint | start, MiB | loaded and sharded: peak − "
              "start | predicted load | training: peak − start | predicted state | measured / "
              "predicted | run's peak (wait4) | wall s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for setup in (SETUPS[KEYS.index(key)] for key in args.setups):
            cache = tmp / f"cache-{SETUPS.index(setup)}"
            result = run(setup, [*command, "--cache-dir", str(cache)],
                         tmp / f"run-{SETUPS.index(setup)}")  # fmt: skip
            for p in result["processes"]:
                start = p["rss_at_start_mb"]
                rise, loaded = p["peak_rss_mb"] - start, p["peak_when_prepared_mb"] - start
                pred, how = predict(setup, params, layer, trained, frozen)
                reads = setup != SETUPS[2] or p["process"] == 0
                load = ("—" if setup == SETUPS[0]
                        else f"{predict_load(reads, params, trained, frozen):,.0f}")  # fmt: skip
                print(f"| {setup} | {p['process']} | {'yes' if reads else 'no'} | {start:,.0f} | "
                      f"{loaded:,.0f} | {load} | {rise:,.0f} | {pred:,.0f} ({how}) | "
                      f"{rise / pred:.2f} | {result['run_peak']:,.0f} | "
                      f"{result['seconds']:.0f} |", flush=True)  # fmt: skip
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(tmp / f"run-{SETUPS.index(setup)}", ignore_errors=True)


if __name__ == "__main__":
    main()
