"""Settings of `direct-align train` (offline and ``--online``), and the ones of the preference
family that `label` and `select` share with it.

Precedence, lowest first: field defaults < the built-in task's preset (only when no ``--model`` and
no ``--dataset`` are given) < ``--config FILE`` < command-line flags (:func:`direct_align.config.resolve`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from direct_align import settings as s
from direct_align.config import NON_NEGATIVE, POSITIVE, Setting, at_least, within
from direct_align.group_losses import GROUP_LOSSES, GroupLossSpec
from direct_align.losses import LOSSES, LossSpec

log = logging.getLogger(__name__)

ATTENTION = ("auto", "segments", "flash", "varlen", "sdpa", "eager")
SEGMENT_ATTENTION = ("segments", "flash", "varlen")  # read the row's segments: packed layouts only
LAYOUTS = ("shared", "packed", "padded")
LORA_SAVE = ("adapter", "merged")

# --- the loss --------------------------------------------------------------------------------------
LOSS = Setting(str, "dpo", "Preference loss; rebel, lipo, sppo and rloo learn from each "
                           "prompt's k judged samples with --online.",
               (*LOSSES, *GROUP_LOSSES))  # fmt: skip
BETA = Setting(float, None, "Loss strength β (ORPO: λ); default: the loss's own default.",
               rule=POSITIVE)  # fmt: skip
LABEL_SMOOTHING = Setting(float, 0.0, "Label-noise rate ε for dpo (conservative DPO), robust, simpo.",
                          rule=within(0, 0.5))  # fmt: skip
GAMMA = Setting(float, 0.5, "SimPO target reward margin γ.")
REFERENCE_FREE = Setting(bool, False, "dpo/ipo/hinge/robust without a reference (skips the pass).")
REF_MODEL = Setting(str, None, "Reference model (default: the initial policy).")

# --- sampling and judging (online and label) -------------------------------------------------------
SAMPLES_PER_PROMPT = Setting(int, 2, "Online/label: responses sampled per prompt (k ≥ 2).",
                             rule=at_least(2))  # fmt: skip
TOP_P = Setting(float, 1.0, "Online/label: nucleus sampling mass (1: off).",
                rule=within(0, 1, open_lo=True, open_hi=False))  # fmt: skip
REWARD = Setting(list, None, "Online/label: a judge, SPEC[=WEIGHT]: builtin, module:function, "
                             "path.py:function or a reward-model directory; repeat for a weighted "
                             "sum (default: builtin on the built-in task).")  # fmt: skip
PAIR_MARGIN = Setting(float, None, "Online/label: pair every two responses to a prompt whose "
                                   "rewards differ by more than this (default: the best against "
                                   "the worst only).", rule=NON_NEGATIVE)  # fmt: skip
LENGTH_PENALTY = Setting(float, 0.0, "Online/label: subtracted from a reward per response token.",
                         rule=NON_NEGATIVE)  # fmt: skip
EOS_PENALTY = Setting(float, 0.0, "Online/label: subtracted from the reward of a response cut off "
                                  "before EOS.", rule=NON_NEGATIVE)  # fmt: skip
_ONLINE_SAMPLING = "Online/label: "


@dataclass
class TrainConfig(s.PairDataSettings, s.BatchSettings, s.OptimSettings, s.RunSettings):
    """Resolved settings of one training run (written to ``OUTPUT_DIR/config.yaml``): the
    objective, models, LoRA and online settings below, and the shared groups of
    :mod:`direct_align.settings` (data, batches, optimiser, run)."""

    # --- objective ---------------------------------------------------------------------------
    loss: str = LOSS.field()
    beta: float | None = BETA.field()
    label_smoothing: float = LABEL_SMOOTHING.field()
    gamma: float = GAMMA.field()
    eta: float | None = Setting(float, None, "rebel, sppo: step size η of the update they "
                                             "regress on (π_t+1 ∝ π_t·exp(η·reward)); "
                                             "default 1.", rule=POSITIVE).field()  # fmt: skip
    rpo_alpha: float = Setting(float, 0.0, "Add this weight times the chosen response's per-token "
                                           "NLL to each pair's loss (RPO); 0: off.",
                               rule=NON_NEGATIVE).field()  # fmt: skip
    reference_free: bool = REFERENCE_FREE.field()
    desirable_weight: float = Setting(float, 1.0, "KTO: weight λ_D of desirable examples.",
                                      rule=POSITIVE).field()  # fmt: skip
    undesirable_weight: float | None = Setting(
        float, None, "KTO: weight λ_U of undesirable examples (default: n_desirable / "
        "n_undesirable of the training data times λ_D, so both kinds weigh the same).",
        rule=POSITIVE).field()  # fmt: skip
    unpaired_from_pairs: bool = Setting(bool, False, "Read preference pairs as unpaired feedback "
                                                     "for --loss kto: chosen desirable, rejected "
                                                     "undesirable.").field()  # fmt: skip
    # --- models ------------------------------------------------------------------------------
    model: str | None = s.MODEL.field()
    ref_model: str | None = REF_MODEL.field()
    attn: str = Setting(str, "auto", "Attention over packed rows: per-sequence SDPA (segments), "
                                     "the flash-attn or PyTorch varlen kernels on a GPU (flash, "
                                     "varlen), or the model's sdpa/eager with masks. auto: flash > "
                                     "varlen > segments, as available (segments on a CPU).",
                        ATTENTION).field()  # fmt: skip
    layout: str = Setting(str, "shared", "Batch layout: shared prompts without padding, packed "
                                         "sequences without padding, or padded rows.",
                          LAYOUTS).field()  # fmt: skip
    chunked_logprobs: bool = Setting(bool, True, "LM head on response tokens only, in chunks "
                                                 "recomputed in backward (no [tokens, vocab] "
                                                 "logits).").field()  # fmt: skip
    max_tokens_per_batch: int | None = Setting(int, None, "Fill each micro-batch up to this many "
                                                          "tokens (length-bucketed) instead of "
                                                          "--batch-size pairs.",
                                               rule=at_least(1)).field()  # fmt: skip
    gradient_checkpointing: bool = s.GRADIENT_CHECKPOINTING.field()
    disable_dropout: bool = s.DISABLE_DROPOUT.field()
    # --- LoRA (peft; see docs/lora.md) ---------------------------------------------------------
    lora_r: int | None = Setting(int, None, "Train LoRA adapters of this rank instead of every "
                                            "weight; the reference is then the base model "
                                            "(adapters off), with no second copy (default: off, "
                                            "full fine-tuning).", rule=at_least(1)).field()  # fmt: skip
    lora_alpha: float | None = Setting(float, None, "LoRA scale numerator: adapters add "
                                                    "(alpha / r)·BA (default: 2 × --lora-r).",
                                       rule=POSITIVE).field()  # fmt: skip
    lora_dropout: float = Setting(float, 0.0, "Dropout on the LoRA branch's input.",
                                  rule=within(0, 1)).field()  # fmt: skip
    lora_targets: str | None = Setting(str, None, "Comma-separated module names that get "
                                                  "adapters, e.g. q_proj,v_proj (default: "
                                                  "all-linear, every linear layer of the "
                                                  "decoder).").field()  # fmt: skip
    lora_save: str = Setting(str, "adapter", "final/ holds the adapter (load with peft) or the "
                                             "merged full model.", LORA_SAVE).field()  # fmt: skip
    load_in_4bit: bool = Setting(bool, False, "QLoRA: hold the frozen base in 4-bit NF4 with "
                                              "double quantisation (bitsandbytes through "
                                              "transformers) under the LoRA adapters; the "
                                              "reference is that base, adapters off (needs "
                                              "--lora-r).").field()  # fmt: skip
    output_dir: str | None = s.OUTPUT_DIR.field(help="Run directory (default: runs/LOSS-TIMESTAMP).")
    # --- online DPO (sample, judge, learn; see docs/online.md) ------------------------------
    online: bool = Setting(bool, False, "Online training: each round the policy samples responses "
                                        "to prompts of --dataset (a prompt column), a judge "
                                        "scores them and the policy trains on the pairs.").field()  # fmt: skip
    rounds: int = Setting(int, 8, "Online: rounds of sample → judge → train.",
                          rule=at_least(1)).field()  # fmt: skip
    prompts_per_round: int = Setting(int, 64, "Online: prompts sampled per round.",
                                     rule=at_least(1)).field()  # fmt: skip
    samples_per_prompt: int = SAMPLES_PER_PROMPT.field()
    temperature: float = s.TEMPERATURE.field(help=_ONLINE_SAMPLING + "sampling temperature.")
    top_p: float = TOP_P.field()
    max_new_tokens: int = s.MAX_NEW_TOKENS.field(help=_ONLINE_SAMPLING + "most tokens per "
                                                      "sampled response.")  # fmt: skip
    reward: list[str] = REWARD.field()
    pair_margin: float | None = PAIR_MARGIN.field()
    length_penalty: float = LENGTH_PENALTY.field()
    eos_penalty: float = EOS_PENALTY.field()
    refresh_reference: bool = Setting(bool, False, "Online: each round's reference is the policy "
                                                   "as the round starts (iterative DPO), not the "
                                                   "initial one.").field()  # fmt: skip
    # --- built-in task -----------------------------------------------------------------------
    label_noise: float = s.LABEL_NOISE.field()
    train_pairs: int = s.TRAIN_PAIRS.field()
    eval_reward_model: str | None = s.EVAL_REWARD_MODEL.field()
    eval_prompts: int = s.EVAL_PROMPTS.field()
    eval_prompts_file: str | None = s.EVAL_PROMPTS_FILE.field()
    eval_judge: list[str] = s.EVAL_JUDGE.field()
    thumbs_threshold: float = Setting(float, 0.5, "Built-in task with an unpaired loss (kto): a "
                                                  "sample is desirable when its hidden reward is "
                                                  "above this.", rule=within(0, 1)).field()  # fmt: skip

    # The built-in task's tuned recipe (see docs/builtin.md); under YAML and flags.
    foreign_names: ClassVar[dict[str, str]] = s.TRL_NAMES
    builtin_preset: ClassVar[dict[str, Any]] = {
        "learning_rate": 1e-4,
        "batch_size": 32,
        "epochs": 2,
        "warmup_ratio": 0.1,
        "max_length": 64,
        "eval_every": 50,
        "save_every": 0,
        "max_new_tokens": 40,  # as the task's data and report were sampled
    }

    def complete(self) -> None:
        if self.beta is None:
            self.beta = loss_spec(self.loss).default_beta
        if self.lora_r is not None and self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_r
        s.complete_output_dir(self, self.loss)

    def checks(self) -> list[tuple[bool, str]]:
        attention = []
        if self.attn in ("flash", "varlen"):
            attention = attention_checks(self)
        return [
            (not (self.attn in SEGMENT_ATTENTION and self.layout == "padded"),
             f"--attn {self.attn} needs a packed layout (--layout shared or packed)"),
            *s.run_checks(self),
            *online_checks(self),
            *s.eval_prompts_checks(self, default_judge=self.online),
            (not (self.rpo_alpha and not pairwise(self)),
             f"--rpo-alpha adds the chosen response's NLL to a pair's loss; {self.loss} has no pairs"),
            (self.eta is None or "eta" in loss_spec(self.loss).options,
             f"--eta is the step size of rebel and sppo; --loss {self.loss} has none"),
            (self.loss not in GROUP_LOSSES or self.online,
             f"--loss {self.loss} learns from each prompt's k judged samples: add --online"),
            *lora_checks(self),
            *attention,
            (not (loss_spec(self.loss).reference_free and self.ref_model is not None),
             f"--ref-model: {self.loss} is reference-free and uses no reference"),
            (not (self.reference_free and self.ref_model is not None),
             "--ref-model and --reference-free exclude each other"),
            (not (loss_spec(self.loss).unpaired and self.reference_free),
             f"--reference-free: --loss {self.loss} measures each completion against the "
             "reference (its reward is a log-ratio) and needs one"),
            (not self.unpaired_from_pairs or loss_spec(self.loss).unpaired,
             f"--unpaired-from-pairs is for unpaired losses (kto), not --loss {self.loss}"),
        ]  # fmt: skip


def online_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) for the settings that ``--online`` rules out or needs."""
    if not cfg.online:
        return [(not cfg.refresh_reference, "--refresh-reference applies to --online only")]
    return [
        (cfg.max_steps is None, "--max-steps does not apply to --online (use --rounds)"),
        (cfg.max_tokens_per_batch is None,
         "--max-tokens-per-batch does not apply to --online (use --batch-size)"),
        (bool(cfg.reward) or cfg.dataset is None,
         "--online with --dataset needs a judge: --reward SPEC (see --help)"),
        (not (cfg.refresh_reference and not uses_reference(cfg)),
         f"--refresh-reference: {cfg.loss} uses no reference here"),
        (cfg.pair_margin is None or pairwise(cfg),
         f"--pair-margin chooses pairs; --loss {cfg.loss} learns from every sample"),
        (not (cfg.loss in GROUP_LOSSES and cfg.reference_free),
         f"--reference-free: --loss {cfg.loss} decides for itself what it reads"),
    ]  # fmt: skip


