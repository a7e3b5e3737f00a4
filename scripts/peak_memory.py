"""Measured peak memory of DPO and PPO training steps against the bytes-per-parameter arithmetic.

docs/distributed.md predicts the state a training process holds from its parameter counts: 16
bytes per trained parameter (fp32 weights 4, gradients 4, AdamW's two moments 8) and 4 per frozen
one (fp32; 2 in bf16). This script measures it. Each setup runs in a fresh subprocess on a
Llama-shaped model built from a config (random weights), in fp32 on the CPU:

- ``dpo-cached``: the policy (``PreferenceModel``, chunked log-probs) and the DPO loss against
  constant reference log-probs, as with the on-disk cache;
- ``dpo-reference``: the same plus a frozen copy computing reference log-probs every step;
- ``ppo``: ``ActorCritic(policy, critic)`` with a critic of the reward model's shape, a frozen
  reference LM and a frozen reward model (``LlamaForSequenceClassification``, one label): the
  frozen models score a random ``[B, P + R]`` rollout (no generation: it adds a KV cache, not
  state), then the clipped policy loss + value loss, backward and AdamW over policy and critic;
- ``ppo-shared``: the same with ``--critic shared`` (a value head on the policy's trunk);
- ``dpo-lora``: DPO with cached reference log-probs on LoRA adapters (r=16, all linear layers of
  the decoder) over the frozen fp32 base.

Each process imports everything and runs its setup once on a tiny model (a warm-up, so lazy
imports and allocator pools are in place), then reads its resident memory (``VmRSS`` in
/proc/self/status) as the baseline. It builds the models and runs two optimizer steps; writing
``5`` to /proc/self/clear_refs resets the high-water mark ``VmHWM`` at the start of each phase
(forward + backward, optimizer step), so the peak of each phase is read apart. Memory is ``VmHWM``
minus the baseline: the state, the activations and transients, and whatever freed memory the C
allocator keeps. ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc) maps every larger block on its own and
unmaps it when freed, so that the peaks count live tensors only.

    OMP_NUM_THREADS=2 python scripts/peak_memory.py     # 123.5M-parameter policy (docs/distributed.md)
    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=2 python scripts/peak_memory.py
    python scripts/peak_memory.py --hidden 1024 --layers 16 --setups dpo-cached,ppo
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from direct_align.data.packing import build_batch
from direct_align.data.tokenize import PairDataset
from direct_align.losses import preference_loss
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import apply_lora
from direct_align.ppo.core import (
    gae,
    kl_estimate,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from direct_align.ppo.models import ActorCritic, reference_logps, reward_scores

SETUPS = ("dpo-cached", "dpo-reference", "ppo", "ppo-shared", "dpo-lora")
DOC_BYTES = {"dpo-cached": "16", "dpo-reference": "16+4", "ppo": "16+16+4+4", "ppo-shared": "16+4+4",
             "dpo-lora": "4 + 16·adapters"}  # fmt: skip
MIB = 2**20
Setup = tuple[list[nn.Module], torch.optim.Optimizer, Callable[[], torch.Tensor]]


def status_kib(field: str) -> int:
    """``field`` (VmRSS, VmHWM) of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))  # type: ignore[union-attr]


