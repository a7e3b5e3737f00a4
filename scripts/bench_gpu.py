"""Training throughput, MFU and peak memory of direct_align's fast path, one setting off at a time.

A randomly initialised model of a real shape, built from its config (no download); random
preference pairs (prompts of 100-600 tokens, responses of 50-400 ending in EOS, by default) in
micro-batches of about ``--row-tokens`` tokens of a packed row (``Batcher``'s token budget). Each
variant runs ``--warmup`` + ``--steps`` optimizer steps in its own process (its own peak memory):
``all-on`` (the defaults: shared-prompt rows, chunked log-probs, attention auto), ``no-shared``
(packed rows), ``no-packing`` (padded rows, SDPA), ``no-chunked`` (full logits) and ``trl``
(TRL's DPOTrainer with ``precompute_ref_log_probs=True``, its fastest setting; optional).

A step: forward, DPO loss against reference sums computed beforehand (direct_align's cache, TRL's
precompute), backward, clip to norm 1, AdamW; fp32 weights under bf16 autocast on CUDA (as the
trainer and TRL's ``bf16=True`` run), fp32 on a CPU; ``--gradient-checkpointing`` for all. Timed
between ``torch.cuda.synchronize()`` calls from the copy to the device to the optimizer step (TRL:
a callback on ``on_step_begin``/``on_step_end``), collation excluded. Peak memory:
``torch.cuda.max_memory_allocated`` from the first step on (on a CPU, the process's peak RSS).

Pairs per step: the direct_align variants train on the very same micro-batches, so an ablation
differs in one setting only. TRL needs a fixed batch size: the micro-batches' mean pair count,
rounded (or ``--pairs-per-step``), over the same pairs in the same order (sequential sampler).
Counts per step can thus differ a little, so speed is compared in pairs/s.

MFU: see ``mfu.py`` (the FLOP count of a step and the peak it is measured against).

    python scripts/bench_gpu.py --shape llama-3.2-1b --row-tokens 2048 --steps 20 --json bench_gpu.json
    python scripts/bench_gpu.py --shape qwen2.5-0.5b --row-tokens 8192 --steps 20 --json bench_gpu.json
    python scripts/bench_gpu.py --shape tiny --device cpu --steps 2   # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from direct_align.data import PairDataset
from direct_align.data.batching import Batcher
from direct_align.data.packing import build_batch
from direct_align.engine.tracking import peak_memory_gb
from direct_align.errors import ConfigError
from direct_align.losses import preference_loss
from direct_align.models.loading import preference_model
from direct_align.preference.settings import TrainConfig
from direct_align.settings import uses_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mfu import NOMINAL_PEAK, ModelShape, measured_peak, step_work, sync  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "all-on": {"layout": "shared", "attn": "auto", "chunked_logprobs": True},
    "no-shared": {"layout": "packed", "attn": "auto", "chunked_logprobs": True},
    "no-packing": {"layout": "padded", "attn": "sdpa", "chunked_logprobs": True},
    "no-chunked": {"layout": "shared", "attn": "auto", "chunked_logprobs": False},
    "trl": {"layout": "padded", "chunked_logprobs": True},  # for the FLOP count: padded, fused head
}
# (config class, hidden, layers, heads, kv heads, intermediate, vocab, rope theta); all tied.
SHAPES: dict[str, tuple[type[PretrainedConfig], int, int, int, int, int, int, float]] = {
    "qwen2.5-0.5b": (Qwen2Config, 896, 24, 14, 2, 4864, 151936, 1e6),
    "llama-3.2-1b": (LlamaConfig, 2048, 16, 32, 8, 8192, 128256, 5e5),
    "tiny": (LlamaConfig, 64, 2, 4, 2, 128, 1000, 1e4),
}
PAD, BOS, EOS = 0, 1, 2  # token ids 0-2 are special; random tokens are drawn from the rest


def model_config(shape: str) -> PretrainedConfig:
    cls, hidden, layers, heads, kv_heads, intermediate, vocab, theta = SHAPES[shape]
    return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
               rope_theta=theta, max_position_embeddings=32768, tie_word_embeddings=True,
               pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)  # fmt: skip


def build_model(shape: str, device: str) -> torch.nn.Module:
    """The randomly initialised fp32 model of ``shape``, created on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.float32)


@dataclass
class Plan:
    """The pairs and what each variant trains on, step by step (warm-up steps first)."""

    data: PairDataset
    groups: list[list[int]]  # direct_align's micro-batches, one per step
    trl_batches: list[list[int]]  # TRL's fixed-size batches over the same pairs in the same order


