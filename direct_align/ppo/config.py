"""Every setting of `direct-align ppo` in one dataclass; CLI overrides and validation.

Settings shared with `direct-align train` keep that command's name, help and choices (see
:mod:`direct_align.settings`). Precedence, lowest first: field defaults < the built-in task's
preset (only when no ``--model`` and no ``--dataset`` are given) < command-line flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from direct_align.errors import ConfigError
from direct_align.ppo.core import KL_ESTIMATORS
from direct_align.settings import Fields, check_all, own, same, shared_checks

CRITICS = ("separate", "shared")


@dataclass
class PPOConfig:
    """Resolved settings of one PPO run (written to ``OUTPUT_DIR/config.yaml``)."""

    # --- models ------------------------------------------------------------------------------
    model: str | None = same("model", help="Initial policy (the SFT model): a HF causal LM "
                                           "directory or hub name (default: built-in).")  # fmt: skip
    reward_model: str | None = own(None, "Reward model directory (a sequence classifier, e.g. "
                                         "train-rm's final/). Default on the built-in task: "
                                         "train one first into OUTPUT_DIR/reward_model.")  # fmt: skip
    critic: str = own("separate", "Value function: a separate critic initialised from the reward "
                                  "model, or a value head on the policy's trunk.", CRITICS)  # fmt: skip
    # --- rollouts ----------------------------------------------------------------------------
    dataset: str | None = same("dataset", help="Prompts: any data with a text `prompt` column, "
                                               "e.g. preference data (default: built-in).")  # fmt: skip
    split: str = same("split")
    rollouts: int = own(100, "PPO iterations: each samples a batch of responses, then updates.")
    rollout_batch_size: int = own(64, "Prompts (one response each) per rollout.")
    max_new_tokens: int = own(40, "Most tokens per sampled response.")
    temperature: float = own(1.0, "Sampling temperature (log-probs use the same).")
    max_prompt_length: int | None = own(None, "Prompt tokens kept (the last ones) (default: all).")
    # --- reward ------------------------------------------------------------------------------
    kl_coef: float = own(0.05, "β of the per-token KL penalty −β·log(π/π_ref) in the reward.")
    target_kl: float | None = own(None, "Adapt β toward this KL per response, in nats (Ziegler "
                                        "et al. 2019); default: β stays fixed.")  # fmt: skip
    kl_horizon: int = own(10_000, "Horizon of the adaptive β controller, in responses.")
    kl_estimator: str = own("k1", "Per-token KL estimate in the reward.", KL_ESTIMATORS)
    normalize_scores: bool = own(True, "Standardise reward-model scores with the mean and std "
                                       "of the first rollout's (the initial policy's).")  # fmt: skip
    missing_eos_penalty: float = own(0.0, "Subtracted from the score of a response that hit "
                                          "--max-new-tokens without EOS (0: off).")  # fmt: skip
    # --- optimisation ------------------------------------------------------------------------
    ppo_epochs: int = own(4, "Passes over each rollout.")
    mini_batch_size: int = own(16, "Responses per optimizer step.")
    learning_rate: float = same("learning_rate", 1e-5)
    weight_decay: float = same("weight_decay")
    warmup_ratio: float = same("warmup_ratio", 0.0)
    lr_scheduler: str = same("lr_scheduler", "linear")
    max_grad_norm: float = same("max_grad_norm")
    gamma: float = own(1.0, "Discount γ of GAE.")
    lam: float = own(0.95, "λ of GAE.")
    clip_range: float = own(0.2, "ε of the clipped policy ratio.")
    value_clip_range: float = own(0.2, "ε of the clipped value update.")
    vf_coef: float = own(0.1, "Weight of the value loss.")
    whiten_advantages: bool = own(True, "Whiten advantages over each rollout's tokens.")
    precision: str = same("precision")
    seed: int = same("seed", help="Seed of prompt order, value head and sampling.")
    # --- run ---------------------------------------------------------------------------------
    output_dir: str | None = same("output_dir", help="Run directory (default: runs/ppo-TIMESTAMP).")
    overwrite: bool = same("overwrite")
    eval_every: int = same("eval_every", 25, help="Built-in task: sample held-out prompts every "
                                                  "N rollouts (0: only at start and end).")  # fmt: skip
    log_every: int = same("log_every")
    report_to: str = same("report_to")
    wandb_project: str = same("wandb_project")
    run_name: str | None = same("run_name")
    cache_dir: str | None = same("cache_dir", help="Cache of the built-in task (default: "
                                                   "$DIRECT_ALIGN_CACHE or ~/.cache/direct_align).")  # fmt: skip
    # --- built-in task -----------------------------------------------------------------------
    label_noise: float = same("label_noise", help="Built-in task: label noise of the pairs the "
                                                  "default reward model is trained on.")  # fmt: skip
    eval_prompts: int = same("eval_prompts")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = Fields(PPOConfig, {
    "reward_model": str, "critic": str, "rollouts": int, "rollout_batch_size": int,
    "max_new_tokens": int, "temperature": float, "max_prompt_length": int, "kl_coef": float,
    "target_kl": float, "kl_horizon": int, "kl_estimator": str, "normalize_scores": bool,
    "missing_eos_penalty": float, "ppo_epochs": int, "mini_batch_size": int, "gamma": float,
    "lam": float, "clip_range": float, "value_clip_range": float, "vf_coef": float,
    "whiten_advantages": bool,
})  # fmt: skip

# The built-in task's recipe (~2M-parameter policy); applied under command-line values.
BUILTIN_PRESET: dict[str, Any] = {"learning_rate": 1e-4, "rollouts": 40}


def resolve_ppo(cli: dict[str, Any]) -> PPOConfig:
    """Merge defaults, the built-in preset and CLI values (None: not given), then validate."""
    cfg = FIELDS.resolve(cli, BUILTIN_PRESET, "ppo")
    validate_ppo(cfg)
    return cfg


def validate_ppo(cfg: PPOConfig) -> None:
    """Reject impossible settings before any work is done."""
    check_all([
        (cfg.rollouts >= 1, "--rollouts must be at least 1"),
        (cfg.rollout_batch_size >= 2, "--rollout-batch-size must be at least 2"),
        (1 <= cfg.mini_batch_size <= cfg.rollout_batch_size,
         "--mini-batch-size must be in [1, --rollout-batch-size]"),
        (cfg.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (cfg.temperature > 0, "--temperature must be > 0"),
        (cfg.kl_coef >= 0, "--kl-coef must be ≥ 0"),
        (cfg.target_kl is None or cfg.target_kl > 0, "--target-kl must be > 0"),
        (cfg.kl_horizon >= 1, "--kl-horizon must be at least 1"),
        (cfg.missing_eos_penalty >= 0, "--missing-eos-penalty must be ≥ 0"),
        (cfg.ppo_epochs >= 1, "--ppo-epochs must be at least 1"),
        (0 < cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "--gamma must be in (0, 1], --lam in [0, 1]"),
        (cfg.clip_range > 0 and cfg.value_clip_range > 0, "clip ranges must be > 0"),
        (cfg.vf_coef >= 0, "--vf-coef must be ≥ 0"),
        *shared_checks(cfg),
    ])  # fmt: skip


def check_processes(cfg: PPOConfig, processes: int) -> None:
    """Each process samples and trains on an equal share of every rollout and minibatch, so
    that all make the same number of forward and backward passes (DDP needs it)."""
    if cfg.rollout_batch_size % processes or cfg.mini_batch_size % processes:
        raise ConfigError(f"--rollout-batch-size {cfg.rollout_batch_size} and --mini-batch-size "
                          f"{cfg.mini_batch_size} must be multiples of the {processes} processes "
                          "(each samples and trains on an equal share)")  # fmt: skip
