"""The settings that several commands read, each declared once (see :mod:`direct_align.config`),
and the groups of them that commands share.

A command takes one into its dataclass with ``NAME.field()``, optionally with its own default or
help (``LEARNING_RATE.field(default=1e-5)``), or a whole group by deriving from it
(:class:`RunSettings`: every training command's output directory, cadence and trackers).
Settings that one package alone reads are declared in that package (e.g.
:mod:`direct_align.ppo.settings`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from direct_align.config import NON_NEGATIVE, POSITIVE, Setting, at_least, within
from direct_align.errors import ConfigError

FORMATS = ("auto", "standard", "conversational", "implicit")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
TRACKERS = ("none", "jsonl", "wandb")

# --- models and data -------------------------------------------------------------------------
MODEL = Setting(str, None, "Policy: HF model directory or hub name (default: built-in).")
GRADIENT_CHECKPOINTING = Setting(bool, False, "Recompute activations in backward to save memory.")
DATASET = Setting(str, None, "Preference data: .jsonl/.json/.parquet/.csv, a save_to_disk "
                             "directory or a hub name (default: built-in).")  # fmt: skip
EVAL_DATASET = Setting(str, None, "Held-out preference data (default: a split of --dataset).")
SPLIT = Setting(str, "train", "Split to read from a hub dataset or a saved DatasetDict.")
EVAL_SPLIT = Setting(str, None, "Split of --eval-dataset (default: --split).")
FORMAT = Setting(str, "auto", "Dataset format.", FORMATS)
EVAL_FRACTION = Setting(float, 0.05, "Share of --dataset held out when no --eval-dataset is given.",
                        rule=within(0, 1, open_lo=True))  # fmt: skip
MAX_LENGTH = Setting(int, 512, "Most tokens in prompt + response.", rule=at_least(2))
MAX_PROMPT_LENGTH = Setting(int, None, "Prompt tokens always kept when truncating (default: "
                                       "max_length // 2).", rule=at_least(1))  # fmt: skip

# --- optimisation ------------------------------------------------------------------------------
EPOCHS = Setting(int, 1, "Passes over the training pairs (ignored when --max-steps is set).",
                 rule=at_least(1))  # fmt: skip
MAX_STEPS = Setting(int, None, "Optimizer steps in all (overrides --epochs).", rule=at_least(1))
BATCH_SIZE = Setting(int, 8, "Pairs per forward pass (per process).", rule=at_least(1))
EVAL_BATCH_SIZE = Setting(int, None, "Pairs per eval forward (default: 2 × batch size).",
                          rule=at_least(1), resumable=True)  # fmt: skip
GRAD_ACCUM = Setting(int, 1, "Forward passes per optimizer step.", rule=at_least(1))
# above ~1e37 AdamW's own update overflows float32; far below that no AdamW run is meaningful
LEARNING_RATE = Setting(float, 1e-6, "Peak AdamW learning rate.",
                        rule=within(0, 1000, open_lo=True, open_hi=False))
WEIGHT_DECAY = Setting(float, 0.0, "AdamW weight decay.", rule=NON_NEGATIVE)
WARMUP_RATIO = Setting(float, 0.1, "Share of steps with linear warmup.", rule=within(0, 1))
LR_SCHEDULER = Setting(str, "cosine", "Decay after warmup.", SCHEDULERS)
MAX_GRAD_NORM = Setting(float, 1.0, "Gradient clipping norm (0 disables).", rule=NON_NEGATIVE)
PRECISION = Setting(str, "auto", "Compute precision (auto: bf16 on a bf16 GPU, else fp32).",
                    PRECISIONS)  # fmt: skip
WEIGHTS = Setting(str, "fp32", "How trained weights are held: fp32 master weights; bf16 weights and "
                  "gradients, each update rounded stochastically so small steps survive "
                  "(torchao); bf16-nearest: plain bf16 AdamW, which loses them (for comparison). "
                  "bf16 weights compute in bf16.", ("fp32", "bf16", "bf16-nearest"))  # fmt: skip
OPTIMIZER = Setting(str, "adamw", "adamw (moments in the weights' precision, fp32 with fp32 "
                    "weights) or adamw-8bit (block-wise 8-bit moments, torchao's AdamW8bit: 2 "
                    "bytes a parameter instead of 8).", ("adamw", "adamw-8bit"))  # fmt: skip
STEP_IN_BACKWARD = Setting(bool, False, "Step each parameter as soon as its gradient is complete "
                           "and free that gradient, so no whole-model gradient is held (needs "
                           "--grad-accum 1, --max-grad-norm 0 and one process).")  # fmt: skip
SEED = Setting(int, 42, "Seed of data order, initialisation and sampling.")

# --- the run -------------------------------------------------------------------------------------
OUTPUT_DIR = Setting(str, None, "Run directory (default: runs/COMMAND-TIMESTAMP).", resumable=True)
OVERWRITE = Setting(bool, False, "Replace the contents of a non-empty output directory.", resumable=True)
RESUME = Setting(bool, False, "Continue from the last checkpoint in the output directory.", resumable=True)
EVAL_EVERY = Setting(int, 100, "Evaluate every N optimizer steps (0: only at start and end).",
                     rule=NON_NEGATIVE, resumable=True)  # fmt: skip
SAVE_EVERY = Setting(int, 500, "Checkpoint every N optimizer steps (0: only at the end).",
                     rule=NON_NEGATIVE, resumable=True)  # fmt: skip
SAVE_TOTAL_LIMIT = Setting(int, 2, "Checkpoints kept (oldest removed).", rule=at_least(1), resumable=True)
LOG_EVERY = Setting(int, 1, "Log train metrics every N optimizer steps.", rule=at_least(1), resumable=True)
MAX_STEPS_PER_RUN = Setting(int, None, "Stop with a checkpoint after N steps in this invocation "
                                       "(for time-limited jobs; --resume later).", rule=at_least(1), resumable=True)  # fmt: skip
REPORT_TO = Setting(str, "jsonl", "Trackers besides metrics.jsonl (always written).", TRACKERS,
                    resumable=True)
WANDB_PROJECT = Setting(str, None, "W&B project (default: $WANDB_PROJECT, then direct-align).",
                        resumable=True)  # fmt: skip
WANDB_GROUP = Setting(str, None, "W&B group of the run (default: $WANDB_RUN_GROUP, if set).",
                      resumable=True)  # fmt: skip
WANDB_TAGS = Setting(list, None, "A W&B tag of the run (repeatable; default: $WANDB_TAGS).",
                     resumable=True)  # fmt: skip
WANDB_NOTES = Setting(str, None, "W&B notes of the run (default: $WANDB_NOTES).", resumable=True)
WANDB_CONFIG = Setting(list, None, "An extra KEY=VALUE of the W&B run's config, e.g. to group "
                                   "runs by it (repeatable).", resumable=True)  # fmt: skip
WANDB_LOG_MODEL = Setting(bool, False, "Upload final/ to W&B as a model artifact.", resumable=True)
RUN_NAME = Setting(str, None, "Run name for trackers (default: output directory name).", resumable=True)
LOG_GENERATIONS = Setting(int, 8, "Rows of sample generations logged at each evaluation that "
                                  "samples (a W&B table and generations.jsonl; 0: none).",
                          rule=NON_NEGATIVE, resumable=True)  # fmt: skip
DISABLE_DROPOUT = Setting(bool, True, "Turn every dropout of the trained model off, as TRL does (the "
                                      "reference is scored without dropout).")  # fmt: skip
PUSH_TO_HUB = Setting(str, None, "Upload final/ with its model card to this Hugging Face Hub "
                                 "repository (needs the network and a token).", resumable=True)  # fmt: skip
CACHE_DIR = Setting(str, None, "Cache for reference log-probs and the built-in task (default: "
                               "$DIRECT_ALIGN_CACHE or ~/.cache/direct_align).", resumable=True)  # fmt: skip

# --- sampling (online DPO, label, PPO) -----------------------------------------------------------
MAX_NEW_TOKENS = Setting(int, 128, "Most tokens per sampled response.", rule=at_least(1))
TEMPERATURE = Setting(float, 1.0, "Sampling temperature.", rule=POSITIVE)

# --- the built-in task ---------------------------------------------------------------------------
LABEL_NOISE = Setting(float, 0.0, "Built-in task: share of preference labels flipped.",
                      rule=within(0, 0.5))  # fmt: skip
TRAIN_PAIRS = Setting(int, 0, "Built-in task: learn from a random N of its pairs (0: all); the "
                      "same N for every seed.", rule=at_least(0))  # fmt: skip
EVAL_REWARD_MODEL = Setting(str, None, "Built-in task: also score the held-out samples with "
                            "this reward model (eval/policy/proxy_reward), to see a proxy "
                            "reward over-optimised.")  # fmt: skip
EVAL_PROMPTS = Setting(int, 128, "Held-out prompts sampled at each evaluation for the reward "
                       "table: the built-in task's, or the first N of --eval-prompts-file.",
                       rule=at_least(1))  # fmt: skip
EVAL_PROMPTS_FILE = Setting(str, None, "Own data: prompts to sample at each evaluation (a file "
                            "with a 'prompt' column, or the prompts of a preference file in any "
                            "format --dataset takes); their reward (--eval-judge), win rate over "
                            "the reference and KL are logged as eval/policy/*.")  # fmt: skip
EVAL_JUDGE = Setting(list, None, "Judge of the --eval-prompts-file samples, SPEC[=WEIGHT] as "
                     "--reward takes (repeatable; default: the run's own judge, --reward "
                     "online, --reward-model for ppo).")  # fmt: skip


# --- the names a TRL user will try ----------------------------------------------------------------
# TRL's (transformers') training arguments → what direct-align calls them (and how they differ)
TRL_NAMES: dict[str, str] = {
    "model_name_or_path": "model",
    "dataset_name": "dataset",
    "dataset_train_split": "split",
    "dataset_test_split": "eval_split",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio (a share of the steps, not a count)",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "bf16": "precision (precision: bf16)",
    "fp16": "precision (bf16 or fp32; no fp16)",
    "torch_dtype": "precision",
    "dtype": "precision",
    "report_to": "report_to (none, jsonl or wandb: one tracker)",
    "run_name": "run_name",
    "push_to_hub": "push_to_hub (the repository's name)",
    "hub_model_id": "push_to_hub",
    "resume_from_checkpoint": "resume (true: the output directory's last checkpoint)",
    "overwrite_output_dir": "overwrite",
    "gradient_checkpointing_kwargs": "gradient_checkpointing",
    "attn_implementation": "attn",
    "padding_free": "layout (shared or packed: no padding)",
    "use_peft": "lora_r (LoRA is on when lora_r is set)",
    "lora_target_modules": "lora_targets",
    "max_completion_length": "max_length (prompt and response together)",
    "precompute_ref_log_probs": "nothing: reference log-probs are always computed once and cached",
    "generate_during_eval": "log_generations",
    "simpo_gamma": "gamma",
    "loss_type": "loss (sigmoid → dpo, ipo → ipo, hinge → hinge, robust → robust; "
                 "ORPO and SimPO are losses here: orpo, simpo)",
    "center_rewards_coefficient": "center_rewards_coef",
    "cliprange": "clip_range",
    "cliprange_value": "value_clip_range",
    "num_ppo_epochs": "ppo_epochs",
    "response_length": "max_new_tokens",
    "num_mini_batches": "mini_batch_size (responses per step, not a count of minibatches)",
    "disable_dropout": "disable_dropout",
}


# --- groups of settings that commands share -------------------------------------------------------


@dataclass
class PairDataSettings:
    """Preference pairs to train on and to hold out (`train`, `train-rm`)."""

    dataset: str | None = DATASET.field()
    eval_dataset: str | None = EVAL_DATASET.field()
    split: str = SPLIT.field()
    eval_split: str | None = EVAL_SPLIT.field()
    format: str = FORMAT.field()
    eval_fraction: float = EVAL_FRACTION.field()
    max_length: int = MAX_LENGTH.field()
    max_prompt_length: int | None = MAX_PROMPT_LENGTH.field()


@dataclass
class BatchSettings:
    """Steps over epochs of micro-batches of pairs (`train`, `train-rm`)."""

    epochs: int = EPOCHS.field()
    max_steps: int | None = MAX_STEPS.field()
    batch_size: int = BATCH_SIZE.field()
    eval_batch_size: int | None = EVAL_BATCH_SIZE.field()
    grad_accum: int = GRAD_ACCUM.field()


@dataclass
class OptimSettings:
    """AdamW, its schedule and clipping, precision and seed (every training command)."""

    learning_rate: float = LEARNING_RATE.field()
    weight_decay: float = WEIGHT_DECAY.field()
    warmup_ratio: float = WARMUP_RATIO.field()
    lr_scheduler: str = LR_SCHEDULER.field()
    max_grad_norm: float = MAX_GRAD_NORM.field()
    precision: str = PRECISION.field()
    weights: str = WEIGHTS.field()
    optimizer: str = OPTIMIZER.field()
    step_in_backward: bool = STEP_IN_BACKWARD.field()
    seed: int = SEED.field()


@dataclass
class TrackerSettings:
    """Where a command reports: metrics.jsonl always, W&B with ``--report-to wandb`` (every
    command)."""

    report_to: str = REPORT_TO.field()
    run_name: str | None = RUN_NAME.field()
    wandb_project: str | None = WANDB_PROJECT.field()
    wandb_group: str | None = WANDB_GROUP.field()
    wandb_tags: list[str] = WANDB_TAGS.field()
    wandb_notes: str | None = WANDB_NOTES.field()
    wandb_config: list[str] = WANDB_CONFIG.field()


@dataclass
class RunSettings(TrackerSettings):
    """The run directory, resume, cadence, what is logged and kept, and the cache (every
    training command)."""

    output_dir: str | None = OUTPUT_DIR.field()
    overwrite: bool = OVERWRITE.field()
    resume: bool = RESUME.field()
    eval_every: int = EVAL_EVERY.field()
    save_every: int = SAVE_EVERY.field()
    save_total_limit: int = SAVE_TOTAL_LIMIT.field()
    log_every: int = LOG_EVERY.field()
    max_steps_per_run: int | None = MAX_STEPS_PER_RUN.field()
    log_generations: int = LOG_GENERATIONS.field()
    wandb_log_model: bool = WANDB_LOG_MODEL.field()
    push_to_hub: str | None = PUSH_TO_HUB.field()
    cache_dir: str | None = CACHE_DIR.field()


# --- what every command does with these ------------------------------------------------------------


def complete_output_dir(cfg: Any, prefix: str) -> None:
    """Default ``output_dir``: a new ``runs/PREFIX-TIMESTAMP``; ``--resume`` needs it given."""
    if cfg.output_dir is None:
        if getattr(cfg, "resume", False):
            raise ConfigError("--resume needs the --output-dir of the run to continue")
        cfg.output_dir = str(Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_checks(cfg: Any) -> list[tuple[bool, str]]:
    """(ok, message) for the run settings that exclude each other or need something."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return [
        (not (getattr(cfg, "resume", False) and cfg.overwrite),
         "--resume and --overwrite exclude each other"),
        *tracker_checks(cfg),
        (not (getattr(cfg, "push_to_hub", None) and offline),
         f"--push-to-hub {getattr(cfg, 'push_to_hub', '')}: the Hub cannot be reached with "
         "HF_HUB_OFFLINE set; unset it, or push final/ later with `hf upload`"),
        (not (getattr(cfg, "wandb_log_model", False) and cfg.report_to != "wandb"),
         "--wandb-log-model needs --report-to wandb"),
        *eval_reward_model_checks(cfg),
        *(optim_checks(cfg) if hasattr(cfg, "weights") else []),
    ]  # fmt: skip


