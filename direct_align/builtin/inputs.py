"""What the built-in task fills in for a command given no ``--model`` or no ``--dataset``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from direct_align.builtin.build import BuiltinAssets, BuiltinSpec, default_cache_dir, ensure_builtin


@dataclass
class Inputs:
    """A command's cache directory, model and data source, and the built-in task if used."""

    cache_dir: Path
    model_path: str
    source: str  # the training data (pairs, or prompts)
    assets: BuiltinAssets | None  # the built-in task, when it fills something in


def resolve_inputs(cfg: Any) -> Inputs:
    """The inputs of a run whose settings have ``cache_dir``, ``model`` and ``dataset`` (and
    optionally ``label_noise``); the built-in task (built once into the cache) fills in
    whatever was not given."""
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    assets = None
    if cfg.model is None or cfg.dataset is None:
        assets = ensure_builtin(cache_dir, BuiltinSpec())
    model_path = cfg.model or str(assets.model_dir)
    source = cfg.dataset or str(assets.train_file(getattr(cfg, "label_noise", 0.0)))
    return Inputs(cache_dir, model_path, source, assets)
