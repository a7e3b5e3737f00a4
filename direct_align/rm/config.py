"""Every setting of `direct-align train-rm` in one dataclass; CLI overrides and validation.

Settings that mean the same as in `direct-align train` are that command's fields, with the same
name, type, help and choices (only some defaults differ, for a reward model). Precedence, lowest
first: field defaults < the built-in task's preset (only when no ``--model`` and no ``--dataset``
are given) < command-line flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from direct_align.settings import Fields, check_all, own, same, shared_checks


@dataclass
class RewardConfig:
    """Resolved settings of one reward-model run (written to ``OUTPUT_DIR/config.yaml``)."""

    # --- objective ---------------------------------------------------------------------------
    center_rewards_coef: float = own(0.0, "Weight c of the centering term c·(r_chosen + "
                                           "r_rejected)² added to the loss (0: off).")  # fmt: skip
    # --- model -------------------------------------------------------------------------------
    model: str | None = same("model", help="Trunk: a HF causal LM directory or hub name; a "
                                            "fresh scalar head goes on top (default: built-in).")  # fmt: skip
    gradient_checkpointing: bool = same("gradient_checkpointing")
    # --- data --------------------------------------------------------------------------------
    dataset: str | None = same("dataset")
    eval_dataset: str | None = same("eval_dataset")
    split: str = same("split")
    eval_split: str | None = same("eval_split")
    format: str = same("format")
    eval_fraction: float = same("eval_fraction")
    max_length: int = same("max_length")
    max_prompt_length: int | None = same("max_prompt_length")
    # --- optimisation ------------------------------------------------------------------------
    epochs: int = same("epochs")
    max_steps: int | None = same("max_steps")
    batch_size: int = same("batch_size")
    eval_batch_size: int | None = same("eval_batch_size")
    grad_accum: int = same("grad_accum")
    learning_rate: float = same("learning_rate", 1e-5)
    weight_decay: float = same("weight_decay")
    warmup_ratio: float = same("warmup_ratio")
    lr_scheduler: str = same("lr_scheduler")
    max_grad_norm: float = same("max_grad_norm")
    precision: str = same("precision")
    seed: int = same("seed", help="Seed of data order, the head's initialisation and the split.")
    # --- run ---------------------------------------------------------------------------------
    output_dir: str | None = same("output_dir", help="Run directory (default: runs/rm-TIMESTAMP).")
    overwrite: bool = same("overwrite")
    eval_every: int = same("eval_every")
    log_every: int = same("log_every")
    report_to: str = same("report_to")
    wandb_project: str = same("wandb_project")
    run_name: str | None = same("run_name")
    cache_dir: str | None = same("cache_dir", help="Cache of the built-in task (default: "
                                                    "$DIRECT_ALIGN_CACHE or ~/.cache/direct_align).")  # fmt: skip
    # --- built-in task -----------------------------------------------------------------------
    label_noise: float = same("label_noise")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = Fields(RewardConfig, {"center_rewards_coef": float})  # own fields and their types

# The built-in task's recipe (~2M-parameter trunk); applied under command-line values.
BUILTIN_PRESET: dict[str, Any] = {
    "learning_rate": 3e-4,
    "batch_size": 32,
    "epochs": 3,
    "warmup_ratio": 0.1,
    "max_length": 64,
    "eval_every": 50,
}


def resolve_rm(cli: dict[str, Any]) -> RewardConfig:
    """Merge defaults, the built-in preset and CLI values (None: not given), then validate."""
    cfg = FIELDS.resolve(cli, BUILTIN_PRESET, "rm")
    validate_rm(cfg)
    return cfg


def validate_rm(cfg: RewardConfig) -> None:
    """Reject impossible settings before any work is done (messages as `train` words them)."""
    check_all([(cfg.center_rewards_coef >= 0, "--center-rewards-coef must be ≥ 0"),
               *shared_checks(cfg)])