def lora_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) for the LoRA settings: they need --lora-r, and peft installed."""
    if cfg.lora_r is None:
        given = [flag for flag, changed in (
            ("--load-in-4bit", cfg.load_in_4bit),
            ("--lora-alpha", cfg.lora_alpha is not None), ("--lora-dropout", cfg.lora_dropout != 0),
            ("--lora-targets", cfg.lora_targets is not None),
            ("--lora-save", cfg.lora_save != "adapter"))
            if changed]  # fmt: skip
        return [(not given, f"{', '.join(given)} needs --lora-r (LoRA is off without it)")]
    targets = [t.strip() for t in (cfg.lora_targets or "all-linear").split(",")]
    return [
        (not (cfg.load_in_4bit and cfg.lora_save == "merged"),
         "--load-in-4bit: the base is held in 4 bits; save the adapter (--lora-save adapter) and "
         "merge it into the full-precision base later"),
        (not cfg.load_in_4bit or importlib.util.find_spec("bitsandbytes") is not None,
         "--load-in-4bit needs bitsandbytes: pip install 'direct-align[memory]'"),
        (not (cfg.load_in_4bit and cfg.weights != "fp32"),
         "--load-in-4bit trains fp32 adapters on a 4-bit base; --weights is for full training"),
        (all(targets), "--lora-targets must be module names separated by commas, e.g. "
                       "q_proj,v_proj"),
        (importlib.util.find_spec("peft") is not None,
         "--lora-r needs peft: pip install 'direct-align[lora]'"),
    ]  # fmt: skip


def attention_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) for --attn flash|varlen: the kernel must exist here, in bf16."""
    from direct_align.models.varlen import unavailable  # imports transformers: only when asked

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = unavailable(cfg.attn, device)
    return [(why is None, f"--attn {cfg.attn} {why}"),
            (s.uses_bf16(cfg), f"--attn {cfg.attn} needs bf16 compute (--precision bf16, or auto "
                             "on a bf16 GPU)")]  # fmt: skip


