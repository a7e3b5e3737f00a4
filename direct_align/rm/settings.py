"""Settings of `direct-align train-rm`.

Settings that mean the same as in `direct-align train` are the same declarations (only some
defaults differ, for a reward model). Precedence, lowest first: field defaults < the built-in
task's preset (only when no ``--model`` and no ``--dataset`` are given) < ``--config FILE`` <
command-line flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from direct_align import settings as s
from direct_align.config import NON_NEGATIVE, Setting


@dataclass
class RewardConfig(s.PairDataSettings, s.BatchSettings, s.OptimSettings, s.RunSettings):
    """Resolved settings of one reward-model run (written to ``OUTPUT_DIR/config.yaml``): its
    own below, and the shared groups of :mod:`direct_align.settings`."""

    # --- objective ---------------------------------------------------------------------------
    center_rewards_coef: float = Setting(float, 0.0, "Weight c of the centering term "
                                                     "c·(r_chosen + r_rejected)² added to the loss "
                                                     "(0: off).", rule=NON_NEGATIVE).field()  # fmt: skip
    # --- model -------------------------------------------------------------------------------
    model: str | None = s.MODEL.field(help="Trunk: a HF causal LM directory or hub name; a fresh "
                                           "scalar head goes on top (default: built-in).")  # fmt: skip
    gradient_checkpointing: bool = s.GRADIENT_CHECKPOINTING.field()
    disable_dropout: bool = s.DISABLE_DROPOUT.field()
    # --- shared groups, with a reward model's defaults -----------------------------------------
    learning_rate: float = s.LEARNING_RATE.field(default=1e-5)
    seed: int = s.SEED.field(help="Seed of data order, the head's initialisation and the split.")
    output_dir: str | None = s.OUTPUT_DIR.field(help="Run directory (default: runs/rm-TIMESTAMP).")
    cache_dir: str | None = s.CACHE_DIR.field(help="Cache of the built-in task (default: "
                                                   "$DIRECT_ALIGN_CACHE or ~/.cache/direct_align).")  # fmt: skip
    # --- built-in task -----------------------------------------------------------------------
    label_noise: float = s.LABEL_NOISE.field()
    train_pairs: int = s.TRAIN_PAIRS.field()

    # The built-in task's recipe (~2M-parameter trunk); under YAML and flags.
    foreign_names: ClassVar[dict[str, str]] = s.TRL_NAMES
    builtin_preset: ClassVar[dict[str, Any]] = {
        "learning_rate": 3e-4,
        "batch_size": 32,
        "epochs": 3,
        "warmup_ratio": 0.1,
        "max_length": 64,
        "eval_every": 50,
        "save_every": 0,
    }

    def complete(self) -> None:
        s.complete_output_dir(self, "rm")

    def checks(self) -> list[tuple[bool, str]]:
        return s.run_checks(self)
