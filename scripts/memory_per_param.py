"""Bytes of host memory per parameter of full DPO-style training on this CPU, for each way of
holding the weights: peak resident memory above the process's start, over the parameter count.

Each configuration runs in a fresh process that imports everything, notes its resident memory
(the start: the interpreter, torch, transformers and torchao, which do not grow with the model),
builds a randomly initialised Llama at the shape of Qwen2.5-0.5B (hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings: 494M parameters) directly in
its weights' dtype, and takes two optimizer steps (make_optimizer, the engine's) on 2 sequences
of 64 random tokens. The peak (``ru_maxrss``) includes those activations; at 128 tokens they
are small beside the weights (the logits, 128 × 151,936 fp32 values, are 78 MB: 0.16 bytes a
parameter).

Usage: ``python scripts/memory_per_param.py`` (all), or ``--only NAME`` (repeatable);
``--vocab N`` changes the vocabulary (the embedding, 136M of the 494M parameters at 151,936).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

CONFIGS = {  # name: (settings, LoRA rank or None, the arithmetic in bytes a parameter)
    "fp32 + AdamW (today)": ({"weights": "fp32", "optimizer": "adamw"}, None, "4 + 4 + 8 = 16"),
    "bf16 weights (stochastic rounding)": ({"weights": "bf16", "optimizer": "adamw"}, None, "2 + 2 + 4 = 8"),
    "bf16 + 8-bit states": ({"weights": "bf16", "optimizer": "adamw-8bit"}, None, "2 + 2 + 2 = 6"),
    "bf16 + 8-bit + step in backward": ({"weights": "bf16", "optimizer": "adamw-8bit",
                                         "step_in_backward": True}, None, "2 + 2 = 4"),
    "LoRA r=16 on a bf16 base": ({"weights": "bf16", "optimizer": "adamw"}, 16,
                                 "2 (base) + adapters"),
}  # fmt: skip


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def one(name: str, vocab: int = 151_936) -> dict[str, float]:
    """Build, step twice, measure (in this process)."""
    import torch
    import torchao.optim  # noqa: F401  (imported before the start is measured)
    from transformers import LlamaConfig, LlamaForCausalLM

    from direct_align.engine.optim import trained_dtype
    from direct_align.engine.step import make_optimizer

    settings, lora, _ = CONFIGS[name]
    cfg = SimpleNamespace(**{"step_in_backward": False, "learning_rate": 1e-5, "weight_decay": 0.0,
                             "warmup_ratio": 0.0, "lr_scheduler": "constant", **settings})  # fmt: skip
    torch.manual_seed(0)
    start = rss_mb()
    config = LlamaConfig(vocab_size=vocab, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip
    torch.set_default_dtype(trained_dtype(cfg))
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules="all-linear"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    built = rss_mb()
    optimizer, scheduler = make_optimizer(model, cfg, total=2)
    tokens = torch.randint(0, config.vocab_size, (2, 64))
    started = time.perf_counter()
    for _ in range(2):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"parameters": params, "trained": trained, "start_mb": round(start, 1),
            "model_mb": round(built - start, 1), "peak_above_start_mb": round(peak - start, 1),
            "bytes_per_parameter": round((peak - start) * 2**20 / params, 2),
            "step_s": round((time.perf_counter() - started) / 2, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(CONFIGS), help="run only this one")
    parser.add_argument("--vocab", type=int, default=151_936,
                        help="vocabulary size (a smaller one shows the embedding's share)")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(one(opts.child, opts.vocab)))
        return
    print("| configuration | bytes a parameter, measured | arithmetic | peak above start, MB | "
          "parameters (trained) | seconds a step |")
    print("|---|---|---|---|---|---|")
    for name in opts.only or CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--child", name, "--vocab", str(opts.vocab)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} | | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['bytes_per_parameter']:.2f} | {CONFIGS[name][2]} | "
              f"{r['peak_above_start_mb']:.0f} | {r['parameters'] / 1e6:.0f}M ({r['trained'] / 1e6:.1f}M) "
              f"| {r['step_s']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