def optim_checks(cfg: Any) -> list[tuple[bool, str]]:
    """bf16 weights compute in bf16; the step in backward has no accumulation and no global
    norm; torchao is needed for bf16 weights' rounding and 8-bit states."""
    needs_torchao = cfg.weights == "bf16" or cfg.optimizer == "adamw-8bit"
    return [
        (not (cfg.weights != "fp32" and cfg.precision == "fp32"),
         f"--weights {cfg.weights} computes in bf16; --precision fp32 needs --weights fp32"),
        (not (cfg.step_in_backward and getattr(cfg, "grad_accum", 1) != 1),
         f"--step-in-backward steps each parameter during backward: it cannot accumulate "
         f"--grad-accum {getattr(cfg, 'grad_accum', 1)} passes; use --grad-accum 1"),
        (not (cfg.step_in_backward and cfg.max_grad_norm),
         "--step-in-backward steps each parameter before the whole gradient's norm is known: "
         "pass --max-grad-norm 0 (no clipping)"),
        (not (cfg.step_in_backward and getattr(cfg, "max_tokens_per_batch", None)),
         "--step-in-backward takes one forward pass a step; --max-tokens-per-batch makes several"),
        (not needs_torchao or importlib.util.find_spec("torchao") is not None,
         f"--weights {cfg.weights} --optimizer {cfg.optimizer} needs torchao: pip install "
         "'direct-align[memory]'"),
    ]  # fmt: skip


