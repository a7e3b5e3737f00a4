"""Does holding the weights in less memory cost quality? The built-in task's DPO run (its preset,
126 steps) with each way of holding the weights, over seeds: the hidden reward and KL of the
trained policy's samples (what `direct-align train` prints), as mean ± std.

Usage: ``python scripts/weights_quality.py [--seeds 42 43 44]``; each run is a plain
`direct-align train --loss dpo --seed S ...` (printed), run one at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "fp32 + AdamW": [],
    "bf16 (stochastic rounding)": ["--weights", "bf16"],
    "bf16-nearest (plain bf16 AdamW)": ["--weights", "bf16-nearest"],
    "bf16 + 8-bit states": ["--weights", "bf16", "--optimizer", "adamw-8bit"],
    "fp32 + 8-bit states": ["--optimizer", "adamw-8bit"],
    "bf16 + 8-bit + step in backward (no clipping)": ["--weights", "bf16", "--optimizer", "adamw-8bit",
                                                      "--step-in-backward", "--max-grad-norm", "0"],
    "fp32 + AdamW, no clipping": ["--max-grad-norm", "0"],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--only", action="append", choices=list(CONFIGS))
    opts = parser.parse_args()
    print("| weights | true reward | KL, nats | wall time, s | seeds |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, name in enumerate(opts.only or CONFIGS):
            rewards, kls, times = [], [], []
            for seed in opts.seeds:
                out = Path(tmp) / f"{k}-{seed}"
                cmd = [sys.executable, "-m", "direct_align", "train", "--loss", "dpo", "--seed", str(seed),
                       "--report-to", "none", "--output-dir", str(out), *CONFIGS[name]]  # fmt: skip
                print(f"<!-- direct-align {' '.join(cmd[3:])} -->", file=sys.stderr, flush=True)
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{name}, seed {seed} failed: {done.stderr.strip().splitlines()[-1]}")
                times.append(time.perf_counter() - start)
                report = json.loads((out / "summary.json").read_text())["builtin"]
                rewards.append(report["policy/true_reward"])
                kls.append(report["policy/kl"])

            def pm(xs: list[float], digits: int) -> str:
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                return f"{statistics.fmean(xs):.{digits}f} ± {sd:.{digits}f}"

            print(f"| {name} | {pm(rewards, 3)} | {pm(kls, 2)} | {statistics.fmean(times):.0f} | "
                  f"{len(opts.seeds)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