def reset_peak() -> None:
    """Set VmHWM back to the current VmRSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def llama_config(hidden: int, layers: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False,
                       pad_token_id=0, num_labels=1)  # fmt: skip


def frozen(model: nn.Module) -> nn.Module:
    return model.requires_grad_(False).eval()


def adamw(*models: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for m in models for p in m.parameters() if p.requires_grad], lr=1e-6)


def dpo_setup(config: LlamaConfig, pairs: int, length: int, mode: str) -> Setup:
    """``mode``: cached (constant reference log-probs), reference (a frozen copy) or lora."""
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, config.vocab_size, (n,), generator=gen).tolist()  # noqa: E731
    half = length // 2
    data = PairDataset([ids(half) for _ in range(pairs)], [ids(half) for _ in range(pairs)],
                       [ids(half) for _ in range(pairs)])  # fmt: skip
    batch = build_batch(data, range(pairs), "padded", 0)  # 2·pairs rows of `length` tokens
    lm = LlamaForCausalLM(config)
    if mode == "lora":
        cfg = SimpleNamespace(lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_targets=None,
                              chunked_logprobs=True)  # fmt: skip
        lm = apply_lora(lm, cfg)
    policy = PreferenceModel(lm, chunked=True)
    models: list[nn.Module] = [policy]
    reference = None
    if mode == "reference":
        reference = PreferenceModel(frozen(LlamaForCausalLM(config)), chunked=True)
        models.append(reference)
    optimizer = adamw(policy)
    constant = torch.full((pairs,), -5.0 * half)

    def loss() -> torch.Tensor:
        ref_chosen = ref_rejected = constant
        if reference is not None:
            with torch.no_grad():
                ref = reference(batch)
            ref_chosen, ref_rejected = ref.chosen, ref.rejected
        out = policy(batch)
        return preference_loss("dpo", chosen_logps=out.chosen, rejected_logps=out.rejected,
                                  ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                                  chosen_lengths=out.chosen_lengths,
                                  rejected_lengths=out.rejected_lengths, beta=0.1)[0]  # fmt: skip

    return models, optimizer, loss


def ppo_setup(config: LlamaConfig, rows: int, length: int, shared: bool) -> Setup:
    """One rollout's scoring by the frozen models and one minibatch update, on random tokens."""
    prompt = length // 2
    ids = torch.randint(1, config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, : prompt // 2] = 0  # one left-padded prompt
    actor_critic = ActorCritic(LlamaForCausalLM(config),
                               None if shared else LlamaForSequenceClassification(config))  # fmt: skip
    reference = frozen(LlamaForCausalLM(config))
    reward_model = frozen(LlamaForSequenceClassification(config))
    optimizer = adamw(actor_critic)
    response_mask = mask[:, prompt:].float()

    def loss() -> torch.Tensor:
        with torch.no_grad():  # what the rollout records: old log-probs and values, KL, scores
            old_logps, _, old_values = actor_critic(ids, mask, prompt, 1.0)
            ref_logps = reference_logps(reference, ids, mask, prompt, 1.0)
            scores = reward_scores(reward_model, ids, mask)
            rewards = token_rewards(scores, kl_estimate(old_logps, ref_logps), response_mask, 0.05)
            advantages, returns = gae(rewards, old_values, response_mask, gamma=1.0, lam=0.95)
            advantages = masked_whiten(advantages, response_mask)
        logps, _, values = actor_critic(ids, mask, prompt, 1.0)
        pg_loss = policy_loss(logps, old_logps, advantages, response_mask, 0.2)[0]
        vf_loss = value_loss(values, old_values, returns, response_mask, 0.2)[0]
        return pg_loss + 0.1 * vf_loss

    return [actor_critic, reference, reward_model], optimizer, loss


def build(setup: str, config: LlamaConfig, pairs: int, length: int) -> Setup:
    if setup.startswith("dpo"):
        return dpo_setup(config, pairs, length, setup.removeprefix("dpo-"))
    return ppo_setup(config, 2 * pairs, length, shared=setup == "ppo-shared")


def child(opts: argparse.Namespace) -> dict[str, float]:
    """Run ``opts.child`` in this process and return its counts and memory, in MiB."""
    torch.manual_seed(0)
    for hidden, layers, vocab in ((64, 1, 256), (opts.hidden, opts.layers, opts.vocab)):
        if hidden == opts.hidden:  # after the warm-up: the baseline, and the peak from here on
            gc.collect()
            baseline = status_kib("VmRSS")
            reset_peak()
            start = time.perf_counter()
        models, optimizer, loss = build(opts.child, llama_config(hidden, layers, vocab),
                                        opts.pairs, opts.length)  # fmt: skip
        built = status_kib("VmRSS")
        peaks = {"build": status_kib("VmHWM"), "fwd+bwd": 0, "opt step": 0}
        for _ in range(opts.steps):  # each phase's own peak: VmHWM reset at its start
            reset_peak()
            loss().backward()
            peaks["fwd+bwd"] = max(peaks["fwd+bwd"], status_kib("VmHWM"))
            reset_peak()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peaks["opt step"] = max(peaks["opt step"], status_kib("VmHWM"))
        if hidden != opts.hidden:
            del models, optimizer, loss
    params = {id(p): p for m in models for p in m.parameters()}.values()
    trained = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    policy = models[0]
    policy_lm = getattr(policy, "policy", getattr(policy, "model", policy))
    rise = {k: (v - baseline) / 1024 for k, v in peaks.items()}
    return {
        "policy M": sum(p.numel() for p in policy_lm.parameters()) / 1e6,
        "trained M": trained / 1e6, "frozen M": (total - trained) / 1e6,
        "weights pred": 4 * total / MIB, "weights meas": (built - baseline) / 1024,
        "state pred": (16 * trained + 4 * (total - trained)) / MIB,
        "fwd+bwd peak": rise["fwd+bwd"], "opt peak": rise["opt step"], "peak meas": max(rise.values()),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=2, help="DPO pairs (PPO: 2× as many rollouts)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence (prompt: half)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(child(opts)))
        return

    passed = [f"--{k}={getattr(opts, k)}" for k in ("hidden", "layers", "vocab", "pairs", "length", "steps")]
    print(f"Llama shape: hidden {opts.hidden}, {opts.layers} layers, vocab {opts.vocab}, untied, fp32, CPU; "
          f"DPO {opts.pairs} pairs × {opts.length} tokens, PPO {2 * opts.pairs} rollouts × {opts.length} "
          f"tokens; {opts.steps} optimizer steps; largest parameter {4 * opts.vocab * opts.hidden / MIB:.2f} MiB; "
          "memory: VmHWM − VmRSS before the build, MiB")  # fmt: skip
    keys = ("policy M", "trained M", "frozen M", "weights pred", "weights meas", "state pred",
            "fwd+bwd peak", "opt peak", "peak meas", "meas/pred", "peak−pred", "B/policy p", "seconds")  # fmt: skip
    print(f"{'setup':14}{'doc B/param':>17}" + "".join(f"{k:>13}" for k in keys))
    for setup in opts.setups.split(","):
        run = subprocess.run([sys.executable, __file__, "--child", setup, *passed], capture_output=True,
                             text=True, check=False)  # fmt: skip
        if run.returncode != 0:
            print(f"{setup}: failed\n{run.stderr[-3000:]}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        r["meas/pred"] = r["peak meas"] / r["state pred"]
        r["peak−pred"] = r["peak meas"] - r["state pred"]
        r["B/policy p"] = r["peak meas"] * MIB / (r["policy M"] * 1e6)
        print(f"{setup:14}{DOC_BYTES[setup]:>17}" + "".join(f"{r[k]:13.2f}" for k in keys), flush=True)

if __name__ == "__main__":
    main()