def loss_spec(name: str) -> LossSpec | GroupLossSpec:
    """The registered pair, unpaired or group loss ``name``."""
    return GROUP_LOSSES[name] if name in GROUP_LOSSES else LOSSES[name]


def pairwise(cfg: TrainConfig) -> bool:
    """Whether the loss trains on pairs (not thumbs, not whole groups)."""
    return not loss_spec(cfg.loss).unpaired and cfg.loss not in GROUP_LOSSES


def uses_reference(cfg: TrainConfig) -> bool:
    return not (loss_spec(cfg.loss).reference_free or cfg.reference_free)


def eval_loss(cfg: TrainConfig) -> tuple[str, float, dict[str, Any]]:
    """(loss, β, options) of the held-out pair evaluation: the training loss where it reads
    pairs or (offline KTO) labelled examples; DPO at the run's β for online KTO and the group
    losses, whose training data the held-out pairs are not (the default β where the loss has
    none: SPPO)."""
    if cfg.loss in LOSSES and not (cfg.online and LOSSES[cfg.loss].unpaired):
        return cfg.loss, cfg.beta, loss_kwargs(cfg)
    uses_beta = getattr(loss_spec(cfg.loss), "uses_beta", True)
    return "dpo", cfg.beta if uses_beta else LOSSES["dpo"].default_beta, {}


