"""Settings of `direct-align label` and `direct-align select` (see :mod:`direct_align.label`).

Settings that mean the same as in `direct-align train` are that command's fields, with the same
name, type, help and choices. Light to import: the CLI reads it to build its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from direct_align.config import FIELDS, _base_type, coerce
from direct_align.errors import ConfigError
from direct_align.losses import LOSSES
from direct_align.settings import own as _own
from direct_align.settings import same as _same

_OUTPUT = "Where to write the rows (.jsonl)."


@dataclass
class LabelConfig:
    """Settings of `direct-align label`."""

    output: str | None = _own(None, _OUTPUT)
    model: str | None = _same("model", help="Policy that samples: a HF causal LM directory or "
                                            "hub name (default: the built-in base model).")  # fmt: skip
    dataset: str | None = _same("dataset", help="Prompts: a dataset with a 'prompt' column "
                                                "(default: the built-in task's).")  # fmt: skip
    split: str = _same("split")
    max_prompts: int | None = _own(None, "Label only the first N prompts.")
    reward: list[str] = field(default_factory=list, metadata=FIELDS["reward"].metadata)
    samples_per_prompt: int = _same("samples_per_prompt")
    temperature: float = _same("temperature")
    top_p: float = _same("top_p")
    max_new_tokens: int = _same("max_new_tokens")
    pair_margin: float | None = _same("pair_margin")
    length_penalty: float = _same("length_penalty")
    eos_penalty: float = _same("eos_penalty")
    max_length: int = _same("max_length")
    max_prompt_length: int | None = _same("max_prompt_length")
    batch_size: int = _same("batch_size", 64, "Prompts per generate call.")
    seed: int = _same("seed")
    overwrite: bool = _same("overwrite", help="Replace an existing output file.")
    cache_dir: str | None = _same("cache_dir")


@dataclass
class SelectConfig:
    """Settings of `direct-align select`."""

    output: str | None = _own(None, _OUTPUT)
    model: str | None = _same("model", help="Policy: a HF causal LM directory or hub name "
                                            "(default: the built-in base model).")  # fmt: skip
    ref_model: str | None = _same("ref_model", help="Its reference (needed unless the loss is "
                                                    "reference-free; default with the built-in "
                                                    "candidates: the built-in base model).")  # fmt: skip
    dataset: str | None = _same("dataset", help="Candidate pairs: rows with 'prompt', 'a' and "
                                                "'b' (default: the built-in task's candidates).")  # fmt: skip
    split: str = _same("split")
    top: int | None = _own(None, "Write only the N most uncertain pairs (default: all, ranked).")
    loss: str = _same("loss", help="Whose implicit reward measures the margin.")
    beta: float | None = _same("beta")
    max_length: int = _same("max_length")
    max_prompt_length: int | None = _same("max_prompt_length")
    batch_size: int = _same("batch_size", 32, "Pairs per forward pass.")
    overwrite: bool = _same("overwrite", help="Replace an existing output file.")
    cache_dir: str | None = _same("cache_dir")


OWN_TYPES = {"output": str, "max_prompts": int, "top": int}
BUILTIN = {"max_new_tokens": 40, "max_length": 64}  # the built-in task's lengths


def base_type(name: str) -> type:
    return OWN_TYPES.get(name) or _base_type(name)


def resolve_command(cls: type, cli: dict[str, Any]) -> Any:
    """A LabelConfig or SelectConfig from CLI values (None or (): not given), checked."""
    values = {}
    for name, value in cli.items():
        if value is None or value == ():
            continue
        flag = "--" + name.replace("_", "-")
        if name in OWN_TYPES:
            try:
                value = OWN_TYPES[name](value)
            except ValueError:
                raise ConfigError(f"{flag}: must be {OWN_TYPES[name].__name__}, got {value!r}") from None
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"{flag} must be at least 1")
        else:
            value = coerce(name, value, flag)
        values[name] = value
    builtin = values.get("model") is None and values.get("dataset") is None
    names = {f.name for f in fields(cls)}
    cfg = cls(**{**{k: v for k, v in BUILTIN.items() if builtin and k in names}, **values})
    if cfg.output is None:
        raise ConfigError("--output is required (a .jsonl file)")
    if not cfg.output.endswith(".jsonl"):
        raise ConfigError(f"--output: '{cfg.output}' must end in .jsonl")
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise ConfigError(f"--output: '{cfg.output}' exists; pass --overwrite to replace it")
    if isinstance(cfg, LabelConfig):
        from direct_align.config import TrainConfig, online_checks

        shared = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in OWN_TYPES}
        for ok, message in online_checks(TrainConfig(**shared)):
            if not ok:
                raise ConfigError(message)
    elif cfg.beta is None:
        cfg.beta = LOSSES[cfg.loss].default_beta
    return cfg
