"""Per-GPU training state of DPO (reference log-probs cached) and PPO for 7B, 13B and 70B
policies, sharded with FSDP or DeepSpeed ZeRO-3 over GPUs of 80 GB: the arithmetic table of
docs/distributed.md. Arithmetic only: nothing here is measured.

Bytes per parameter, bf16 compute with fp32 master weights:

- a trained model: 16 under FSDP2 as direct_align runs it (fp32 sharded weights 4, fp32 gradients
  4, AdamW's moments 8; the bf16 copies exist for one gathered unit at a time) and 16 under
  ZeRO-3 (bf16 weights 2, fp32 master 4, moments 8, bf16 gradients 2);
- a frozen model in bf16: 2 (sharded too, as direct_align's FSDP runs shard it);
- DPO holds the policy: 16; PPO holds the policy, a critic as large (16 + 16), the reference and
  the reward model (2 + 2): 36.

Both engines divide the state evenly, so the tables are the same for both; what differs (the
transient gathered units, communication buffers, activations, the rollouts' KV cache) is left to
the headroom: a GPU is counted as full at 80 − 16 = 64 GB of state.

    python scripts/sharded_memory_arithmetic.py
"""

from __future__ import annotations

GB = 1e9
GPU_GB, HEADROOM_GB, PER_NODE = 80, 16, 8
SIZES = {"7B": 7e9, "13B": 13e9, "70B": 70e9}  # nominal parameter counts
METHODS = {"DPO (cached reference)": 16, "PPO (policy, critic, reference, reward model)": 36}


def gpu_counts() -> list[int]:
    """1, 2, 4, then whole nodes of 8."""
    return [1, 2, 4] + [PER_NODE * n for n in range(1, 65)]


def smallest(state_gb: float) -> int:
    """The fewest GPUs over which ``state_gb`` of evenly sharded state fits the budget."""
    return next(n for n in gpu_counts() if state_gb / n <= GPU_GB - HEADROOM_GB)


def main() -> None:
    print(f"State per GPU, GB (FSDP2 and ZeRO-3 alike); budget {GPU_GB - HEADROOM_GB} GB of "
          f"state per {GPU_GB} GB GPU")  # fmt: skip
    print("| policy | method | B/param | whole state, GB | per GPU on 8 GPUs | per GPU on 16 | "
          "smallest GPU count | per GPU there |")
    print("|---|---|---|---|---|---|---|---|")
    for size, params in SIZES.items():
        for method, per_param in METHODS.items():
            state = per_param * params / GB
            n = smallest(state)
            print(f"| {size} | {method} | {per_param} | {state:,.0f} | {state / 8:,.1f} | "
                  f"{state / 16:,.1f} | {n} | {state / n:,.1f} |")  # fmt: skip
    print("\nHost memory of one node while loading, GB (fp32 copies, 4 B/param, per reading "
          "process; PPO's main process holds policy and critic whole while they are sharded "
          "together, its frozen models one at a time before them)")  # fmt: skip
    print("| policy | DPO, every process reads (8 per node) | DPO, main process reads (fsdp.yaml) "
          "| PPO, main process reads (fsdp.yaml) |")
    print("|---|---|---|---|")
    for size, params in SIZES.items():
        print(f"| {size} | {8 * 4 * params / GB:,.0f} | {4 * params / GB:,.0f} | "
              f"{8 * params / GB:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
