"""Online DPO variants against the same reward model on the built-in task: which reach PPO?

For each seed one reward model is trained (`direct-align train-rm`, as `compare` does), then
every variant runs `direct-align train --online --reward <rm>` with the comparison's budget
(10 rounds of 64 prompts × 4 samples unless the variant says otherwise) and its own flags, each
in its own process, evaluated along training. Prints one row per variant: final true reward
and KL, and the true reward on its upper frontier at 1.5 and 3 nats (mean ± std over seeds),
with its wall time (the reward model excluded: it is the same for every variant).

    python scripts/online_candidates.py --out runs/online-candidates --seeds 3
    python scripts/online_candidates.py --out runs/oc --only baseline --only rpo   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from direct_align.builtin.build import BuiltinSpec, default_cache_dir, ensure_builtin
from direct_align.compare.execute import run_cache, run_stage
from direct_align.compare.frontier import MATCHED_KL, mean_std, reward_at_kl, run_points
from direct_align.compare.plan import Stage
from direct_align.compare.run import run_curve

BASE = ("--loss", "dpo", "--beta", "0.1", "--online", "--rounds", "10", "--prompts-per-round",
        "64", "--samples-per-prompt", "4", "--epochs", "4", "--eval-every", "16",
        "--eval-prompts", "128")  # fmt: skip
VARIANTS: dict[str, str] = {  # every variant is at the same judge calls (2,560)
    "baseline": "",
    "beta0.3": "--beta 0.3",
    "k8-rounds5": "--samples-per-prompt 8 --rounds 5",
    "r20x32": "--rounds 20 --prompts-per-round 32",
    "all-pairs": "--pair-margin 0.1",
    "lr3e-4": "--learning-rate 3e-4",
    "ipo": "--loss ipo --beta 0.5",
    "simpo": "--loss simpo --beta 2",
    "refresh": "--refresh-reference",
    "refresh-b0.3": "--refresh-reference --beta 0.3",
    "rpo": "--rpo-alpha 1.0",
    "rpo-b0.3": "--rpo-alpha 1.0 --beta 0.3",
    "rpo-b1": "--rpo-alpha 1.0 --beta 1.0",
    "rpo2-b0.3": "--rpo-alpha 2.0 --beta 0.3",
    "refresh-rpo": "--refresh-reference --rpo-alpha 1.0",
    "rpo-r20x32": "--rounds 20 --prompts-per-round 32 --rpo-alpha 1.0",
    "rpo-b0.3-k8": "--rpo-alpha 1.0 --beta 0.3 --samples-per-prompt 8 --rounds 5",
    "rpo-b0.3-lr2e-4": "--rpo-alpha 1.0 --beta 0.3 --learning-rate 2e-4",
    # every sample's reward: group losses, online KTO, and the RLOO baseline
    "rebel-b0.05": "--loss rebel --beta 0.05",
    "rebel-b0.05-eta0.3": "--loss rebel --beta 0.05 --eta 0.3",
    "rebel-b0.02": "--loss rebel --beta 0.02",
    "lipo-b0.1": "--loss lipo --beta 0.1",
    "lipo-b0.3": "--loss lipo --beta 0.3",
    "sppo-eta1": "--loss sppo --eta 1",
    "sppo-eta3": "--loss sppo --eta 3",
    "kto-b0.1": "--loss kto --beta 0.1",
    "kto-b0.3": "--loss kto --beta 0.3",
    "rloo-b0.05": "--loss rloo --beta 0.05",
    "rloo-b0.02": "--loss rloo --beta 0.02",
    "rloo-b0.1": "--loss rloo --beta 0.1",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/online-candidates"))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra variant, e.g. 'hot=--temperature 1.2'")  # fmt: skip
    opts = parser.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not opts.only or k in opts.only}
    variants |= dict(v.split("=", 1) for v in opts.variant)
    cache_root = Path(os.environ.get("DIRECT_ALIGN_CACHE") or default_cache_dir())
    ensure_builtin(cache_root, BuiltinSpec())
    rows = []
    for seed in range(opts.seed, opts.seed + opts.seeds):
        where = opts.out / f"seed-{seed}"
        (where / "runs").mkdir(parents=True, exist_ok=True)
        rm_dir = where / "runs" / "reward_model"
        if not (rm_dir / "final").is_dir():
            run_stage(Stage("reward_model", "train-rm", ("--seed", str(seed))), rm_dir,
                      run_cache(where / "cache", "reward_model", cache_root / "builtin"))  # fmt: skip
        for name, flags in variants.items():
            out = where / "runs" / name
            if not (out / "summary.json").is_file():
                args = (*BASE, "--seed", str(seed), *shlex.split(flags), "--reward",
                        str(rm_dir / "final"))  # fmt: skip
                result = run_stage(Stage("online", "train", args), out,
                                   run_cache(where / "cache", name, cache_root / "builtin"))  # fmt: skip
                wall = result.wall_s
            else:  # finished in an earlier invocation
                wall = json.loads((out / "summary.json").read_text())["runtime_s"]
            builtin = json.loads((out / "summary.json").read_text())["builtin"]
            rows.append({"variant": name, "seed": seed, "true_reward": builtin["policy/true_reward"],
                         "kl": builtin["policy/kl"], "wall_s": wall,
                         "curve": run_curve(str(out), builtin)})  # fmt: skip
            print(f"seed {seed} {name}: true reward {rows[-1]['true_reward']:.3f}, "
                  f"KL {rows[-1]['kl']:.2f}, {wall:.0f} s", flush=True)
    (opts.out / "candidates.json").write_text(json.dumps(rows, indent=1))
    budgets = " | ".join(f"at KL {k:g}" for k in MATCHED_KL)
    print(f"\n| variant | flags | final true reward | final KL | {budgets} | wall, s |")
    print("|---|---|---|---|" + "---|" * len(MATCHED_KL) + "---|")
    for name, flags in variants.items():
        mine = [r for r in rows if r["variant"] == name]
        cells = [mean_std([r[k] for r in mine]) for k in ("true_reward", "kl")]
        cells += [mean_std([reward_at_kl(run_points(r), k) for r in mine]) for k in MATCHED_KL]
        wall = mean_std([r["wall_s"] for r in mine])
        text = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells)
        print(f"| {name} | `{flags or '(comparison default)'}` | {text} | {wall[0]:.0f} |")


if __name__ == "__main__":
    main()
