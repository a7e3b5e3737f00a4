"""Peak memory of one process of `direct-align train`: alone, one of 2 under DDP, one of 2 under FSDP.

A Llama-shaped model with random weights (the built-in task's tokenizer, so its pairs can be
used; no download) trains a few DPO steps on 64 of the built-in task's pairs, in fp32 on CPUs:

- 1 process (no launcher);
- 2 processes, DDP (``torchrun``, gloo);
- 2 processes, FSDP (``accelerate launch --config_file configs/accelerate/fsdp.yaml``).

Each run's peak is ``ru_maxrss`` from ``os.wait4`` on the launcher: the largest resident set of
the launcher and its worker processes, so the peak of the biggest process. From it the process's
resident memory before any model (``rss_at_start_mb`` of the run's summary) is subtracted. The
prediction counts the training state of docs/distributed.md: 16 bytes per parameter (fp32 weights,
gradients, AdamW's two moments), DDP's gradient buckets (4 more: DDP keeps a flat copy of the
gradients to all-reduce), and FSDP's share of the 16 (16 / processes).

    python scripts/fsdp_memory.py                      # 151M parameters (docs/distributed.md)
    python scripts/fsdp_memory.py --hidden 512 --layers 4 --steps 1    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from direct_align.builtin.build import BuiltinSpec, default_cache_dir, ensure_builtin

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def build_model(directory: Path, tokenizer_dir: Path, hidden: int, layers: int) -> int:
    """A random Llama (untied embeddings) with the built-in tokenizer saved in ``directory``;
    returns its parameter count."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(setup: str) -> list[str]:
    """The command that starts `direct-align` for ``setup``."""
    if setup == "1 process":
        return [sys.executable, "-m", "direct_align"]
    if setup == "2 processes, DDP":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", "-m", "direct_align"]  # fmt: skip
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(free_port()),
            "-m", "direct_align"]  # fmt: skip


def run(setup: str, train_args: list[str], out: Path) -> dict[str, float]:
    """Peak and start memory (MiB) and wall time of one run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    start = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as log:
        proc = subprocess.Popen([*launcher(setup), "train", *train_args, "--output-dir", str(out)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (out.parent / f"{out.name}.log").read_text().splitlines()[-200:]
        sys.exit("\n".join([*tail, f"{setup}: the run failed (the log's end is above)"]))
    summary = json.loads((out / "summary.json").read_text())
    return {"peak": usage.ru_maxrss / 2**10, "start": summary["rss_at_start_mb"],
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=64)
    args = parser.parse_args()

    assets = ensure_builtin(default_cache_dir(), BuiltinSpec())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        params = build_model(tmp / "model", assets.model_dir, args.hidden, args.layers)
        rows = assets.train_file(0.0).read_text().splitlines()[: args.pairs]
        (tmp / "pairs.jsonl").write_text("\n".join(rows) + "\n")
        print(f"Llama, hidden {args.hidden}, {args.layers} layers: {params / 1e6:.1f}M parameters; "
              f"{args.steps} DPO steps of 2 micro-batches of 2 pairs, fp32, CPU")  # fmt: skip
        predicted = {"1 process": 16, "2 processes, DDP": 16 + 4, "2 processes, FSDP": 16 / 2}
        print("| run | predicted state, B/param | predicted MiB | peak − start, MiB | "
              "measured B/param | measured / predicted | wall s |")
        print("|---|---|---|---|---|---|---|")
        for setup, per_param in predicted.items():
            cache = tmp / f"cache-{len(os.listdir(tmp))}"
            train_args = ["--loss", "dpo", "--model", str(tmp / "model"), "--dataset",
                          str(tmp / "pairs.jsonl"), "--max-steps", str(args.steps),
                          "--batch-size", "2", "--grad-accum", "2", "--max-length", "128",
                          "--eval-every", "0", "--save-every", "0", "--cache-dir", str(cache),
                          "--report-to", "none"]  # fmt: skip
            result = run(setup, train_args, tmp / setup.replace(" ", "_").replace(",", ""))
            rise = result["peak"] - result["start"]
            pred = per_param * params / MIB
            print(f"| {setup} | {per_param:g} | {pred:,.1f} | {rise:,.1f} | "
                  f"{rise * MIB / params:.2f} | {rise / pred:.2f} | {result['seconds']:.0f} |",
                  flush=True)  # fmt: skip
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
