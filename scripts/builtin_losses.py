"""Run `direct-align train` on the built-in task for each loss and print what each reached.

Every row is one real CLI run in its own process; the numbers come from its summary.json.

    python scripts/builtin_losses.py                      # all losses, clean labels
    python scripts/builtin_losses.py --fresh-cache        # also time a first run (task build)
    python scripts/builtin_losses.py --label-noise 0.2 --runs dpo "dpo --label-smoothing 0.2" \
        "robust --label-smoothing 0.2"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RUNS = ["dpo", "ipo", "hinge", "robust --label-smoothing 0.1", "orpo", "simpo"]


def train(args: list[str], out: Path, env: dict[str, str]) -> tuple[dict, float]:
    """One CLI run; returns its summary and wall time (process start to exit)."""
    cmd = [sys.executable, "-m", "direct_align", "train", *args, "--output-dir", str(out)]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed: {shlex.join(cmd)}\n{result.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                        help="loss name followed by extra flags, one quoted string per run")
    parser.add_argument("--label-noise", type=float, default=0.0)
    parser.add_argument("--fresh-cache", action="store_true",
                        help="time a first run in an empty cache (base model and data built)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    opts = parser.parse_args()

    env = dict(os.environ)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if opts.fresh_cache:
            env["DIRECT_ALIGN_CACHE"] = str(Path(tmp) / "cache")
            _, first = train(["--loss", "dpo"], Path(tmp) / "first", env)
            _, second = train(["--loss", "dpo"], Path(tmp) / "second", env)
            print(f"default `direct-align train --loss dpo`: first run {first:.0f} s "
                  f"(builds the base model and data), later run {second:.0f} s")
        for i, run in enumerate(opts.runs):
            loss, *extra = shlex.split(run)
            args = ["--loss", loss, "--label-noise", str(opts.label_noise), *extra]
            summary, wall = train(args, Path(tmp) / f"run{i}", env)
            b, final = summary["builtin"], summary["final"]
            rows.append({"run": run, "beta": summary["beta"], "wall_s": round(wall, 1),
                         "reference_reward": b["reference/true_reward"],
                         "policy_reward": b["policy/true_reward"], "kl": b["policy/kl"],
                         "accuracy": final["eval/rewards/accuracies"]})  # fmt: skip

    print(f"\nbuilt-in task, label noise {opts.label_noise}, {os.cpu_count()} CPU cores\n")
    print("| run | β | true reward: reference → policy | KL(policy‖ref), nats "
          "| held-out accuracy | wall time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['run']}` | {r['beta']} | {r['reference_reward']:.3f} → "
              f"{r['policy_reward']:.3f} | {r['kl']:.2f} | {r['accuracy']:.3f} | "
              f"{r['wall_s']:.0f} s |")
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
