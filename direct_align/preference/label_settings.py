"""Settings of `direct-align label` and `direct-align select` (see :mod:`.label`).

Settings that mean the same as in `direct-align train` are the same declarations, with the same
name, type, help, choices and rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from direct_align import settings as s
from direct_align.config import Setting, at_least
from direct_align.losses import LOSSES
from direct_align.preference import settings as p

OUTPUT = Setting(str, None, "Where to write the rows (.jsonl).")
# the built-in task's lengths
_BUILTIN = {"max_new_tokens": 40, "max_length": 64}


def output_checks(cfg: Any) -> list[tuple[bool, str]]:
    """``--output`` is a .jsonl file that is new, or replaced with --overwrite."""
    return [
        (cfg.output is not None, "--output is required (a .jsonl file)"),
        (cfg.output is None or cfg.output.endswith(".jsonl"),
         f"--output: '{cfg.output}' must end in .jsonl"),
        (cfg.output is None or cfg.overwrite or not Path(cfg.output).exists(),
         f"--output: '{cfg.output}' exists; pass --overwrite to replace it"),
    ]  # fmt: skip


@dataclass
class LabelConfig(s.TrackerSettings):
    """Settings of `direct-align label`."""

    output: str | None = OUTPUT.field()
    model: str | None = s.MODEL.field(help="Policy that samples: a HF causal LM directory or hub "
                                           "name (default: the built-in base model).")  # fmt: skip
    dataset: str | None = s.DATASET.field(help="Prompts: a dataset with a 'prompt' column "
                                               "(default: the built-in task's).")  # fmt: skip
    split: str = s.SPLIT.field()
    max_prompts: int | None = Setting(int, None, "Label only the first N prompts.",
                                      rule=at_least(1)).field()  # fmt: skip
    reward: list[str] = p.REWARD.field()
    samples_per_prompt: int = p.SAMPLES_PER_PROMPT.field()
    temperature: float = s.TEMPERATURE.field()
    top_p: float = p.TOP_P.field()
    max_new_tokens: int = s.MAX_NEW_TOKENS.field()
    pair_margin: float | None = p.PAIR_MARGIN.field()
    length_penalty: float = p.LENGTH_PENALTY.field()
    eos_penalty: float = p.EOS_PENALTY.field()
    max_length: int = s.MAX_LENGTH.field()
    max_prompt_length: int | None = s.MAX_PROMPT_LENGTH.field()
    batch_size: int = s.BATCH_SIZE.field(default=64, help="Prompts per generate call.")
    seed: int = s.SEED.field()
    overwrite: bool = s.OVERWRITE.field(help="Replace an existing output file.")
    cache_dir: str | None = s.CACHE_DIR.field()

    builtin_preset: ClassVar[dict[str, Any]] = _BUILTIN

    def complete(self) -> None:
        pass

    def checks(self) -> list[tuple[bool, str]]:
        return [*output_checks(self), *s.tracker_checks(self)]


@dataclass
class SelectConfig(s.TrackerSettings):
    """Settings of `direct-align select`."""

    output: str | None = OUTPUT.field()
    model: str | None = s.MODEL.field(help="Policy: a HF causal LM directory or hub name "
                                           "(default: the built-in base model).")  # fmt: skip
    ref_model: str | None = p.REF_MODEL.field(help="Its reference (needed unless the loss is "
                                                   "reference-free; default with the built-in "
                                                   "candidates: the built-in base model).")  # fmt: skip
    dataset: str | None = s.DATASET.field(help="Candidate pairs: rows with 'prompt', 'a' and 'b' "
                                               "(default: the built-in task's candidates).")  # fmt: skip
    split: str = s.SPLIT.field()
    top: int | None = Setting(int, None, "Write only the N most uncertain pairs (default: all, "
                                         "ranked).", rule=at_least(1)).field()  # fmt: skip
    loss: str = p.LOSS.field(help="Whose implicit reward measures the margin.")
    beta: float | None = p.BETA.field()
    max_length: int = s.MAX_LENGTH.field()
    max_prompt_length: int | None = s.MAX_PROMPT_LENGTH.field()
    batch_size: int = s.BATCH_SIZE.field(default=32, help="Pairs per forward pass.")
    overwrite: bool = s.OVERWRITE.field(help="Replace an existing output file.")
    cache_dir: str | None = s.CACHE_DIR.field()

    builtin_preset: ClassVar[dict[str, Any]] = {"max_length": _BUILTIN["max_length"]}

    def complete(self) -> None:
        if self.beta is None:
            self.beta = LOSSES[self.loss].default_beta

    def checks(self) -> list[tuple[bool, str]]:
        return [*output_checks(self), *s.tracker_checks(self),
                (not LOSSES[self.loss].unpaired,
                 f"--loss {self.loss} has no margin between two responses to rank pairs by")]  # fmt: skip
