"""Where one direct_align training step spends its time, on the benchmark's model and data.

Builds (or reuses) the setting of ``scripts/bench_vs_trl.py``, takes the first micro-batch of
the epoch (``--batch-size`` pairs), runs one warm-up step and then ``--steps`` profiled DPO
steps (policy forward, loss against fixed reference sums, backward, AdamW). Prints:

- the share of the step in each phase (trunk forward, LM-head forward, loss, backward and
  the parts of it that are attention and the LM head, optimizer), from torch.profiler;
- the operators with the largest self CPU time;
- the matmul FLOPs of the step against this machine's measured fp32 matmul throughput.

    python scripts/profile_step.py                      # direct_align's defaults
    python scripts/profile_step.py --layout padded --no-chunked-logprobs   # the plain path
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import build  # noqa: E402

from direct_align.data import prepare_pairs  # noqa: E402
from direct_align.data.batching import Batcher  # noqa: E402
from direct_align.data.packing import TokenBatch, build_batch  # noqa: E402
from direct_align.losses import preference_loss  # noqa: E402
from direct_align.models.loading import (  # noqa: E402
    load_causal_lm,
    load_tokenizer,
    preference_model,  # noqa: E402
)
from direct_align.models.logprobs import SequenceLogps  # noqa: E402
from direct_align.preference.settings import TrainConfig  # noqa: E402

# Profiler event names (prefixes) that make up each part of the backward pass.
ATTENTION_BACKWARD = ("ScaledDotProduct", "SdpaBackward", "SegmentAttention")
HEAD_BACKWARD = "ChunkedLogProbsBackward"


def machine_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an [n, n] @ [n, n] matmul on this machine (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_matmul_flops(model: torch.nn.Module, batch: TokenBatch, chunked: bool) -> float:
    """Forward + backward matmul FLOPs of the step: 6 × (non-embedding params) × tokens for the
    trunk, plus 6 × hidden × vocab × (scored positions, or every position without chunking);
    attention score FLOPs are left out (small at these lengths)."""
    lm = model.model
    params = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n and "lm_head" not in n)
    head = lm.get_output_embeddings().weight
    scored = batch.pred_index.numel() if chunked else batch.input_ids.numel()
    return 6 * params * batch.input_ids.numel() + 6 * head.numel() * scored


def one_step(model: torch.nn.Module, batch: TokenBatch, ref: SequenceLogps, opt: torch.optim.Optimizer,
             chunked: bool) -> None:  # fmt: skip
    with record_function("phase: forward"):
        out = model(batch)
    with record_function("phase: loss"):
        loss, _ = preference_loss("dpo", chosen_logps=out.chosen, rejected_logps=out.rejected,
                                  ref_chosen_logps=ref.chosen, ref_rejected_logps=ref.rejected,
                                  chosen_lengths=out.chosen_lengths,
                                  rejected_lengths=out.rejected_lengths, beta=0.1)  # fmt: skip
    with record_function("phase: backward"):
        loss.backward()
    with record_function("phase: optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "da-bench")
    parser.add_argument("--pairs", type=int, default=64, help="benchmark data size (if built here)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up)")
    parser.add_argument("--layout", default="shared", choices=["shared", "packed", "padded"])
    parser.add_argument("--attn", default="auto", choices=["auto", "segments", "sdpa", "eager"])
    parser.add_argument("--no-chunked-logprobs", dest="chunked", action="store_false")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--top", type=int, default=12, help="operators to list")
    opts = parser.parse_args()

    torch.manual_seed(0)
    build(opts.work, opts.pairs, seed=0)
    cfg = TrainConfig(layout=opts.layout, attn=opts.attn, chunked_logprobs=opts.chunked)
    tokenizer = load_tokenizer(str(opts.work / "model"))
    data = prepare_pairs(str(opts.work / "train.jsonl"), tokenizer, max_length=512).pairs
    model = preference_model(load_causal_lm(str(opts.work / "model")), cfg, bf16=False)
    if opts.gradient_checkpointing:
        model.model.gradient_checkpointing_enable()
    model.train()
    index = Batcher(data, batch_size=opts.batch_size, seed=0, layout=opts.layout).micro_batches(0)[0]
    batch = build_batch(data, index, opts.layout, tokenizer.pad_token_id)
    with torch.no_grad():
        ref = model(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-7)
    one_step(model, batch, ref, opt, opts.chunked)  # warm-up: allocator, optimizer state

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(opts.steps):
            one_step(model, batch, ref, opt, opts.chunked)
        wall = (time.perf_counter() - start) / opts.steps
    events = prof.key_averages()

    def total_ms(match) -> float:  # type: ignore[no-untyped-def]
        return sum(e.cpu_time_total for e in events if match(e.key)) / 1e3 / opts.steps

    tokens = batch.input_ids.numel()
    print(f"layout {opts.layout}, attention {model.attention}, chunked log-probs {opts.chunked}, "
          f"gradient checkpointing {opts.gradient_checkpointing}; {batch.num_pairs} pairs, "
          f"{tokens} tokens in rows of {tuple(batch.input_ids.shape)}, "
          f"{batch.pred_index.numel()} scored; {torch.get_num_threads()} threads")  # fmt: skip
    print(f"step: {wall:.2f} s (mean of {opts.steps}, profiler on)\n")
    phases = [
        ("forward (all)", total_ms(lambda k: k == "phase: forward")),
        ("  of which the LM head", total_ms(lambda k: k == "direct_align: lm_head")),
        ("loss", total_ms(lambda k: k == "phase: loss")),
        ("backward (all)", total_ms(lambda k: k == "phase: backward")),
        ("  of which attention", total_ms(lambda k: "evaluate_function" in k
                                          and any(a in k for a in ATTENTION_BACKWARD))),
        ("  of which the LM head", total_ms(lambda k: "evaluate_function" in k
                                            and HEAD_BACKWARD in k)),
        ("optimizer", total_ms(lambda k: k == "phase: optimizer")),
    ]  # fmt: skip
    step_ms = wall * 1e3
    print("| phase | ms per step | share of step |")
    print("|---|---|---|")
    for name, ms in phases:
        if ms > 0 or not name.startswith("  "):
            print(f"| {name} | {ms:.0f} | {ms / step_ms:.0%} |")
    print(f"\ntop {opts.top} operators by self CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=opts.top, max_name_column_width=60))
    flops = step_matmul_flops(model, batch, opts.chunked)
    peak = machine_matmul_gflops()
    print(f"matmul work: {flops / 1e9:.1f} GFLOP per step → {flops / wall / 1e9:.1f} GFLOP/s achieved; "
          f"this machine's fp32 matmul: {peak:.1f} GFLOP/s ({flops / wall / 1e9 / peak:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
