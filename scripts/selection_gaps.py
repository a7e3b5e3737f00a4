"""How far apart, by the hidden reward, are the pairs each arm of scripts/active_selection.py
labelled? Reads the training files that script left in ``--out`` and prints, per seed and arm,
the mean true-reward gap between chosen and rejected of the pairs beyond the seed set.

    python scripts/selection_gaps.py --out runs/active-selection --budget 512
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from direct_align.builtin.task import true_reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/active-selection"))
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--seed-pairs", type=int, default=64)
    opts = parser.parse_args()
    print("| seed | arm | pairs | mean gap | share with gap ≥ 0.5 |\n|---|---|---|---|---|")
    for seed_dir in sorted(opts.out.glob("seed*")):
        for data in sorted(seed_dir.glob(f"*-{opts.budget}.jsonl")):
            arm = data.stem.rsplit("-", 1)[0]
            if arm == "mid":  # the iterative arm's intermediate policy, not an arm
                continue
            rows = [json.loads(line) for line in data.open()][opts.seed_pairs :]
            gaps = [true_reward(r["chosen"]) - true_reward(r["rejected"]) for r in rows]
            wide = sum(g >= 0.5 for g in gaps) / len(gaps)
            print(f"| {seed_dir.name} | {arm} | {len(rows)} | {statistics.mean(gaps):.3f} | {wide:.3f} |")


if __name__ == "__main__":
    main()
