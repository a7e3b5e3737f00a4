"""The one settings system: each setting declared once, one coercer, one rule table, YAML.

A setting is a :class:`Setting` (type, default, help, choices, rule), declared once: the ones that
several commands read are in :mod:`direct_align.settings`, a command's own in its package. Each
command's settings are a dataclass whose fields come from those declarations
(``batch_size: int = BATCH_SIZE.field(default=32)``); the CLI builds its flags from the fields.

:func:`resolve` merges, lowest first: the field defaults < the built-in task's preset (applied only
when neither ``model`` nor ``dataset`` is given) < ``--config FILE`` < command-line flags. Every
value passes :func:`coerce` (its type, its choices, its rule) where it comes from, so an error
names the flag (``--batch-size must be at least 1, got 0``) or the file and line
(``c.yaml:3: batch_size must be at least 1, got 0``); then the command's cross-setting checks run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import yaml

from direct_align.errors import ConfigError

# --- rules: what a value must satisfy, in words the messages reuse --------------------------


@dataclass(frozen=True)
class Rule:
    """A test of one value and what it demands, e.g. ``must be at least 1``."""

    test: Callable[[Any], bool]
    demand: str


def at_least(n: float) -> Rule:
    return Rule(lambda v: v >= n, f"must be at least {n}")


def above(n: float) -> Rule:
    return Rule(lambda v: v > n, f"must be > {n}")


def within(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = True) -> Rule:
    """``lo ≤ v < hi`` by default; brackets as in the message (``must be in [0, 1)``)."""
    brackets = ("(" if open_lo else "[") + "{}, {}" + (")" if open_hi else "]")

    def test(v: float) -> bool:
        return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)

    return Rule(test, "must be in " + brackets.format(_num(lo), _num(hi)))


NON_NEGATIVE = Rule(lambda v: v >= 0, "must be ≥ 0")
POSITIVE = above(0)


def _num(x: float) -> str:
    return f"{x:g}"


# --- settings ------------------------------------------------------------------------------

_KEEP: Any = object()


@dataclass(frozen=True)
class Setting:
    """One setting: its type (``int``, ``float``, ``str``, ``bool``, or ``list`` for a repeatable
    text option), default, one-line help, allowed values, rule, and whether ``--resume`` may
    change it. A default of None means "not set" (the help says what that does)."""

    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    rule: Rule | None = None
    resumable: bool = False  # may differ between a run and its --resume

    def field(self, default: Any = _KEEP, *, help: str | None = None) -> Any:
        """A dataclass field for this setting, optionally with another default or help text."""
        setting = dataclasses.replace(self, default=self.default if default is _KEEP else default,
                                      help=help or self.help)  # fmt: skip
        if self.type is list:
            return dataclasses.field(default_factory=list, metadata={"setting": setting})
        return dataclasses.field(default=setting.default, metadata={"setting": setting})

    @property
    def optional(self) -> bool:
        return self.default is None


def setting_of(f: dataclasses.Field) -> Setting:
    return f.metadata["setting"]


def settings_of(cls: type) -> dict[str, Setting]:
    """``{field name: Setting}`` of a command's settings dataclass."""
    return {f.name: setting_of(f) for f in dataclasses.fields(cls)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- the coercer ---------------------------------------------------------------------------

_KINDS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def parse_bool(value: Any) -> bool:
    """``value`` as a bool: a bool, or true/false/yes/no text; ValueError otherwise."""
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    if not isinstance(value, bool):
        raise ValueError
    return value


def _convert(tp: type, value: Any) -> Any:
    """``value`` as ``tp`` or ValueError: integers may be written 3, "3", 3.0 or "1e3"; numbers
    must be finite; booleans are never numbers; text is any scalar."""
    if tp is bool:
        return parse_bool(value)
    if isinstance(value, bool | list | dict | tuple):
        raise ValueError
    if tp is int:
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, int | float) or not math.isfinite(number) or number != int(number):
            raise ValueError
        return int(number)
    if tp is float:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    return str(value)


