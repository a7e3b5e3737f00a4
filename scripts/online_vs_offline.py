"""Online versus offline DPO on the built-in task, at an equal number of judge calls.

A *judge call* is one response scored by the judge (here the task's hidden reward). Offline DPO
trains on N pairs of the built-in data, a random subset (seeded) of its 2,000 pairs: 2N judge
calls (the build also scored and dropped pairs whose two samples tied; those calls are not
counted, which favours offline). Online DPO trains for R rounds of P prompts with k samples
each: R·P·k judge calls. Both start from the built-in base model, use the built-in recipe
(learning rate 1e-4, batch 32, max length 64) and are scored alike: the mean hidden reward of one
sample per held-out prompt (128 prompts, temperature 1, 40 new tokens), as `direct-align train`
reports it. Every run is a real CLI run in its own process.

    python scripts/online_vs_offline.py                  # budget 1024, seeds 1 2 3
    python scripts/online_vs_offline.py --budget 256 --rounds 8 --samples-per-prompt 4 \
        --online-epochs 8 --offline-epochs 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from direct_align.builtin.build import BuiltinAssets, BuiltinSpec, default_cache_dir, ensure_builtin
from direct_align.builtin.report import hidden_reward_report
from direct_align.models.loading import load_causal_lm, load_tokenizer

RECIPE = ["--learning-rate", "1e-4", "--batch-size", "32", "--max-length", "64",
          "--eval-every", "0", "--save-every", "0", "--report-to", "none"]  # fmt: skip


def cli(args: list[str], out: Path) -> tuple[dict, float]:
    """One `direct-align train` run; returns its summary and wall time."""
    cmd = [sys.executable, "-m", "direct_align", "train", *args, "--output-dir", str(out)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {shlex.join(cmd)}\n{result.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - start


def held_out_reward(final: Path, assets: BuiltinAssets, prompts: int, seed: int) -> dict[str, float]:
    """What `direct-align train` reports for the built-in task, for any saved policy."""
    base = str(assets.model_dir)
    report = hidden_reward_report(load_causal_lm(base), load_tokenizer(base), assets,
                                  prompts=prompts, seed=seed)  # fmt: skip
    return report(load_causal_lm(str(final)))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=1024, help="judge calls per run")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--online-epochs", type=int, nargs="+", default=[8, 16],
                        help="passes over each round's pairs, one run each")
    parser.add_argument("--offline-epochs", type=int, nargs="+", default=[4, 8],
                        help="passes over the pairs, one run each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    opts = parser.parse_args()
    k, rounds = opts.samples_per_prompt, opts.rounds
    per_round = opts.budget // (rounds * k)
    if per_round * rounds * k != opts.budget or opts.budget % 2:
        sys.exit("--budget must be even and a multiple of --rounds × --samples-per-prompt")

    assets = ensure_builtin(default_cache_dir(), BuiltinSpec())
    all_pairs = assets.train_file(0.0).read_text().splitlines()
    runs = {f"offline, {e} epochs": ["--epochs", str(e)] for e in opts.offline_epochs}
    for e in opts.online_epochs:
        runs[f"online, {rounds} rounds × {per_round} prompts × k={k}, {e} epochs a round"] = [
            "--online", "--rounds", str(rounds), "--prompts-per-round", str(per_round),
            "--samples-per-prompt", str(k), "--epochs", str(e)]  # fmt: skip
    rows: dict[str, list[dict]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in opts.seeds:
            subset = Path(tmp) / f"pairs-{seed}.jsonl"
            chosen = random.Random(seed).sample(all_pairs, opts.budget // 2)
            subset.write_text("\n".join(chosen) + "\n")
            for i, (name, extra) in enumerate(runs.items()):
                out = Path(tmp) / f"run-{seed}-{i}"
                args = ["--loss", "dpo", "--seed", str(seed), *RECIPE, *extra]
                if "--online" not in extra:
                    args += ["--model", str(assets.model_dir), "--dataset", str(subset),
                             "--eval-dataset", str(assets.eval_file)]  # fmt: skip
                summary, wall = cli(args, out)
                calls = summary.get("judge_calls", 2 * summary["train_pairs"])
                report = summary.get("builtin") or held_out_reward(out / "final", assets, 128, seed)  # fmt: skip
                row = {"seed": seed, "judge_calls": calls, "steps": summary["steps"],
                       "reward": report["policy/true_reward"], "kl": report["policy/kl"],
                       "reference": report["reference/true_reward"], "wall_s": round(wall, 1)}  # fmt: skip
                rows[name].append(row)
                print(f"{name} seed {seed}: {row}", flush=True)

    print(f"\nbuilt-in task, {opts.budget} judge calls per run, seeds {opts.seeds}, "
          f"{os.cpu_count()} CPU cores\n")
    print("| run | judge calls | optimizer steps | true reward (mean ± sd) | per seed | KL, nats |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        rewards = [r["reward"] for r in rs]
        sd = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
        print(f"| {name} | {rs[0]['judge_calls']} | {rs[0]['steps']} | "
              f"{statistics.mean(rewards):.3f} ± {sd:.3f} | "
              f"{' '.join(f'{x:.3f}' for x in rewards)} | "
              f"{statistics.mean(r['kl'] for r in rs):.2f} |")
    first = rows[next(iter(rows))]
    print(f"\nreference (the base model): {statistics.mean(r['reference'] for r in first):.3f}")
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