def balance_kto(cfg: TrainConfig, labels: list[bool]) -> TrainConfig:
    """``cfg`` with KTO's undesirable weight filled in when not set: λ_U = λ_D·n_D / n_U, so that
    desirable and undesirable examples weigh the same in the loss (Ethayarajh et al. 2024, §4
    advise λ_D·n_D / (λ_U·n_U) in [1, 4/3]); a warning when given weights fall outside that."""
    n_desirable = sum(labels)
    n_undesirable = len(labels) - n_desirable
    if not n_desirable or not n_undesirable:
        log.warning("kto: every training example is %s; the loss has nothing to contrast "
                    "it with", "desirable" if n_desirable else "undesirable")  # fmt: skip
        return cfg if cfg.undesirable_weight is not None else replace(cfg, undesirable_weight=1.0)
    if cfg.undesirable_weight is None:
        cfg = replace(cfg, undesirable_weight=cfg.desirable_weight * n_desirable / n_undesirable)
    ratio = cfg.desirable_weight * n_desirable / (cfg.undesirable_weight * n_undesirable)
    log.info("kto: %d desirable, %d undesirable examples; weights %g and %.4g "
             "(λ_D·n_D / λ_U·n_U = %.3f)", n_desirable, n_undesirable, cfg.desirable_weight,
             cfg.undesirable_weight, ratio)  # fmt: skip
    if not 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9:
        log.warning("kto: λ_D·n_D / λ_U·n_U = %.3f is outside [1, 4/3], the range the KTO "
                    "paper advises; leave --undesirable-weight unset to balance it", ratio)  # fmt: skip
    return cfg


def loss_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The extra settings (label_smoothing, gamma, KTO's weights) that the chosen loss accepts."""
    given = {"label_smoothing": cfg.label_smoothing, "gamma": cfg.gamma,
             "desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight}
    options = {k: v for k, v in given.items() if k in loss_spec(cfg.loss).options and v is not None}
    return options | ({"rpo_alpha": cfg.rpo_alpha} if cfg.rpo_alpha else {})