def coerce(setting: Setting, value: Any, subject: str) -> Any:
    """``value`` converted to ``setting``'s type and checked against its choices and rule.

    ``subject`` starts the message: a flag (``--batch-size``) or ``FILE:LINE: name``.
    """
    if value is None:
        if setting.optional:
            return None
        raise ConfigError(f"{subject} cannot be empty")
    if setting.type is list:  # a repeatable option: one value or a list of them
        items = list(value) if isinstance(value, list | tuple) else [value]
        for item in items:
            if not isinstance(item, str | int | float) or isinstance(item, bool) or item == "":
                raise ConfigError(f"{subject}: each value must be text, got {item!r}")
            if setting.choices and str(item) not in setting.choices:
                raise ConfigError(f"{subject} must be one of {', '.join(setting.choices)}; got "
                                  f"'{item}'")  # fmt: skip
        return [str(item) for item in items]
    try:
        converted = _convert(setting.type, value)
    except (TypeError, ValueError, OverflowError):
        kind = _KINDS[setting.type] + (" (finite)" if setting.type in (int, float) else "")
        raise ConfigError(f"{subject} must be {kind}, got {value!r}") from None
    if setting.choices and converted not in setting.choices:
        close = difflib.get_close_matches(str(converted), setting.choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{subject} must be one of {', '.join(setting.choices)}; got "
                          f"'{converted}'{hint}")  # fmt: skip
    if setting.rule is not None and not setting.rule.test(converted):
        raise ConfigError(f"{subject} {setting.rule.demand}, got {converted!r}")
    return converted


# --- YAML ----------------------------------------------------------------------------------


def _unknown(name: str, known: Iterable[str], subject: str,
             foreign: dict[str, str] | None = None) -> ConfigError:  # fmt: skip
    if foreign and name in foreign:  # another tool's name for one of ours
        return ConfigError(f"{subject}'{name}' is TRL's name; here it is {foreign[name]}")
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{subject}unknown setting '{name}'{hint}")


def load_yaml(path: str, cls: type) -> dict[str, Any]:
    """A YAML mapping of ``cls``'s settings (keys as the flags, ``-`` or ``_``), each coerced;
    every error is one line naming the file and, where there is one, the line."""
    p = Path(path)
    try:
        text = p.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
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
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        line = key_node.start_mark.line + 1
        key = str(key_node.value)
        if key.replace("-", "_") in lines:
            raise ConfigError(f"{path}:{line}: '{key}' is set twice")
        lines[key.replace("-", "_")] = line
    settings = settings_of(cls)
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        where = f"{path}:{lines[name]}: "
        if name not in settings:
            raise _unknown(name, settings, where, getattr(cls, "foreign_names", None))
        values[name] = coerce(settings[name], value, f"{where}{name}")
    return values


# --- resolving a command's settings ----------------------------------------------------------


class CommandSettings(Protocol):
    """What :func:`resolve` needs of a command's settings dataclass."""

    builtin_preset: ClassVar[dict[str, Any]]
    foreign_names: ClassVar[dict[str, str]]  # other tools' names for settings (optional)

    def complete(self) -> None:
        """Fill in the defaults computed from other settings (e.g. β from the loss)."""

    def checks(self) -> list[tuple[bool, str]]:
        """(ok, message) for every rule between settings."""


S = TypeVar("S", bound=CommandSettings)


def resolve(cls: type[S], flags: dict[str, Any], config_file: str | None = None) -> S:
    """``cls``'s settings from defaults, its built-in preset, ``config_file`` and ``flags``
    (None or an empty tuple: not given), completed and checked."""
    settings = settings_of(cls)
    explicit = load_yaml(config_file, cls) if config_file else {}
    for name, value in flags.items():
        if value is None or value == ():
            continue
        if name not in settings:
            raise _unknown(name, settings, "")
        explicit[name] = coerce(settings[name], value, flag(name))
    builtin = explicit.get("model") is None and explicit.get("dataset") is None
    cfg = cls(**{**(cls.builtin_preset if builtin else {}), **explicit})
    cfg.complete()
    check_all(cfg.checks())
    return cfg


def check_all(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise :class:`ConfigError` with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The settings as plain values (what ``config.yaml`` holds)."""
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: Path) -> None:
    """Write the resolved settings of any command."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
