"""Every setting of `direct-align train-rm` in one dataclass; CLI overrides and validation.

Settings that mean the same as in `direct-align train` are that command's fields, with the same
name, type, help and choices (only some defaults differ, for a reward model). Precedence, lowest
first: field defaults < the built-in task's preset (only when no ``--model`` and no ``--dataset``
are given) < command-line flags.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from direct_align.config import FIELDS, _base_type, coerce
from direct_align.errors import ConfigError

_KEEP = object()


def _same(name: str, default: Any = _KEEP, help: str | None = None) -> Any:
    """The field ``name`` of :class:`~direct_align.config.TrainConfig`, optionally with another
    default or help text."""
    shared = FIELDS[name]
    metadata = {"help": help or shared.metadata["help"], "choices": shared.metadata["choices"]}
    return field(default=shared.default if default is _KEEP else default, metadata=metadata)


def _own(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help, "choices": None})


@dataclass
class RewardConfig:
    """Resolved settings of one reward-model run (written to ``OUTPUT_DIR/config.yaml``)."""

    # --- objective ---------------------------------------------------------------------------
    center_rewards_coef: float = _own(0.0, "Weight c of the centering term c·(r_chosen + "
                                           "r_rejected)² added to the loss (0: off).")  # fmt: skip
    # --- model -------------------------------------------------------------------------------
    model: str | None = _same("model", help="Trunk: a HF causal LM directory or hub name; a "
                                            "fresh scalar head goes on top (default: built-in).")  # fmt: skip
    gradient_checkpointing: bool = _same("gradient_checkpointing")
    # --- data --------------------------------------------------------------------------------
    dataset: str | None = _same("dataset")
    eval_dataset: str | None = _same("eval_dataset")
    split: str = _same("split")
    eval_split: str | None = _same("eval_split")
    format: str = _same("format")
    eval_fraction: float = _same("eval_fraction")
    max_length: int = _same("max_length")
    max_prompt_length: int | None = _same("max_prompt_length")
    # --- optimisation ------------------------------------------------------------------------
    epochs: int = _same("epochs")
    max_steps: int | None = _same("max_steps")
    batch_size: int = _same("batch_size")
    eval_batch_size: int | None = _same("eval_batch_size")
    grad_accum: int = _same("grad_accum")
    learning_rate: float = _same("learning_rate", 1e-5)
    weight_decay: float = _same("weight_decay")
    warmup_ratio: float = _same("warmup_ratio")
    lr_scheduler: str = _same("lr_scheduler")
    max_grad_norm: float = _same("max_grad_norm")
    precision: str = _same("precision")
    seed: int = _same("seed", help="Seed of data order, the head's initialisation and the split.")
    # --- run ---------------------------------------------------------------------------------
    output_dir: str | None = _same("output_dir", help="Run directory (default: runs/rm-TIMESTAMP).")
    overwrite: bool = _same("overwrite")
    eval_every: int = _same("eval_every")
    log_every: int = _same("log_every")
    report_to: str = _same("report_to")
    wandb_project: str = _same("wandb_project")
    run_name: str | None = _same("run_name")
    cache_dir: str | None = _same("cache_dir", help="Cache of the built-in task (default: "
                                                    "$DIRECT_ALIGN_CACHE or ~/.cache/direct_align).")  # fmt: skip
    # --- built-in task -----------------------------------------------------------------------
    label_noise: float = _same("label_noise")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RM_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RewardConfig)}
OWN_TYPES: dict[str, type] = {"center_rewards_coef": float}  # fields not shared with `train`

# The built-in task's recipe (~2M-parameter trunk); applied under command-line values.
BUILTIN_PRESET: dict[str, Any] = {
    "learning_rate": 3e-4,
    "batch_size": 32,
    "epochs": 3,
    "warmup_ratio": 0.1,
    "max_length": 64,
    "eval_every": 50,
}


def base_type(name: str) -> type:
    """The type of field ``name`` without ``| None`` (what a flag's value is parsed to)."""
    return OWN_TYPES.get(name) or _base_type(name)


def coerce_value(name: str, value: Any, where: str) -> Any:
    """Convert ``value`` to the type of field ``name``, as :func:`direct_align.config.coerce`."""
    if name not in OWN_TYPES:
        return coerce(name, value, where)
    tp = OWN_TYPES[name]
    try:
        if isinstance(value, bool):
            raise ValueError
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{name}' must be {tp.__name__}, got {value!r}") from None


def resolve_rm(cli: dict[str, Any]) -> RewardConfig:
    """Merge defaults, the built-in preset and CLI values (None: not given), then validate."""
    explicit = {k: coerce_value(k, v, "--" + k.replace("_", "-"))
                for k, v in cli.items() if v is not None}  # fmt: skip
    builtin = explicit.get("model") is None and explicit.get("dataset") is None
    cfg = RewardConfig(**{**(BUILTIN_PRESET if builtin else {}), **explicit})
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / f"rm-{time.strftime('%Y%m%d-%H%M%S')}")
    validate_rm(cfg)
    return cfg


def validate_rm(cfg: RewardConfig) -> None:
    """Reject impossible settings before any work is done (messages as `train` words them)."""
    checks: list[tuple[bool, str]] = [
        (cfg.center_rewards_coef >= 0, "--center-rewards-coef must be ≥ 0"),
        (cfg.max_length >= 2, f"--max-length must be at least 2, got {cfg.max_length}"),
        (cfg.max_prompt_length is None or cfg.max_prompt_length >= 1,
         "--max-prompt-length must be at least 1"),
        (cfg.batch_size >= 1, "--batch-size must be at least 1"),
        (cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, "--eval-batch-size must be ≥ 1"),
        (cfg.grad_accum >= 1, "--grad-accum must be at least 1"),
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be at least 1"),
        (cfg.learning_rate > 0, "--learning-rate must be > 0"),
        (cfg.weight_decay >= 0, "--weight-decay must be ≥ 0"),
        (0 <= cfg.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
        (cfg.max_grad_norm >= 0, "--max-grad-norm must be ≥ 0"),
        (0 < cfg.eval_fraction < 1, "--eval-fraction must be in (0, 1)"),
        (cfg.eval_every >= 0, "--eval-every must be ≥ 0"),
        (cfg.log_every >= 1, "--log-every must be at least 1"),
        (0 <= cfg.label_noise < 0.5, "--label-noise must be in [0, 0.5)"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def save_yaml(cfg: RewardConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
