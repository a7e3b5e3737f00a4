"""direct_align against TRL's DPOTrainer: same model, data and hyperparameters, one epoch.

Builds (once, in --work) a randomly initialised Llama with a 32k vocabulary and a word-level
tokenizer, and preference pairs of random words with prompts of 100-300 tokens and responses
of 30-200. Then, for each repeat, runs every variant in its own process, in alternating order:

- ``direct_align``: ``direct-align train`` with its defaults (shared-prompt padding-free rows,
  chunked log-probs, reference log-probs computed once into a fresh cache);
- ``direct_align-ckpt``: the same with ``--gradient-checkpointing``, which TRL turns on by
  default, for a like-for-like memory comparison;
- ``trl``: TRL's DPOTrainer with its defaults (reference model forward at every step);
- ``trl-precompute``: the same with ``precompute_ref_log_probs=True``.

All run in fp32 (TRL's default bf16 autocast is switched off so that every run computes the
same numbers on a CPU); everything else TRL does is its default, gradient checkpointing
included. Reported per run: train samples/s and tokens/s (the training loop only, as each tool
times it), end-to-end samples/s (process start to exit: loading, reference pass, training,
saving), and the peak resident memory of the whole process. Tokens are those of the data:
prompt + chosen + prompt + rejected per pair, the same count for every tool.

    python scripts/bench_vs_trl.py --repeats 3 --json bench.json

Needs TRL (``pip install 'direct-align[bench]'``); TRL is never a runtime dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("direct_align", "direct_align-ckpt", "trl", "trl-precompute")
OURS = ("direct_align", "direct_align-ckpt")
VOCAB = 32_000


def build(work: Path, n_pairs: int, seed: int) -> dict:
    """Model, tokenizer and data in ``work`` (reused when present)."""
    meta_path = work / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    work.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")  # fmt: skip
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=1024,
                         num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=6,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    import torch

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")

    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, VOCAB - 3)}" for _ in range(n))

    tokens = 0
    with (work / "train.jsonl").open("w") as f:
        for _ in range(n_pairs):
            p, c, r = rng.randint(100, 300), rng.randint(30, 200), rng.randint(30, 200)
            f.write(json.dumps({"prompt": words(p), "chosen": " " + words(c),
                                "rejected": " " + words(r)}) + "\n")  # fmt: skip
            tokens += 2 * p + c + r
    with (work / "eval.jsonl").open("w") as f:  # direct_align evaluates; keep it small
        for _ in range(4):
            f.write(json.dumps({"prompt": words(120), "chosen": " " + words(40),
                                "rejected": " " + words(40)}) + "\n")  # fmt: skip
    meta = {"pairs": n_pairs, "tokens": tokens, "params": model.num_parameters()}
    meta_path.write_text(json.dumps(meta))
    return meta


def run_variant(variant: str, work: Path, opts: argparse.Namespace) -> dict:
    """One run in a fresh process; wall time and peak RSS from the OS."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    if variant in OURS:
        cmd = [sys.executable, "-m", "direct_align", "train", "--loss", "dpo",
               "--model", str(work / "model"), "--dataset", str(work / "train.jsonl"),
               "--eval-dataset", str(work / "eval.jsonl"), "--output-dir", str(out / "run"),
               "--cache-dir", str(out / "cache"), "--batch-size", str(opts.batch_size),
               "--epochs", "1", "--max-length", "512", "--learning-rate", "5e-7", "--beta", "0.1",
               "--lr-scheduler", "linear", "--warmup-ratio", "0", "--precision", "fp32",
               "--eval-every", "0", "--save-every", "0", "--seed", "0", *opts.extra]  # fmt: skip
        if variant == "direct_align-ckpt":
            cmd.append("--gradient-checkpointing")
    else:
        cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--out",
               str(out), "--batch-size", str(opts.batch_size)]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{variant} failed:\n{stderr[-3000:]}")
    if variant in OURS:
        summary = json.loads((out / "run" / "summary.json").read_text())
        train_s = summary["train_runtime_s"]
    else:
        train_s = json.loads(stdout.strip().splitlines()[-1])["train_runtime"]
    return {"variant": variant, "wall_s": wall, "train_s": train_s,
            "peak_rss_mb": usage.ru_maxrss / 1024}  # fmt: skip


def child_trl(variant: str, work: Path, out: Path, batch_size: int) -> None:
    """TRL's DPOTrainer with its defaults but for the settings the benchmark fixes."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    data = datasets.load_dataset("json", data_files=str(work / "train.jsonl"), split="train")
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=5e-7,
                     beta=0.1, max_length=512, precompute_ref_log_probs=variant == "trl-precompute",
                     bf16=False, use_cpu=True, report_to="none", save_strategy="no", seed=0,
                     disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    print(json.dumps({"train_runtime": result.metrics["train_runtime"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "da-bench")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="extra flags for direct-align train (last on the line)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=VARIANTS[2:], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        return child_trl(opts.child, opts.work, opts.out, opts.batch_size)

    meta = build(opts.work, opts.pairs, seed=0)
    print(f"model: random Llama, {meta['params'] / 1e6:.1f}M parameters, vocab {VOCAB}; "
          f"{meta['pairs']} pairs, {meta['tokens']} tokens; {opts.batch_size} pairs per step, "
          f"1 epoch; {os.cpu_count()} CPU cores", flush=True)  # fmt: skip
    runs = []
    for rep in range(opts.repeats):
        order = opts.variants if rep % 2 == 0 else opts.variants[::-1]
        for variant in order:
            r = run_variant(variant, opts.work, opts)
            r["repeat"] = rep
            runs.append(r)
            print(f"  repeat {rep} {variant:15s} wall {r['wall_s']:6.1f} s  train "
                  f"{r['train_s']:6.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)

    rows = {}
    for variant in opts.variants:
        mine = [r for r in runs if r["variant"] == variant]
        train_s = statistics.median(r["train_s"] for r in mine)
        wall_s = statistics.median(r["wall_s"] for r in mine)
        rows[variant] = {"train_samples_per_s": meta["pairs"] / train_s,
                         "train_tokens_per_s": meta["tokens"] / train_s,
                         "end_to_end_samples_per_s": meta["pairs"] / wall_s,
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine)}  # fmt: skip
    print(f"\nmedians of {opts.repeats} repeats\n")
    print("| variant | train samples/s | train tokens/s | end-to-end samples/s | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for variant, row in rows.items():
        print(f"| {variant} | {row['train_samples_per_s']:.3f} | {row['train_tokens_per_s']:.0f} | "
              f"{row['end_to_end_samples_per_s']:.3f} | {row['peak_rss_mb']:.0f} |")
    for ours in (v for v in OURS if v in rows):
        print(f"\n| {ours} versus | train samples/s | end-to-end samples/s | peak RSS |")
        print("|---|---|---|---|")
        for variant, row in rows.items():
            if variant not in OURS:
                mine = rows[ours]
                print(f"| {variant} | {mine['train_samples_per_s'] / row['train_samples_per_s']:.2f}× | "
                      f"{mine['end_to_end_samples_per_s'] / row['end_to_end_samples_per_s']:.2f}× | "
                      f"{mine['peak_rss_mb'] / row['peak_rss_mb']:.2f}× |")
    if opts.json:
        opts.json.write_text(json.dumps({"meta": meta, "runs": runs, "medians": rows}, indent=2))


if __name__ == "__main__":
    main()
