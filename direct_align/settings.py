"""Building blocks of the settings of commands other than `train` (`train-rm`, `ppo`).

A setting that means the same as in `direct-align train` is declared with :func:`same`: it takes
that command's name, type, help and choices (optionally another default), so a flag has one
source. Settings of the command's own are declared with :func:`own` and typed in the command's
``own_types``. :class:`Fields` then parses and checks values the way :mod:`direct_align.config`
does, with the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import field
from pathlib import Path
from typing import Any

from direct_align.config import FIELDS, _base_type, coerce, parse_bool
from direct_align.errors import ConfigError

_KEEP = object()


def same(name: str, default: Any = _KEEP, help: str | None = None) -> Any:
    """The field ``name`` of :class:`~direct_align.config.TrainConfig`, optionally with another
    default or help text."""
    shared = FIELDS[name]
    metadata = {"help": help or shared.metadata["help"], "choices": shared.metadata["choices"]}
    return field(default=shared.default if default is _KEEP else default, metadata=metadata)


def own(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field of the command's own (its type goes in the command's ``own_types``)."""
    return field(default=default, metadata={"help": help, "choices": choices})


class Fields:
    """Parsing of one command's settings: shared fields as `train` parses them, own fields by
    ``own_types`` (``name → type``; a field whose default is None may be left empty)."""

    def __init__(self, config_cls: type, own_types: dict[str, type]) -> None:
        self.config_cls = config_cls
        self.fields = {f.name: f for f in dataclasses.fields(config_cls)}
        self.own_types = own_types

    def base_type(self, name: str) -> type:
        """The type a flag's value is parsed to (``X`` of ``X | None``)."""
        return self.own_types.get(name) or _base_type(name)

    def coerce(self, name: str, value: Any, where: str) -> Any:
        """Convert ``value`` to the type of field ``name``, as :func:`direct_align.config.coerce`."""
        if name not in self.own_types:
            return coerce(name, value, where)
        tp = self.own_types[name]
        if value is None and self.fields[name].default is None:
            return None
        try:
            if tp is bool:
                return parse_bool(value)
            if isinstance(value, bool) or (tp is int and isinstance(value, float)):
                raise ValueError
            value = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: '{name}' must be {tp.__name__}, got {value!r}") from None
        choices = self.fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"unknown {name} '{value}' (choose from {', '.join(choices)})")
        return value

    def resolve(self, cli: dict[str, Any], preset: dict[str, Any], run_prefix: str) -> Any:
        """A config from the field defaults, under ``preset`` (the built-in task's recipe, only
        when neither ``model`` nor ``dataset`` is given), under the CLI values (None: not
        given); the output directory defaults to ``runs/PREFIX-TIMESTAMP``. Not yet validated."""
        explicit = {k: self.coerce(k, v, "--" + k.replace("_", "-"))
                    for k, v in cli.items() if v is not None}  # fmt: skip
        builtin = explicit.get("model") is None and explicit.get("dataset") is None
        cfg = self.config_cls(**{**(preset if builtin else {}), **explicit})
        if cfg.output_dir is None:
            cfg.output_dir = str(Path("runs") / f"{run_prefix}-{time.strftime('%Y%m%d-%H%M%S')}")
        return cfg


def shared_checks(cfg: Any) -> list[tuple[bool, str]]:
    """`train`'s checks of the shared settings that ``cfg`` has, as (ok, message) pairs."""
    get = lambda name, fallback: getattr(cfg, name, fallback)  # noqa: E731
    return [
        (get("max_length", 2) >= 2, f"--max-length must be at least 2, got {get('max_length', 2)}"),
        (get("max_prompt_length", None) is None or cfg.max_prompt_length >= 1,
         "--max-prompt-length must be at least 1"),
        (get("batch_size", 1) >= 1, "--batch-size must be at least 1"),
        (get("eval_batch_size", None) is None or cfg.eval_batch_size >= 1,
         "--eval-batch-size must be ≥ 1"),
        (get("grad_accum", 1) >= 1, "--grad-accum must be at least 1"),
        (get("epochs", 1) >= 1, "--epochs must be at least 1"),
        (get("max_steps", None) is None or cfg.max_steps >= 1, "--max-steps must be at least 1"),
        (get("learning_rate", 1) > 0, "--learning-rate must be > 0"),
        (get("weight_decay", 0) >= 0, "--weight-decay must be ≥ 0"),
        (0 <= get("warmup_ratio", 0) < 1, "--warmup-ratio must be in [0, 1)"),
        (get("max_grad_norm", 0) >= 0, "--max-grad-norm must be ≥ 0"),
        (0 < get("eval_fraction", 0.5) < 1, "--eval-fraction must be in (0, 1)"),
        (get("eval_every", 0) >= 0, "--eval-every must be ≥ 0"),
        (get("log_every", 1) >= 1, "--log-every must be at least 1"),
        (0 <= get("label_noise", 0) < 0.5, "--label-noise must be in [0, 0.5)"),
        (get("eval_prompts", 1) >= 1, "--eval-prompts must be at least 1"),
    ]  # fmt: skip


def check_all(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise :class:`ConfigError` with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