def random_pairs(n: int, opts: argparse.Namespace, vocab: int) -> PairDataset:
    rng = random.Random(opts.seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        prompts.append(ids(rng.randint(*opts.prompt_len)))
        chosen.append([*ids(rng.randint(*opts.response_len) - 1), EOS])
        rejected.append([*ids(rng.randint(*opts.response_len) - 1), EOS])
    return PairDataset(prompts, chosen, rejected)


def make_plan(opts: argparse.Namespace, vocab: int) -> Plan:
    """Enough pairs for ``warmup + steps`` micro-batches of both direct_align and TRL."""
    needed, n = opts.warmup + opts.steps, 4 * (opts.warmup + opts.steps)
    while True:
        data = random_pairs(n, opts, vocab)
        batcher = Batcher(data, batch_size=1, seed=opts.seed, layout="packed",
                          max_tokens=opts.row_tokens)  # fmt: skip
        groups = batcher.micro_batches(0)
        used = groups[:needed]
        per_step = opts.pairs_per_step or max(1, round(sum(map(len, used)) / len(used)))
        if len(groups) >= needed and n >= needed * per_step:
            break
        n *= 2
    order = [i for g in groups for i in g]
    return Plan(data, used, [order[k * per_step : (k + 1) * per_step] for k in range(needed)])


def autocast(device: str) -> AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


def train_direct_align(variant: str, opts: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Per-step seconds and peak memory of direct_align's DPO steps in ``variant``."""
    device = opts.device
    cfg = TrainConfig(**VARIANTS[variant], gradient_checkpointing=opts.gradient_checkpointing)
    model = preference_model(build_model(opts.shape, device), cfg, bf16=uses_bf16(cfg))
    if cfg.gradient_checkpointing:
        model.model.gradient_checkpointing_enable()
    model.train()
    batches = [build_batch(plan.data, g, cfg.layout, PAD) for g in plan.groups]
    with torch.no_grad(), autocast(device):  # the reference: the initial policy, scored once
        refs = [model(b.to(device)) for b in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for batch, ref in zip(batches, refs):
        sync(device)
        start = time.perf_counter()
        batch = batch.to(device)
        with autocast(device):
            out = model(batch)
            loss, _ = preference_loss("dpo", chosen_logps=out.chosen, rejected_logps=out.rejected,
                                      ref_chosen_logps=ref.chosen, ref_rejected_logps=ref.rejected,
                                      chosen_lengths=out.chosen_lengths,
                                      rejected_lengths=out.rejected_lengths, beta=0.1)  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds[opts.warmup :], "peak_memory_gb": peak_memory_gb(torch.device(device)),
            "attention": model.model.config._attn_implementation}  # fmt: skip


def train_trl(opts: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """The same through TRL's DPOTrainer, timed by a callback."""
    try:
        import datasets
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        return {"skipped": f"trl row skipped: cannot import trl ({e})"}
    device, vocab = opts.device, model_config(opts.shape).vocab_size
    # A word-level tokenizer whose word "w<i>" is token i, so TRL tokenizes text back to our ids.
    words = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")  # fmt: skip
    order, d = [i for batch in plan.trl_batches for i in batch], plan.data
    rows = {"prompt": [" ".join(f"w{t}" for t in d.prompt_ids[i]) for i in order]}
    for part in ("chosen", "rejected"):  # without the final EOS, which TRL appends
        rows[part] = [
            " " + " ".join(f"w{t}" for t in getattr(d, f"{part}_ids")[i][:-1]) for i in order
        ]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            if state.global_step > opts.warmup:
                self.seconds.append(time.perf_counter() - self.start)

    timer = StepTimer()
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-gpu-trl-"), seed=opts.seed,
                     per_device_train_batch_size=len(plan.trl_batches[0]),
                     max_steps=len(plan.trl_batches), learning_rate=1e-6, beta=0.1,
                     max_length=None, precompute_ref_log_probs=True,
                     gradient_checkpointing=opts.gradient_checkpointing, bf16=device == "cuda",
                     use_cpu=device == "cpu", train_sampling_strategy="sequential",
                     report_to="none", save_strategy="no", logging_steps=10**6,
                     disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    trainer = DPOTrainer(model=build_model(opts.shape, device), args=args,
                         train_dataset=datasets.Dataset.from_dict(rows), processing_class=tokenizer,
                         callbacks=[timer])  # fmt: skip
    seen = trainer.train_dataset
    for part in ("prompt", "chosen", "rejected"):
        if list(seen[f"{part}_ids"]) != [getattr(d, f"{part}_ids")[i] for i in order]:
            raise RuntimeError(f"TRL's {part} token ids differ from direct_align's")
    if device == "cuda":  # the precompute pass is over
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"seconds": timer.seconds, "peak_memory_gb": peak_memory_gb(torch.device(device)),
            "attention": trainer.model.config._attn_implementation}  # fmt: skip


def run_child(variant: str) -> dict[str, Any]:
    """Run ``variant`` in a fresh process; its result, or the error it ended with."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", variant, "--result", str(result)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not result.exists():
            return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
        return json.loads(result.read_text())


def measure(variant: str, r: dict[str, Any], plan: Plan, shape: ModelShape, warmup: int) -> None:
    """Add pairs/s, tokens/s, padding share and FLOP/s over the timed steps to ``r``."""
    steps = (plan.trl_batches if variant == "trl" else plan.groups)[warmup:]
    layout, chunked = VARIANTS[variant]["layout"], VARIANTS[variant]["chunked_logprobs"]
    d = plan.data
    work = [step_work(shape, [(len(d.prompt_ids[i]), len(d.chosen_ids[i]), len(d.rejected_ids[i]))
                              for i in s], layout, chunked) for s in steps]  # fmt: skip
    tokens, slots, flops = (sum(w) for w in zip(*work))
    seconds = sum(r["seconds"])
    r |= {"pairs_per_s": sum(map(len, steps)) / seconds, "tokens_per_s": tokens / seconds,
          "padding": 1 - tokens / slots, "flops_per_s": flops / seconds}  # fmt: skip


def print_table(results: dict[str, dict[str, Any]], peak: float, nominal: float | None) -> None:
    print("| variant | attention | pairs/s | tokens/s | padding | MFU | MFU of nominal | "
          "peak memory (GiB) | speed vs trl | memory vs trl |\n" + "|---" * 10 + "|")  # fmt: skip
    base = results.get("trl", {})
    for variant, r in results.items():
        if "seconds" not in r:
            print(f"| {variant} | {'OOM' if r.get('oom') else 'failed: ' + r['error']} |")
            continue
        r["mfu"] = r["flops_per_s"] / peak
        r["mfu_nominal"] = r["flops_per_s"] / nominal if nominal else None
        vs = "– | –"
        if "seconds" in base:
            vs = (f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}× | "
                  f"{r['peak_memory_gb'] / base['peak_memory_gb']:.2f}×")  # fmt: skip
        mfu_nominal = "–" if nominal is None else f"{r['mfu_nominal']:.1%}"
        print(f"| {variant} | {r['attention']} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['padding']:.0%} | {r['mfu']:.1%} | {mfu_nominal} | {r['peak_memory_gb']:.2f} | "
              f"{vs} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cuda", "cpu"])  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument(
        "--row-tokens", type=int, default=2048, help="packed tokens per micro-batch"
    )
    parser.add_argument("--pairs-per-step", type=int, help="TRL's batch size (default: the mean)")
    parser.add_argument(
        "--prompt-len", type=int, nargs=2, default=[100, 600], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--response-len", type=int, nargs=2, default=[50, 400], metavar=("MIN", "MAX")
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write settings and results here")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if min(opts.response_len) < 2 or min(opts.prompt_len) < 1 or opts.steps < 1:
        parser.error("need prompts of 1+ tokens, responses of 2+ (one is EOS) and 1+ steps")
    config = model_config(opts.shape)
    try:
        plan = make_plan(opts, config.vocab_size)
    except ConfigError as e:  # a pair larger than --row-tokens
        parser.error(f"--row-tokens {opts.row_tokens}: {e}")
    if opts.child:
        try:
            result = (train_trl(opts, plan) if opts.child == "trl"
                      else train_direct_align(opts.child, opts, plan))  # fmt: skip
        except torch.OutOfMemoryError:
            result = {"oom": True}
        opts.result.write_text(json.dumps(result))
        return

    shape = ModelShape.of(config)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\ntorch {torch.__version__}; "
          f"random {opts.shape}: {shape.trunk_params / 1e6:.1f}M non-embedding parameters, vocab "
          f"{shape.vocab}; {opts.steps} timed steps after {opts.warmup}; pairs per step: "
          f"{sum(map(len, plan.groups)) / len(plan.groups):.2f} (rows of up to {opts.row_tokens} "
          f"packed tokens), TRL {len(plan.trl_batches[0])}; gradient checkpointing "
          f"{opts.gradient_checkpointing}", flush=True)  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for variant in opts.variants:
        r = run_child(variant)
        if "skipped" in r:
            print(r["skipped"], flush=True)
            continue
        if "seconds" in r:
            measure(variant, r, plan, shape, opts.warmup)
        results[variant] = r
        print(f"  {variant}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in r.items() if k != "seconds"), flush=True)  # fmt: skip

    name = (
        torch.cuda.get_device_name() if opts.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    peak = measured_peak(opts.device)
    nominal = next((v for k, v in NOMINAL_PEAK.items() if k in name), None)
    print(
        f"\ndevice: {name}; measured dense matmul peak {peak / 1e12:.3f} TFLOP/s"
        + (f"; nominal {nominal / 1e12:.0f} TFLOP/s" if nominal else "")
        + "\n"
    )
    print_table(results, peak, nominal)
    if opts.json:
        opts.json.write_text(json.dumps({
            "command": sys.argv, "device": name, "torch": torch.__version__, "settings": vars(opts),
            "non_embedding_params": shape.trunk_params, "peak_flops": peak,
            "nominal_peak_flops": nominal, "results": results}, indent=2, default=str))  # fmt: skip
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
