"""Every setting of `direct-align train` in one dataclass; YAML loading, CLI overrides, validation.

Precedence, lowest first: field defaults < the built-in task's preset (only when no ``--model`` and
no ``--dataset`` are given) < ``--config FILE`` < command-line flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch
import yaml

from direct_align.errors import ConfigError
from direct_align.losses import LOSSES

FORMATS = ("auto", "standard", "conversational", "implicit")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION = ("auto", "segments", "flash", "varlen", "sdpa", "eager")
SEGMENT_ATTENTION = ("segments", "flash", "varlen")  # read the row's segments: packed layouts only
LAYOUTS = ("shared", "packed", "padded")
REPORT_TO = ("none", "jsonl", "wandb")
LORA_SAVE = ("adapter", "merged")


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Resolved settings of one training run (written to ``OUTPUT_DIR/config.yaml``)."""

    # --- objective ---------------------------------------------------------------------------
    loss: str = _f("dpo", "Preference loss.", tuple(LOSSES))
    beta: float | None = _f(None, "Loss strength β (ORPO: λ); default: the loss's own default.")
    label_smoothing: float = _f(0.0, "Label-noise rate ε for dpo (conservative DPO), robust, simpo.")
    gamma: float = _f(0.5, "SimPO target reward margin γ.")
    reference_free: bool = _f(False, "dpo/ipo/hinge/robust without a reference (skips the pass).")
    # --- models ------------------------------------------------------------------------------
    model: str | None = _f(None, "Policy: HF model directory or hub name (default: built-in).")
    ref_model: str | None = _f(None, "Reference model (default: the initial policy).")
    attn: str = _f("auto", "Attention over packed rows: per-sequence SDPA (segments), the "
                           "flash-attn or PyTorch varlen kernels on a GPU (flash, varlen), or the "
                           "model's sdpa/eager with masks. auto: flash > varlen > segments, as "
                           "available (segments on a CPU).", ATTENTION)
    layout: str = _f("shared", "Batch layout: shared prompts without padding, packed sequences "
                               "without padding, or padded rows.", LAYOUTS)
    chunked_logprobs: bool = _f(True, "LM head on response tokens only, in chunks recomputed in "
                                      "backward (no [tokens, vocab] logits).")
    max_tokens_per_batch: int | None = _f(None, "Fill each micro-batch up to this many tokens "
                                                "(length-bucketed) instead of --batch-size pairs.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    # --- LoRA (peft; see docs/lora.md) ---------------------------------------------------------
    lora_r: int | None = _f(None, "Train LoRA adapters of this rank instead of every weight; the "
                                  "reference is then the base model (adapters off), with no "
                                  "second copy (default: off, full fine-tuning).")  # fmt: skip
    lora_alpha: float | None = _f(None, "LoRA scale numerator: adapters add (alpha / r)·BA "
                                        "(default: 2 × --lora-r).")  # fmt: skip
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch's input.")
    lora_targets: str | None = _f(None, "Comma-separated module names that get adapters, e.g. "
                                        "q_proj,v_proj (default: all-linear, every linear layer "
                                        "of the decoder).")  # fmt: skip
    lora_save: str = _f("adapter", "final/ holds the adapter (load with peft) or the merged full "
                                   "model.", LORA_SAVE)  # fmt: skip
    # --- data --------------------------------------------------------------------------------
    dataset: str | None = _f(None, "Preference data: .jsonl/.json/.parquet/.csv, a save_to_disk "
                                   "directory or a hub name (default: built-in).")  # fmt: skip
    eval_dataset: str | None = _f(None, "Held-out preference data (default: a split of --dataset).")
    split: str = _f("train", "Split to read from a hub dataset or a saved DatasetDict.")
    eval_split: str | None = _f(None, "Split of --eval-dataset (default: --split).")
    format: str = _f("auto", "Dataset format.", FORMATS)
    eval_fraction: float = _f(0.05, "Share of --dataset held out when no --eval-dataset is given.")
    max_length: int = _f(512, "Most tokens in prompt + response.")
    max_prompt_length: int | None = _f(None, "Prompt tokens always kept when truncating "
                                             "(default: max_length // 2).")  # fmt: skip
    # --- optimisation ------------------------------------------------------------------------
    epochs: int = _f(1, "Passes over the training pairs (ignored when --max-steps is set).")
    max_steps: int | None = _f(None, "Optimizer steps in all (overrides --epochs).")
    batch_size: int = _f(8, "Pairs per forward pass (per process).")
    eval_batch_size: int | None = _f(None, "Pairs per eval forward (default: 2 × batch size).")
    grad_accum: int = _f(1, "Forward passes per optimizer step.")
    learning_rate: float = _f(1e-6, "Peak AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_ratio: float = _f(0.1, "Share of steps with linear warmup.")
    lr_scheduler: str = _f("cosine", "Decay after warmup.", SCHEDULERS)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    precision: str = _f("auto", "Compute precision (auto: bf16 on a bf16 GPU, else fp32).",
                        PRECISIONS)  # fmt: skip
    seed: int = _f(42, "Seed of data order, initialisation and sampling.")
    # --- run ---------------------------------------------------------------------------------
    output_dir: str | None = _f(None, "Run directory (default: runs/LOSS-TIMESTAMP).")
    overwrite: bool = _f(False, "Replace the contents of a non-empty output directory.")
    resume: bool = _f(False, "Continue from the last checkpoint in the output directory.")
    eval_every: int = _f(100, "Evaluate every N optimizer steps (0: only at start and end).")
    save_every: int = _f(500, "Checkpoint every N optimizer steps (0: only at the end).")
    save_total_limit: int = _f(2, "Checkpoints kept (oldest removed).")
    log_every: int = _f(1, "Log train metrics every N optimizer steps.")
    max_steps_per_run: int | None = _f(None, "Stop with a checkpoint after N steps in this "
                                             "invocation (for time-limited jobs; --resume later).")  # fmt: skip
    report_to: str = _f("jsonl", "Trackers besides metrics.jsonl (always written).", REPORT_TO)
    wandb_project: str = _f("direct-align", "W&B project.")
    run_name: str | None = _f(None, "Run name for trackers (default: output directory name).")
    cache_dir: str | None = _f(None, "Cache for reference log-probs and the built-in task "
                                     "(default: $DIRECT_ALIGN_CACHE or ~/.cache/direct_align).")  # fmt: skip
    # --- online DPO (sample, judge, learn; see docs/online.md) ------------------------------
    online: bool = _f(False, "Online training: each round the policy samples responses to "
                             "prompts of --dataset (a prompt column), a judge scores them and "
                             "the policy trains on the pairs.")  # fmt: skip
    rounds: int = _f(8, "Online: rounds of sample → judge → train.")
    prompts_per_round: int = _f(64, "Online: prompts sampled per round.")
    samples_per_prompt: int = _f(2, "Online/label: responses sampled per prompt (k ≥ 2).")
    temperature: float = _f(1.0, "Online/label: sampling temperature.")
    top_p: float = _f(1.0, "Online/label: nucleus sampling mass (1: off).")
    max_new_tokens: int = _f(128, "Online/label: most tokens per sampled response.")
    reward: list[str] = field(default_factory=list, metadata={
        "help": "Online/label: a judge, SPEC[=WEIGHT]: builtin, module:function, "
                "path.py:function or a reward-model directory; repeat for a weighted sum "
                "(default: builtin on the built-in task).", "choices": None})  # fmt: skip
    pair_margin: float | None = _f(None, "Online/label: pair every two responses to a prompt "
                                         "whose rewards differ by more than this (default: "
                                         "the best against the worst only).")  # fmt: skip
    length_penalty: float = _f(0.0, "Online/label: subtracted from a reward per response token.")
    eos_penalty: float = _f(0.0, "Online/label: subtracted from the reward of a response cut "
                                 "off before EOS.")  # fmt: skip
    # --- built-in task -----------------------------------------------------------------------
    label_noise: float = _f(0.0, "Built-in task: share of preference labels flipped.")
    eval_prompts: int = _f(128, "Built-in task: held-out prompts sampled for the reward table.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = get_type_hints(TrainConfig)

# The built-in task's tuned recipe (see docs/builtin.md); applied under YAML and CLI values.
BUILTIN_PRESET: dict[str, Any] = {
    "learning_rate": 1e-4,
    "batch_size": 32,
    "epochs": 2,
    "warmup_ratio": 0.1,
    "max_length": 64,
    "eval_every": 50,
    "save_every": 0,
    "max_new_tokens": 40,  # as the task's data and report were sampled
}


def _base_type(name: str) -> type:
    tp = _TYPES[name]
    if get_origin(tp) is not None:  # X | None
        tp = next(a for a in get_args(tp) if a is not type(None))
    return tp


def parse_bool(value: Any) -> bool:
    """``value`` as a bool: a bool, or true/false/yes/no text; ValueError otherwise."""
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    if not isinstance(value, bool):
        raise ValueError
    return value


def coerce(name: str, value: Any, where: str) -> Any:
    """Convert ``value`` to the type of field ``name``; ``where`` prefixes the error message."""
    if value is None:
        if type(None) in get_args(_TYPES[name]):
            return None
        raise ConfigError(f"{where}: '{name}' cannot be empty")
    tp = _base_type(name)
    if get_origin(_TYPES[name]) is list:  # repeatable options: one value or a list of them
        items = list(value) if isinstance(value, list | tuple) else [value]
        return [coerce_item(name, item, where) for item in items]
    try:
        if tp is bool:
            return parse_bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(value, bool) and tp in (int, float):
            raise ValueError
        value = tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{name}' must be {tp.__name__}, got {value!r}") from None
    choices = FIELDS[name].metadata.get("choices")
    if choices and value not in choices:
        prefix = "" if where.startswith("--") else f"{where}: "  # a flag names itself below
        raise ConfigError(f"{prefix}unknown {name} '{value}' (choose from {', '.join(choices)})")
    return value


def coerce_item(name: str, value: Any, where: str) -> str:
    """One text value of the list field ``name``."""
    if not isinstance(value, str | int | float) or isinstance(value, bool) or value == "":
        raise ConfigError(f"{where}: each '{name}' must be text, got {value!r}")
    return str(value)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a config YAML into {field: value}, with one-line errors naming the file and line."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of settings, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown setting '{key}'{hint}")
        values[name] = coerce(name, value, path)
    return values


def resolve(cli: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """Merge defaults, the built-in preset, YAML and CLI values, then validate."""
    from_yaml = load_yaml(config_file) if config_file else {}
    explicit = {**from_yaml, **{k: v for k, v in cli.items() if v is not None and v != ()}}
    explicit = {k: coerce(k, v, "--" + k.replace("_", "-")) for k, v in explicit.items()}
    builtin = explicit.get("model") is None and explicit.get("dataset") is None
    values = {**(BUILTIN_PRESET if builtin else {}), **explicit}
    cfg = TrainConfig(**values)
    if cfg.beta is None:
        cfg.beta = LOSSES[cfg.loss].default_beta
    if cfg.lora_r is not None and cfg.lora_alpha is None:
        cfg.lora_alpha = 2.0 * cfg.lora_r
    if cfg.output_dir is None:
        if cfg.resume:
            raise ConfigError("--resume needs the --output-dir of the run to continue")
        cfg.output_dir = str(Path("runs") / f"{cfg.loss}-{time.strftime('%Y%m%d-%H%M%S')}")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject impossible settings before any work is done."""
    checks: list[tuple[bool, str]] = [
        (cfg.beta is not None and cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}"),
        (0 <= cfg.label_smoothing < 0.5, "--label-smoothing must be in [0, 0.5)"),
        (cfg.max_length >= 2, f"--max-length must be at least 2, got {cfg.max_length}"),
        (cfg.max_prompt_length is None or cfg.max_prompt_length >= 1,
         "--max-prompt-length must be at least 1"),
        (cfg.batch_size >= 1, "--batch-size must be at least 1"),
        (cfg.max_tokens_per_batch is None or cfg.max_tokens_per_batch >= 1,
         "--max-tokens-per-batch must be at least 1"),
        (not (cfg.attn in SEGMENT_ATTENTION and cfg.layout == "padded"),
         f"--attn {cfg.attn} needs a packed layout (--layout shared or packed)"),
        (cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, "--eval-batch-size must be ≥ 1"),
        (cfg.grad_accum >= 1, "--grad-accum must be at least 1"),
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be at least 1"),
        (cfg.max_steps_per_run is None or cfg.max_steps_per_run >= 1,
         "--max-steps-per-run must be at least 1"),
        (cfg.learning_rate > 0, "--learning-rate must be > 0"),
        (cfg.weight_decay >= 0, "--weight-decay must be ≥ 0"),
        (0 <= cfg.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
        (cfg.max_grad_norm >= 0, "--max-grad-norm must be ≥ 0"),
        (0 < cfg.eval_fraction < 1, "--eval-fraction must be in (0, 1)"),
        (cfg.eval_every >= 0 and cfg.save_every >= 0, "--eval-every and --save-every must be ≥ 0"),
        (cfg.log_every >= 1, "--log-every must be at least 1"),
        (cfg.save_total_limit >= 1, "--save-total-limit must be at least 1"),
        (0 <= cfg.label_noise < 0.5, "--label-noise must be in [0, 0.5)"),
        (cfg.eval_prompts >= 1, "--eval-prompts must be at least 1"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other"),
        *online_checks(cfg),
        *lora_checks(cfg),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.attn in ("flash", "varlen"):
        from direct_align.models.varlen import unavailable  # imports transformers: only when asked

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if why := unavailable(cfg.attn, device):
            raise ConfigError(f"--attn {cfg.attn} {why}")
        if not uses_bf16(cfg):
            raise ConfigError(f"--attn {cfg.attn} needs bf16 compute (--precision bf16, or auto on "
                              "a bf16 GPU)")  # fmt: skip
    if LOSSES[cfg.loss].reference_free and cfg.ref_model is not None:
        raise ConfigError(f"--ref-model: {cfg.loss} is reference-free and uses no reference")
    if cfg.reference_free and cfg.ref_model is not None:
        raise ConfigError("--ref-model and --reference-free exclude each other")


def online_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) pairs for the sampling and judge settings, and for --online."""
    checks = [
        (cfg.samples_per_prompt >= 2, "--samples-per-prompt must be at least 2"),
        (cfg.temperature > 0, "--temperature must be > 0"),
        (0 < cfg.top_p <= 1, "--top-p must be in (0, 1]"),
        (cfg.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (cfg.pair_margin is None or cfg.pair_margin >= 0, "--pair-margin must be ≥ 0"),
        (cfg.length_penalty >= 0 and cfg.eos_penalty >= 0,
         "--length-penalty and --eos-penalty must be ≥ 0"),
    ]  # fmt: skip
    if cfg.online:
        checks += [
            (cfg.rounds >= 1, "--rounds must be at least 1"),
            (cfg.prompts_per_round >= 1, "--prompts-per-round must be at least 1"),
            (cfg.max_steps is None, "--max-steps does not apply to --online (use --rounds)"),
            (cfg.max_steps_per_run is None, "--max-steps-per-run does not apply to --online"),
            (cfg.max_tokens_per_batch is None,
             "--max-tokens-per-batch does not apply to --online (use --batch-size)"),
            (bool(cfg.reward) or cfg.dataset is None,
             "--online with --dataset needs a judge: --reward SPEC (see --help)"),
        ]  # fmt: skip
    return checks


def lora_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) pairs for the LoRA settings: they need --lora-r, and peft installed."""
    if cfg.lora_r is None:
        given = [flag for flag, changed in (
            ("--lora-alpha", cfg.lora_alpha is not None), ("--lora-dropout", cfg.lora_dropout != 0),
            ("--lora-targets", cfg.lora_targets is not None),
            ("--lora-save", cfg.lora_save != "adapter"))
            if changed]  # fmt: skip
        return [(not given, f"{', '.join(given)} needs --lora-r (LoRA is off without it)")]
    targets = [t.strip() for t in (cfg.lora_targets or "all-linear").split(",")]
    return [
        (cfg.lora_r >= 1, f"--lora-r must be at least 1, got {cfg.lora_r}"),
        (cfg.lora_alpha is not None and cfg.lora_alpha > 0, "--lora-alpha must be > 0"),
        (0 <= cfg.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (all(targets), "--lora-targets must be module names separated by commas, e.g. "
                       "q_proj,v_proj"),
        (importlib.util.find_spec("peft") is not None,
         "--lora-r needs peft: pip install 'direct-align[lora]'"),
    ]  # fmt: skip


def uses_bf16(cfg: TrainConfig) -> bool:
    """Whether training computes in bf16 (``--precision auto``: on a GPU that supports it)."""
    return cfg.precision == "bf16" or (
        cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )


def uses_reference(cfg: TrainConfig) -> bool:
    return not (LOSSES[cfg.loss].reference_free or cfg.reference_free)


def save_yaml(cfg: Any, path: Path) -> None:
    """Write the resolved settings of any command (a dataclass with ``to_dict``)."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
