"""Settings of `direct-align ppo`.

Settings shared with `direct-align train` are the same declarations (:mod:`direct_align.settings`).
Precedence, lowest first: field defaults < the built-in task's preset (only when no ``--model``
and no ``--dataset`` are given) < ``--config FILE`` < command-line flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from direct_align import settings as s
from direct_align.config import NON_NEGATIVE, POSITIVE, Setting, at_least, within
from direct_align.errors import ConfigError
from direct_align.ppo.core import KL_ESTIMATORS

CRITICS = ("separate", "shared")


@dataclass
class PPOConfig(s.OptimSettings, s.RunSettings):
    """Resolved settings of one PPO run (written to ``OUTPUT_DIR/config.yaml``): its own below,
    and the optimiser and run groups of :mod:`direct_align.settings` (PPO's steps are rollouts)."""

    # --- models ------------------------------------------------------------------------------
    model: str | None = s.MODEL.field(help="Initial policy (the SFT model): a HF causal LM "
                                           "directory or hub name (default: built-in).")  # fmt: skip
    reward_model: str | None = Setting(str, None, "Reward model directory (a sequence "
                                                  "classifier, e.g. train-rm's final/). Default "
                                                  "on the built-in task: train one first into "
                                                  "OUTPUT_DIR/reward_model.").field()  # fmt: skip
    critic: str = Setting(str, "separate", "Value function: a separate critic initialised from "
                                           "the reward model, or a value head on the policy's "
                                           "trunk.", CRITICS).field()  # fmt: skip
    disable_dropout: bool = s.DISABLE_DROPOUT.field()
    # --- rollouts ----------------------------------------------------------------------------
    dataset: str | None = s.DATASET.field(help="Prompts: any data with a text `prompt` column, "
                                               "e.g. preference data (default: built-in).")  # fmt: skip
    split: str = s.SPLIT.field()
    rollouts: int = Setting(int, 100, "PPO iterations: each samples a batch of responses, then "
                                      "updates.", rule=at_least(1)).field()  # fmt: skip
    rollout_batch_size: int = Setting(int, 64, "Prompts (one response each) per rollout.",
                                      rule=at_least(2)).field()  # fmt: skip
    max_new_tokens: int = s.MAX_NEW_TOKENS.field(default=40)
    temperature: float = s.TEMPERATURE.field(help="Sampling temperature (log-probs use the same).")
    max_prompt_length: int | None = s.MAX_PROMPT_LENGTH.field(help="Prompt tokens kept (the last "
                                                                   "ones) (default: all).")  # fmt: skip
    # --- reward ------------------------------------------------------------------------------
    kl_coef: float = Setting(float, 0.05, "β of the per-token KL penalty −β·log(π/π_ref) in the "
                                          "reward.", rule=NON_NEGATIVE).field()  # fmt: skip
    target_kl: float | None = Setting(float, None, "Adapt β toward this KL per response, in nats "
                                                   "(Ziegler et al. 2019); default: β stays fixed.",
                                      rule=POSITIVE).field()  # fmt: skip
    kl_horizon: int = Setting(int, 10_000, "Horizon of the adaptive β controller, in responses.",
                              rule=at_least(1)).field()  # fmt: skip
    kl_estimator: str = Setting(str, "k1", "Per-token KL estimate in the reward.",
                                KL_ESTIMATORS).field()  # fmt: skip
    normalize_scores: bool = Setting(bool, True, "Standardise reward-model scores with the mean "
                                                 "and std of the first rollout's (the initial "
                                                 "policy's).").field()  # fmt: skip
    missing_eos_penalty: float = Setting(float, 0.0, "Subtracted from the score of a response "
                                                     "that hit --max-new-tokens without EOS (0: "
                                                     "off).", rule=NON_NEGATIVE).field()  # fmt: skip
    # --- optimisation ------------------------------------------------------------------------
    ppo_epochs: int = Setting(int, 4, "Passes over each rollout.", rule=at_least(1)).field()
    mini_batch_size: int = Setting(int, 16, "Responses per optimizer step.",
                                   rule=at_least(1)).field()  # fmt: skip
    learning_rate: float = s.LEARNING_RATE.field(default=1e-5)
    warmup_ratio: float = s.WARMUP_RATIO.field(default=0.0)
    lr_scheduler: str = s.LR_SCHEDULER.field(default="linear")
    gamma: float = Setting(float, 1.0, "Discount γ of GAE.",
                           rule=within(0, 1, open_lo=True, open_hi=False)).field()  # fmt: skip
    lam: float = Setting(float, 0.95, "λ of GAE.", rule=within(0, 1, open_hi=False)).field()
    clip_range: float = Setting(float, 0.2, "ε of the clipped policy ratio.", rule=POSITIVE).field()
    value_clip_range: float = Setting(float, 0.2, "ε of the clipped value update.",
                                      rule=POSITIVE).field()  # fmt: skip
    vf_coef: float = Setting(float, 0.1, "Weight of the value loss.", rule=NON_NEGATIVE).field()
    whiten_advantages: bool = Setting(bool, True, "Whiten advantages over each rollout's "
                                                  "tokens.").field()  # fmt: skip
    seed: int = s.SEED.field(help="Seed of prompt order, value head and sampling.")
    # --- run ---------------------------------------------------------------------------------
    output_dir: str | None = s.OUTPUT_DIR.field(help="Run directory (default: runs/ppo-TIMESTAMP).")
    eval_every: int = s.EVAL_EVERY.field(default=25, help="Sample the held-out prompts (built-in "
                                                          "task, --eval-prompts-file) every N "
                                                          "rollouts (0: only at start and end).")  # fmt: skip
    save_every: int = s.SAVE_EVERY.field(default=25, help="Checkpoint every N rollouts (0: only "
                                                          "when stopped early).")  # fmt: skip
    log_every: int = s.LOG_EVERY.field(help="Log metrics every N rollouts.")
    max_steps_per_run: int | None = s.MAX_STEPS_PER_RUN.field(help="Stop with a checkpoint after "
                                                                   "N rollouts in this invocation "
                                                                   "(for time-limited jobs; "
                                                                   "--resume later).")  # fmt: skip
    cache_dir: str | None = s.CACHE_DIR.field(help="Cache of the built-in task (default: "
                                                   "$DIRECT_ALIGN_CACHE or ~/.cache/direct_align).")  # fmt: skip
    # --- built-in task -----------------------------------------------------------------------
    label_noise: float = s.LABEL_NOISE.field(help="Built-in task: label noise of the pairs the "
                                                  "default reward model is trained on.")  # fmt: skip
    train_pairs: int = s.TRAIN_PAIRS.field(help="Built-in task: the default reward model learns "
                                                "from a random N of the pairs (0: all).")  # fmt: skip
    eval_prompts: int = s.EVAL_PROMPTS.field()
    eval_reward_model: str | None = s.EVAL_REWARD_MODEL.field()
    eval_prompts_file: str | None = s.EVAL_PROMPTS_FILE.field()
    eval_judge: list[str] = s.EVAL_JUDGE.field()

    # The built-in task's recipe (~2M-parameter policy); under YAML and flags.
    foreign_names: ClassVar[dict[str, str]] = s.TRL_NAMES
    builtin_preset: ClassVar[dict[str, Any]] = {"learning_rate": 1e-4, "rollouts": 40,
                                                "save_every": 0}

    def complete(self) -> None:
        s.complete_output_dir(self, "ppo")

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.mini_batch_size <= self.rollout_batch_size,
             "--mini-batch-size must be at most --rollout-batch-size"),
            (self.reward_model is not None or (self.model is None and self.dataset is None),
             "--reward-model is required with --model or --dataset (train one with "
             "`direct-align train-rm`)"),
            *s.run_checks(self),
            *s.eval_prompts_checks(self, default_judge=True),
        ]  # fmt: skip


def check_processes(cfg: PPOConfig, processes: int) -> None:
    """Each process samples and trains on an equal share of every rollout and minibatch, so
    that all make the same number of forward and backward passes (DDP needs it)."""
    if cfg.rollout_batch_size % processes or cfg.mini_batch_size % processes:
        raise ConfigError(f"--rollout-batch-size {cfg.rollout_batch_size} and --mini-batch-size "
                          f"{cfg.mini_batch_size} must be multiples of the {processes} processes "
                          "(each samples and trains on an equal share)")  # fmt: skip
