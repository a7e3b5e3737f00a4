"""Settings of `direct-align evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from direct_align import settings as s
from direct_align.config import Setting, at_least
from direct_align.preference import settings as p

BUILTIN_NEW_TOKENS = 40  # the built-in task's responses, as its training reports sample them


@dataclass
class EvaluateConfig(s.TrackerSettings):
    """Settings of `direct-align evaluate`."""

    model: str | None = s.MODEL.field(help="The trained model: a Hugging Face directory (a run's "
                                           "final/), whole or a LoRA adapter.")  # fmt: skip
    ref_model: str | None = p.REF_MODEL.field(help="Its reference (default: the base it was "
                                                   "trained from: an adapter's base model, or "
                                                   "the base_model of final/README.md).")  # fmt: skip
    prompts: str | None = Setting(str, None, "Held-out prompts: a file with a 'prompt' column, or "
                                             "the prompts of a preference file in any format "
                                             "train reads (default: the built-in task's "
                                             "held-out prompts).").field()  # fmt: skip
    split: str = s.SPLIT.field()
    format: str = s.FORMAT.field(help="Format of a preference file given as --prompts.")
    max_prompts: int | None = Setting(int, None, "Evaluate on the first N distinct prompts "
                                                 "(default: all; the built-in task: 128, as "
                                                 "train reports).", rule=at_least(1)).field()  # fmt: skip
    reward: list[str] = p.REWARD.field(help="Judge of both models' samples, SPEC[=WEIGHT]: "
                                            "builtin (the built-in task's hidden reward), "
                                            "module:function, path.py:function or a reward-model "
                                            "directory; repeat for a weighted sum (default on "
                                            "the built-in task's prompts: builtin).")  # fmt: skip
    reward_model: str | None = Setting(str, None, "A reward-model directory as the judge (the "
                                                  "same as --reward DIR).").field()  # fmt: skip
    max_new_tokens: int | None = s.MAX_NEW_TOKENS.field(default=None, help="Most tokens per "
                                                        "sampled response (default: 128; the "
                                                        "built-in task: 40).")  # fmt: skip
    temperature: float = s.TEMPERATURE.field()
    top_p: float = p.TOP_P.field(help="Nucleus sampling mass (1: off).")
    max_length: int = s.MAX_LENGTH.field(help="Most tokens a judging reward model reads; a prompt "
                                              "keeps its last max_length // 2 tokens unless "
                                              "--max-prompt-length says otherwise.")  # fmt: skip
    max_prompt_length: int | None = s.MAX_PROMPT_LENGTH.field()
    batch_size: int = s.BATCH_SIZE.field(default=64, help="Prompts per generate call.")
    precision: str = s.PRECISION.field()
    seed: int = s.SEED.field(help="Seed of sampling (the same seed samples the same responses).")
    output_dir: str | None = s.OUTPUT_DIR.field(help="Where evaluation.json and generations.jsonl "
                                                     "go (default: runs/evaluate-TIMESTAMP).")  # fmt: skip
    overwrite: bool = s.OVERWRITE.field()
    cache_dir: str | None = s.CACHE_DIR.field()

    builtin_preset: ClassVar[dict[str, Any]] = {}

    def complete(self) -> None:
        s.complete_output_dir(self, "evaluate")
        if self.reward_model is not None:
            self.reward = [*(self.reward or []), self.reward_model]
        if self.prompts is None:  # the built-in task's held-out prompts, as train reports them
            self.reward = self.reward or ["builtin"]
            self.max_prompts = self.max_prompts or s.EVAL_PROMPTS.default
            self.max_new_tokens = self.max_new_tokens or BUILTIN_NEW_TOKENS
        self.max_new_tokens = self.max_new_tokens or s.MAX_NEW_TOKENS.default

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.model is not None, "--model is required: the trained model to evaluate (a "
                                     "run's final/ directory)"),
            (bool(self.reward), "--prompts needs a judge of the samples: --reward SPEC or "
                                "--reward-model DIR (see --help)"),
            (self.reward_model is None or Path(self.reward_model).expanduser().is_dir(),
             f"--reward-model '{self.reward_model}': not a directory"),
            *s.tracker_checks(self),
        ]  # fmt: skip