def eval_prompts_checks(cfg: Any, default_judge: bool) -> list[tuple[bool, str]]:
    """``--eval-prompts-file`` is for own data and needs a judge (``default_judge``: the run has
    one of its own); ``--eval-judge`` needs it."""
    return [(not (cfg.eval_prompts_file and cfg.dataset is None),
             "--eval-prompts-file is for own data (--dataset); the built-in task evaluates on "
             "its own held-out prompts and hidden reward"),
            (not (cfg.eval_judge and not cfg.eval_prompts_file),
             "--eval-judge scores the samples of --eval-prompts-file: give that too"),
            (not (cfg.eval_prompts_file and not cfg.eval_judge and not default_judge),
             "--eval-prompts-file needs a judge of the samples: --eval-judge SPEC (a reward-model "
             "directory, module:function or path.py:function)")]  # fmt: skip


def eval_reward_model_checks(cfg: Any) -> list[tuple[bool, str]]:
    """``--eval-reward-model`` is a reward-model directory, used on the built-in task only."""
    path = getattr(cfg, "eval_reward_model", None)
    if path is None:
        return []
    return [(getattr(cfg, "dataset", None) is None,
             "--eval-reward-model scores the built-in task's held-out samples; it needs no "
             "--dataset"),
            ((Path(path).expanduser() / "config.json").is_file(),
             f"--eval-reward-model '{path}': not a reward-model directory (no config.json)")]  # fmt: skip


def tracker_checks(cfg: Any) -> list[tuple[bool, str]]:
    """``--wandb-config`` items are KEY=VALUE."""
    bad = [item for item in cfg.wandb_config if "=" not in item or item.startswith("=")]
    return [(not bad, f"--wandb-config '{bad[0] if bad else ''}' must be KEY=VALUE")]


def uses_bf16(cfg: Any) -> bool:
    """Whether a run computes in bf16 (``--precision auto``: on a GPU that supports it)."""
    return cfg.precision == "bf16" or getattr(cfg, "weights", "fp32") != "fp32" or (
        cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )


def frozen_dtype(cfg: Any) -> torch.dtype:
    """The dtype a frozen model (a reference, a reward model that judges) loads in: the run's
    compute dtype, since it only runs forward passes (bf16: half the memory of fp32). Trained
    models load in fp32, their master weights."""
    return torch.bfloat16 if uses_bf16(cfg) else torch.float32
