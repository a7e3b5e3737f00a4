"""Bytes of host memory per parameter of full DPO-style training on this CPU, for each way of
holding the weights: peak resident memory above the process's start, over the parameter count.

Each configuration runs in a fresh process that imports everything, notes its resident memory
(the start: the interpreter, torch, transformers and torchao, which do not grow with the model),
builds a randomly initialised Llama at the shape of Qwen2.5-0.5B (hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings: 494M parameters) directly in
its weights' dtype (QLoRA: loads it, saved in bf16 by another process, in 4 bits), and takes two
optimizer steps (make_optimizer, the engine's) on 2 sequences of 64 random tokens. The measured
peak is that of training: the peak resident memory (VmHWM) is reset once the model is in memory,
so pages of a checkpoint file that loading read are not counted (loading's own peak is reported
beside it). It includes the activations; at 128 tokens they are small beside the weights (the
logits, 128 × 151,936 fp32 values, are 78 MB: 0.16 bytes a parameter).

Usage: ``python scripts/memory_per_param.py`` (all), or ``--only NAME`` (repeatable);
``--vocab N`` changes the vocabulary (the embedding, 136M of the 494M parameters at 151,936).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
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
    "QLoRA r=16 (NF4 base, double quantisation)": ({"weights": "fp32", "optimizer": "adamw",
                                                    "load_in_4bit": True}, 16,
                                                   "0.52 (linear layers) + 2 (embedding) + adapters"),
}  # fmt: skip


def hwm_mb() -> float:
    """The process's peak resident memory so far (VmHWM), MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_hwm() -> None:
    """Reset the peak to the current resident memory (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb() -> float:
    """The process's resident memory now, MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def shape(vocab: int) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip


def save_bf16(path: str, vocab: int) -> None:
    """The model saved in bf16 (for QLoRA, which loads a directory), in a process of its own so
    that building it does not count in the measured one."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    LlamaForCausalLM(shape(vocab)).save_pretrained(path)


def one(name: str, vocab: int = 151_936, saved: str | None = None) -> dict[str, float]:
    """Build (or with QLoRA load from ``saved``), step twice, measure (in this process)."""
    import torch
    import torchao.optim  # noqa: F401  (imported before the start is measured)
    from transformers import LlamaForCausalLM

    from direct_align.engine.optim import trained_dtype
    from direct_align.engine.step import make_optimizer

    settings, lora, _ = CONFIGS[name]
    cfg = SimpleNamespace(**{"step_in_backward": False, "learning_rate": 1e-5, "weight_decay": 0.0,
                             "warmup_ratio": 0.0, "lr_scheduler": "constant", **settings})  # fmt: skip
    torch.manual_seed(0)
    config = shape(vocab)
    if settings.get("load_in_4bit"):
        import bitsandbytes  # noqa: F401  (imported before the start, as torchao is)
        import peft  # noqa: F401

        from direct_align.models.loading import load_4bit

        start = rss_mb()
        model = load_4bit(saved, device=torch.device("cpu"), compute_dtype=torch.bfloat16)
    else:
        start = rss_mb()
        torch.set_default_dtype(trained_dtype(cfg))
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    # a 4-bit weight counts its two values in one byte: count the model's, not the bytes'
    params = sum(config.vocab_size * config.hidden_size if n.endswith("embed_tokens.weight") else 0
                 for n, _ in model.named_parameters()) + _linear_and_norm_parameters(config)  # fmt: skip
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules="all-linear"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    built = rss_mb()
    loading_peak = hwm_mb()
    reset_hwm()  # from here, the peak of training alone (a file's pages read in loading excluded)
    optimizer, scheduler = make_optimizer(model, cfg, total=2)
    tokens = torch.randint(0, config.vocab_size, (2, 64))
    started = time.perf_counter()
    for _ in range(2):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    peak = hwm_mb()
    return {"parameters": params, "trained": trained, "start_mb": round(start, 1),
            "model_mb": round(built - start, 1), "peak_above_start_mb": round(peak - start, 1),
            "loading_peak_above_start_mb": round(loading_peak - start, 1),
            "bytes_per_parameter": round((peak - start) * 2**20 / params, 2),
            "step_s": round((time.perf_counter() - started) / 2, 1)}  # fmt: skip


def _linear_and_norm_parameters(config: object) -> int:
    """The parameters of a Llama's layers and final norm (everything but the embedding)."""
    h, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + h * m * 3 + 2 * h
    return layers * per_layer + h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(CONFIGS), help="run only this one")
    parser.add_argument("--vocab", type=int, default=151_936,
                        help="vocabulary size (a smaller one shows the embedding's share)")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--saved", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.save:
        save_bf16(opts.save, opts.vocab)
        return
    if opts.child:
        print(json.dumps(one(opts.child, opts.vocab, opts.saved)))
        return
    saved = tempfile.mkdtemp(prefix="memory-per-param-")
    if any(CONFIGS[n][0].get("load_in_4bit") for n in opts.only or CONFIGS):
        subprocess.run([sys.executable, __file__, "--save", saved, "--vocab", str(opts.vocab)], check=True)
    print("| configuration | bytes a parameter, measured | arithmetic | peak above start, MB | "
          "loading's peak above start, MB | parameters (trained) | seconds a step |")
    print("|---|---|---|---|---|---|---|")
    for name in opts.only or CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--child", name, "--vocab", str(opts.vocab),
                               "--saved", saved], capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} | | | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['bytes_per_parameter']:.2f} | {CONFIGS[name][2]} | "
              f"{r['peak_above_start_mb']:.0f} | {r['loading_peak_above_start_mb']:.0f} | "
              f"{r['parameters'] / 1e6:.0f}M ({r['trained'] / 1e6:.1f}M) "
              f"| {r['step_s']} |", flush=True)  # fmt: skip
    shutil.rmtree(saved, ignore_errors=True)


if __name__ == "__main__":
    main()
