"""FLOPs of a preference-training step and the peak they are measured against (for MFU).

MFU = step FLOPs / (step time × peak); step FLOPs = 6·N·tokens + 6·hidden·vocab·scored +
12·layers·width·area, N the non-embedding parameters (the LM head counted apart), tokens those
the model computes (never padding), scored the positions the LM head computes (response tokens
when chunked, as in TRL's fused head; all tokens otherwise), width = heads·head_dim, area the
query-key pairs attended: L²/2 per causal sequence, (p+c)²/2 + r·p + r²/2 for a shared-prompt
pair (rejected rows over prompt + rejected). Peak: the best measured dense matmul (bf16 8192³ on
CUDA, fp32 2048³ on a CPU); for H100/H200 also the nominal dense bf16 989 TFLOP/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

NOMINAL_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s (SXM)


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a model."""

    layers: int
    width: int  # attention width: heads × head_dim
    hidden: int
    vocab: int
    trunk_params: int  # parameters outside the token embedding and the LM head

    @classmethod
    def of(cls, config: PretrainedConfig) -> ModelShape:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        trunk = sum(p.numel() for n, p in model.named_parameters()
                    if "embed_tokens" not in n and "lm_head" not in n)  # fmt: skip
        c = config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_hidden_layers, c.num_attention_heads * head_dim, c.hidden_size,
                   c.vocab_size, trunk)  # fmt: skip


def step_work(shape: ModelShape, lengths: list[tuple[int, int, int]], layout: str,
              chunked: bool) -> tuple[int, int, float]:  # fmt: skip
    """(tokens computed, row slots with padding, FLOPs) of one forward + backward over pairs of
    (prompt, chosen, rejected) ``lengths`` in ``layout`` (see the module docstring)."""
    tokens = responses = 0
    area = 0.0
    for p, c, r in lengths:
        responses += c + r
        if layout == "shared":
            tokens += p + c + r
            area += (p + c) ** 2 / 2 + r * p + r**2 / 2
        else:
            tokens += 2 * p + c + r
            area += ((p + c) ** 2 + (p + r) ** 2) / 2
    slots = tokens
    if layout == "padded":
        slots = 2 * len(lengths) * max(p + max(c, r) for p, c, r in lengths)
    scored = responses if chunked else tokens
    flops = (6 * shape.trunk_params * tokens + 6 * shape.hidden * shape.vocab * scored
             + 12 * shape.layers * shape.width * area)  # fmt: skip
    return tokens, slots, flops


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measured_peak(device: str) -> float:
    """Best dense matmul FLOP/s of the device: bf16 8192³ on CUDA, fp32 2048³ on a CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device == "cuda" else (2048, torch.float32, 1)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best
