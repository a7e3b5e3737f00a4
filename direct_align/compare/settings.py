"""Settings of `direct-align compare`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from direct_align import settings as s
from direct_align.compare.plan import TASKS
from direct_align.config import Setting, at_least, within

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
    model: str | None = s.MODEL.field(help="Own data: the model every method starts from (a HF "
                                           "causal LM directory or hub name; default: the "
                                           "built-in task's).")  # fmt: skip
    dataset: str | None = s.DATASET.field(help="Own data: preference pairs in any format train "
                                               "reads; split once into training pairs, held-out "
                                               "evaluation prompts and (with no gold judge) the "
                                               "gold reward model's pairs.")  # fmt: skip
    split: str = s.SPLIT.field()
    gold_reward_model: str | None = Setting(str, None, "Own data: the reward-model directory that "
                                                       "judges every run (the hidden reward's "
                                                       "place).").field()  # fmt: skip
    gold_reward: list[str] = Setting(list, None, "Own data: a judge of every run, SPEC[=WEIGHT] as "
                                                 "train --reward takes (repeatable).").field()  # fmt: skip
    gold_fraction: float = Setting(float, 0.25, "Own data with no gold judge: share of the pairs "
                                                "(after the held-out 10%) that no method sees, "
                                                "on which the gold reward model is trained.",
                                   rule=within(0, 0.9, open_lo=True)).field()  # fmt: skip
    cache_dir: str | None = s.CACHE_DIR.field(help="Cache of the built-in task.")
    only: list[str] = Setting(list, None, "Run only this method (repeatable).", METHODS).field()
    plots_only: bool = Setting(bool, False, "Redraw the plots and table of --output-dir from its "
                                            "comparison.json.").field()  # fmt: skip

    builtin_preset: ClassVar[dict[str, Any]] = {}

    def complete(self) -> None:
        if self.output_dir is None and not self.plots_only:
            self.output_dir = f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"

    def checks(self) -> list[tuple[bool, str]]:
        own = self.model is not None or self.dataset is not None
        return [(self.output_dir is not None or not self.plots_only,
                 "--plots-only needs the --output-dir of a comparison"),
                (not own or (self.model is not None and self.dataset is not None),
                 "compare on own data needs both --model and --dataset"),
                (not (own and self.task != "builtin"),
                 f"--task {self.task} is a variant of the built-in task; it takes no --model "
                 "or --dataset"),
                (own or not (self.gold_reward_model or self.gold_reward),
                 "--gold-reward-model and --gold-reward judge own data (--model, --dataset); the "
                 "built-in task is judged by its hidden reward"),
                (self.gold_reward_model is None or Path(self.gold_reward_model).expanduser().is_dir(),
                 f"--gold-reward-model '{self.gold_reward_model}': not a directory"),
                *s.tracker_checks(self)]  # fmt: skip

    def gold_judge(self) -> list[str] | None:
        """The user's gold judge specs (None: a gold reward model is trained on held-out pairs)."""
        specs = [*(self.gold_reward or []), *([self.gold_reward_model] if self.gold_reward_model else [])]
        return specs or None
