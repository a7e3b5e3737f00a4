"""DPO, IPO, ORPO and SimPO against the PPO pipeline on the built-in task: `direct-align compare`.

Prints the table of docs/comparison.md and writes comparison.json and the plots:

    python scripts/compare_ppo.py --seeds 3 --output-dir runs/compare   # an hour on 2 cores
    python scripts/compare_ppo.py --task proxy --seeds 3 --output-dir runs/proxy
    python scripts/compare_ppo.py --quick --output-dir runs/compare-quick
"""

from __future__ import annotations

import sys

from direct_align.cli import main

if __name__ == "__main__":
    main(["compare", *sys.argv[1:]])
