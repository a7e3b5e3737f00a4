"""Memory that LoRA saves in preference training, counted from the tensors a step holds.

A Llama-shaped model is built from a config (random weights: the counts do not depend on them).
For full fine-tuning and for LoRA (``direct_align.models.lora.apply_lora``, all linear layers of
the decoder), one optimizer step on a random batch, then the bytes held in:

- weights (every parameter, frozen or not);
- gradients (trainable parameters only);
- AdamW state (``exp_avg`` and ``exp_avg_sq`` of each trained parameter);
- the reference an *online* loss needs each round: a second copy of the weights for full
  fine-tuning, none with LoRA (the policy with its adapters disabled).

Offline losses need no reference in memory either way (reference log-probs are cached).
Activations are left out: they depend on the batch, not on LoRA.

    python scripts/lora_memory.py                      # 0.24B parameters, r=16 (docs/lora.md)
    python scripts/lora_memory.py --hidden 2048 --layers 24 --rank 8
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from direct_align.models.lora import apply_lora

MIB = 2**20


def build(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def step_memory(model: torch.nn.Module, vocab: int) -> dict[str, float]:
    """MiB of weights, gradients and AdamW state after one optimizer step on a [2, 64] batch."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {
        "parameters (M)": sum(p.numel() for p in model.parameters()) / 1e6,
        "trained (M)": sum(p.numel() for p in trainable) / 1e6,
        "weights": nbytes(model.parameters()) / MIB,
        "gradients": nbytes(p.grad for p in trainable if p.grad is not None) / MIB,
        "AdamW state": nbytes(t for s in optimizer.state.values() for t in s.values()
                              if torch.is_tensor(t) and t.dim() > 0) / MIB,  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    opts = parser.parse_args()

    full = step_memory(build(opts.hidden, opts.layers, opts.vocab), opts.vocab)
    full["online reference copy"] = full["weights"]
    lora_cfg = SimpleNamespace(lora_r=opts.rank, lora_alpha=2 * opts.rank, lora_dropout=0.0,
                               lora_targets=None, chunked_logprobs=True)  # fmt: skip
    lora = step_memory(apply_lora(build(opts.hidden, opts.layers, opts.vocab), lora_cfg), opts.vocab)
    lora["online reference copy"] = 0.0
    for row in (full, lora):
        row["total (online)"] = sum(v for k, v in row.items() if "(M)" not in k)
        row["total (offline)"] = row["total (online)"] - row["online reference copy"]

    print(f"Llama shape: hidden {opts.hidden}, {opts.layers} layers, vocab {opts.vocab}, fp32; "
          f"LoRA r={opts.rank} on all linear layers of the decoder")  # fmt: skip
    print(f"{'':26}{'full':>12}{'LoRA':>12}")
    for key in full:
        unit = "" if "(M)" in key else " MiB"
        print(f"{key + unit:26}{full[key]:12.1f}{lora[key]:12.1f}")


if __name__ == "__main__":
    main()
