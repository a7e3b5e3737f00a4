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


def _unpaired(cfg: Any) -> bool:
    from direct_align.losses import LOSSES

    loss = getattr(cfg, "loss", None)
    return loss in LOSSES and LOSSES[loss].unpaired and hasattr(cfg, "thumbs_threshold")


def resolve_inputs(cfg: Any) -> Inputs:
    """The inputs of a run whose settings have ``cache_dir``, ``model`` and ``dataset`` (and
    optionally ``label_noise`` and ``train_pairs``); the built-in task (built once into the cache) fills in
    whatever was not given: its pairs, or with an unpaired loss its samples labelled by
    ``thumbs_threshold``."""
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    assets = None
    if cfg.model is None or cfg.dataset is None:
        assets = ensure_builtin(cache_dir, BuiltinSpec())
    model_path = cfg.model or str(assets.model_dir)
    noise = getattr(cfg, "label_noise", 0.0)
    if cfg.dataset is None and _unpaired(cfg):  # thumbs up or down on the task's samples
        source = str(assets.thumbs_file(cfg.thumbs_threshold, noise))
    else:
        source = cfg.dataset or str(assets.train_file(noise, getattr(cfg, "train_pairs", 0)))
    return Inputs(cache_dir, model_path, source, assets)
