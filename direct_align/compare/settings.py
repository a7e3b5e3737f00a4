"""Settings of `direct-align compare`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from direct_align import settings as s
from direct_align.compare.plan import TASKS
from direct_align.config import Setting, at_least

METHODS = ("dpo", "ipo", "orpo", "simpo", "kto", "robust", "cdpo", "ppo", "rloo", "online-dpo",
           "online-rpo", "online-rebel", "online-sppo", "online-lipo", "online-kto")


@dataclass
class CompareConfig(s.TrackerSettings):
    """Settings of one comparison (every run's own settings are in its command line)."""

    quick: bool = Setting(bool, False, "One strength per method and short runs (2.5 minutes; "
                                       "what the tests run). Stages are forked from a warm "
                                       "process and share one reference cache, so its times are "
                                       "a first look.").field()  # fmt: skip
    output_dir: str | None = s.OUTPUT_DIR.field(help="Where the table, plots and every run go "
                                                     "(default: runs/compare-TIMESTAMP).")  # fmt: skip
    overwrite: bool = s.OVERWRITE.field()
    seed: int = s.SEED.field(help="Seed of every run (the first seed, with --seeds).")
    seeds: int = Setting(int, 1, "Repeat every run over this many seeds (--seed, --seed + 1, "
                                 "...): tables give mean ± std.", rule=at_least(1)).field()  # fmt: skip
    task: str = Setting(str, "builtin", "builtin: the reward model is learnt from all 2,000 "
                                        "pairs; proxy: from a small noisy subset, which the "
                                        "offline losses learn from too, and every run is also "
                                        "scored by that reward model.", TASKS).field()  # fmt: skip
    cache_dir: str | None = s.CACHE_DIR.field(help="Cache of the built-in task.")
    only: list[str] = Setting(list, None, "Run only this method (repeatable).", METHODS).field()
    plots_only: bool = Setting(bool, False, "Redraw the plots and table of --output-dir from its "
                                            "comparison.json.").field()  # fmt: skip

    builtin_preset: ClassVar[dict[str, Any]] = {}

    def complete(self) -> None:
        if self.output_dir is None and not self.plots_only:
            self.output_dir = f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.output_dir is not None or not self.plots_only,
                 "--plots-only needs the --output-dir of a comparison"),
                *s.tracker_checks(self)]  # fmt: skip
