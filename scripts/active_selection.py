"""Does `direct-align select` save labels? DPO on pairs chosen by the policy's uncertainty
against pairs chosen at random, at equal label budgets, on the built-in task.

For each seed: a seed set of ``--seed-pairs`` labelled pairs, drawn at random from the task's
2,000 candidate pairs, trains a first policy. Then, for each budget B, two arms each label B more
pairs (the label is the hidden reward's preference, as the task's annotator gives it) and train
DPO from the base model on the seed set plus those B pairs, with the same recipe:

- ``random``: B pairs drawn at random from the rest;
- ``uncertain``: the B pairs of the rest with the smallest |DPO implicit-reward margin| under
  the seed policy (`direct-align select --top B`);
- ``iterative`` (with ``--iterative``): the same, in two halves, the second chosen by a policy
  retrained on the seed set and the first half (margin-based selection after each labelling
  round).

Every run's true reward of samples on the held-out prompts (the task's report) is collected; the
table gives mean ± sd over the seeds.

    python scripts/active_selection.py --seeds 3 --budgets 128 256 512 --iterative
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from direct_align.builtin.build import BuiltinAssets, BuiltinSpec, default_cache_dir, ensure_builtin
from direct_align.builtin.report import hidden_reward_report
from direct_align.cli import main as cli
from direct_align.models.loading import load_causal_lm, load_tokenizer

RECIPE = ["--loss", "dpo", "--beta", "0.1", "--learning-rate", "1e-4", "--batch-size", "32",
          "--max-length", "64", "--eval-every", "0", "--save-every", "0", "--report-to", "none",
          "--eval-prompts", "128"]  # fmt: skip
EVAL_PROMPTS = 128


def run(*args: str) -> None:
    try:
        cli(list(args))
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"direct-align {' '.join(args)} failed ({e.code})") from None


def labelled(row: dict) -> dict:
    """A candidate pair labelled by the hidden reward (the task's annotator)."""
    a_wins = row["reward_a"] > row["reward_b"]
    return {"prompt": row["prompt"], "chosen": row["a"] if a_wins else row["b"],
            "rejected": row["b"] if a_wins else row["a"]}  # fmt: skip


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(out: Path, pairs: list[dict], seed: int, assets: BuiltinAssets, steps: int) -> dict:
    """DPO on ``pairs``; its summary with the task's report of the trained policy's samples
    (true reward and KL on the held-out prompts, as ``train`` prints on the built-in task)."""
    data = write(out.with_suffix(".jsonl"), pairs)
    run("train", *RECIPE, "--dataset", str(data), "--eval-dataset", str(assets.eval_file),
        "--max-steps", str(steps), "--seed", str(seed), "--output-dir", str(out))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    policy = load_causal_lm(str(out / "final"))
    report = hidden_reward_report(str(assets.model_dir), load_tokenizer(str(assets.model_dir)),
                                  assets, prompts=EVAL_PROMPTS, seed=seed)  # fmt: skip
    summary["builtin"], _ = report(policy)
    return summary


def most_uncertain(policy: Path, base: Path, pool: list[dict], n: int, work: Path) -> list[dict]:
    """The ``n`` pairs of ``pool`` with the smallest |margin| under ``policy`` (select)."""
    candidates = write(work / "pool.jsonl", [{"prompt": r["prompt"], "a": r["a"], "b": r["b"],
                                             "index": i} for i, r in enumerate(pool)])  # fmt: skip
    ranked = work / "ranked.jsonl"
    run("select", "--model", str(policy), "--ref-model", str(base), "--dataset", str(candidates),
        "--loss", "dpo", "--beta", "0.1", "--max-length", "64", "--top", str(n), "--output",
        str(ranked), "--overwrite")  # fmt: skip
    return [pool[json.loads(line)["index"]] for line in ranked.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--seed-pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every run")
    parser.add_argument("--iterative", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/active-selection"))
    opts = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    assets = ensure_builtin(default_cache_dir(), BuiltinSpec())
    candidates = [json.loads(line) for line in (assets.root / "candidates.jsonl").open()]
    base = assets.model_dir
    arms = ["random", "uncertain", *(["iterative"] if opts.iterative else [])]
    results: dict[tuple[int, str], list[float]] = {}
    started = time.time()
    for seed in range(opts.seeds):
        work = opts.out / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        order = list(range(len(candidates)))
        random.Random(seed).shuffle(order)
        seed_rows = [candidates[i] for i in order[: opts.seed_pairs]]
        pool = [candidates[i] for i in order[opts.seed_pairs :]]
        seed_set = [labelled(r) for r in seed_rows]
        first = train(work / "seed-policy", seed_set, seed, assets, opts.steps)
        print(f"seed {seed}: seed policy on {len(seed_set)} pairs: true reward "
              f"{first['builtin']['policy/true_reward']:.3f}", flush=True)  # fmt: skip
        ranked = most_uncertain(work / "seed-policy" / "final", base, pool, max(opts.budgets), work)
        for budget in opts.budgets:
            chosen = {"random": random.Random(1000 + seed).sample(pool, budget),
                      "uncertain": ranked[:budget]}  # fmt: skip
            if opts.iterative:
                half = ranked[: budget // 2]
                mid = train(work / f"mid-{budget}", seed_set + [labelled(r) for r in half], seed,
                            assets, opts.steps)  # fmt: skip
                rest = [r for r in pool if r not in half]
                chosen["iterative"] = half + most_uncertain(work / f"mid-{budget}" / "final", base,
                                                            rest, budget - budget // 2, work)  # fmt: skip
                del mid
            for arm in arms:
                summary = train(work / f"{arm}-{budget}", seed_set + [labelled(r) for r in chosen[arm]],
                                seed, assets, opts.steps)  # fmt: skip
                reward = summary["builtin"]["policy/true_reward"]
                results.setdefault((budget, arm), []).append(reward)
                print(f"seed {seed}, {budget} labels, {arm}: true reward {reward:.3f}, held-out "
                      f"accuracy {summary['final']['eval/rewards/accuracies']:.3f}", flush=True)  # fmt: skip
    print(f"\n{opts.seeds} seeds, {opts.seed_pairs} seed pairs, {opts.steps} steps a run, "
          f"{time.time() - started:.0f} s\n")
    print("| labelled pairs (beyond the seed set) | " + " | ".join(arms) + " |")
    print("|---|" + "---|" * len(arms))
    for budget in opts.budgets:
        cells = []
        for arm in arms:
            values = results[(budget, arm)]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        print(f"| {budget} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
