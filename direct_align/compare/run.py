"""`direct-align compare`: the PPO pipeline against the direct losses on the built-in task.

Writes ``OUTPUT_DIR/comparison.json`` (one row per method and strength, with the commands that
produced it), three plots (``frontier.png``, ``reward_vs_time.png``, ``memory.png``) and the run
directories of every stage under ``OUTPUT_DIR/runs``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from direct_align.builtin.build import BuiltinSpec, default_cache_dir, ensure_builtin
from direct_align.compare.execute import StageResult, run_cache, run_stage
from direct_align.compare.plan import Method, plan
from direct_align.compare.settings import CompareConfig
from direct_align.engine.outputs import RunDir
from direct_align.errors import ConfigError

log = logging.getLogger(__name__)


def _above_start(result: StageResult) -> float:
    start = result.summary.get("rss_at_start_mb")
    return round(result.peak_rss_mb - start, 1) if start is not None else float("nan")


def _row(method: Method, results: list[StageResult]) -> dict[str, Any]:
    """One line of the comparison, from the summaries of the method's stages."""
    final = results[-1].summary
    builtin = final["builtin"]
    return {
        "run": method.name, "method": method.method, "strength": method.strength,
        "value": method.value,
        "true_reward": builtin["policy/true_reward"],
        "reference_true_reward": builtin["reference/true_reward"],
        "kl": builtin["policy/kl"],
        "response_tokens": builtin["policy/response_tokens"],
        "wall_s": {r.stage: r.wall_s for r in results},
        "total_wall_s": round(sum(r.wall_s for r in results), 1),
        # per stage: the process's peak, and what models, data and training added to it (the
        # runtime and imports excluded); the last stage is the method's own training
        "peak_rss_mb": {r.stage: r.peak_rss_mb for r in results},
        "peak_above_start_mb": {r.stage: _above_start(r) for r in results},
        "models_in_memory": final.get("models_in_memory", 1),
        "tokens_generated": final.get("tokens_generated", 0),
        "commands": [r.command for r in results],
    }  # fmt: skip


def replot(output_dir: str) -> dict[str, Any]:
    """Redraw the plots of a finished comparison from its ``comparison.json``."""
    from direct_align.compare.plots import write_plots

    path = Path(output_dir) / "comparison.json"
    if not path.is_file():
        raise ConfigError(f"--plots-only: no comparison.json in '{output_dir}'")
    result = json.loads(path.read_text())
    result["plots"] = [str(p) for p in write_plots(result["rows"], result.get("reward_model"),
                                                     Path(output_dir))]  # fmt: skip
    return result


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every planned method (or those named in ``cfg.only``) and write the table and plots."""
    started = time.time()
    quick, seed, overwrite = cfg.quick, cfg.seed, cfg.overwrite
    run = RunDir(cfg.output_dir)
    run.check(resume=False, overwrite=overwrite, resumable=False)
    shared_rm, methods = plan(quick, seed)
    if cfg.only:
        methods = [m for m in methods if m.method in cfg.only]
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    build_start = time.time()
    ensure_builtin(cache_root, BuiltinSpec())  # the SFT stage, shared by every method
    sft_s = round(time.time() - build_start, 1)
    run.prepare(overwrite=overwrite, checkpoints=False)
    runs, caches = run.path / "runs", run.path / "cache"
    runs.mkdir()

    group = cfg.wandb_group or run.path.name
    rm_result: StageResult | None = None
    rows = []
    for i, method in enumerate(methods, 1):
        log.info("compare: [%d/%d] %s", i, len(methods), method.name)
        results = []
        for stage in method.stages:
            if stage == shared_rm:
                if rm_result is None:
                    cache = run_cache(caches, "reward_model", cache_root / "builtin")
                    tracking = _tracking(cfg, group, "reward-model", {"method": "reward-model"})
                    rm_result = run_stage(stage, runs / "reward_model", cache, tracking)
                results.append(rm_result)
                continue
            extra = ()
            if stage.name in ("ppo", "online"):  # both learn from the shared reward model
                flag = "--reward-model" if stage.name == "ppo" else "--reward"
                extra = (flag, str(Path(rm_result.output_dir) / "final"))
            cache = run_cache(caches, method.name, cache_root / "builtin")
            tracking = _tracking(cfg, group, method.name, {
                "method": method.method, "strength": method.strength, "value": method.value})  # fmt: skip
            results.append(run_stage(stage, runs / method.name, cache, (*extra, *tracking)))
        rows.append(_row(method, results))
        r = rows[-1]
        log.info("compare: %s true reward %.3f, KL %.2f, %.0f s, peak %.0f MB", method.name,
                 r["true_reward"], r["kl"], r["total_wall_s"], r["peak_rss_mb"][method.stages[-1].name])  # fmt: skip

    result = {
        "quick": quick, "seed": seed, "rows": rows,
        "reward_model": None if rm_result is None else {
            "wall_s": rm_result.wall_s, "peak_rss_mb": rm_result.peak_rss_mb,
            "peak_above_start_mb": _above_start(rm_result), "command": rm_result.command,
            "eval": rm_result.summary["final"], "hidden_reward": rm_result.summary.get("builtin")},
        "sft": {"stage": "built-in base model (shared by every method)",
                "wall_s": sft_s if sft_s > 5 else "cached"},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "platform": platform.platform(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "runtime_s": round(time.time() - started, 1),
    }  # fmt: skip
    run.write_json("comparison.json", result)
    from direct_align.compare.plots import write_plots  # matplotlib only when plotting

    result["plots"] = [str(p) for p in write_plots(rows, result["reward_model"], run.path)]
    run.write_json("comparison.json", result)
    if cfg.report_to == "wandb":
        _report(cfg, group, result, run.path)
    return result


def _tracking(cfg: CompareConfig, group: str, name: str, keys: dict[str, Any]) -> tuple[str, ...]:
    """The flags that put one stage's run into the comparison's W&B group, with the keys that
    W&B's grouping and parallel-coordinates views sort by (none without --report-to wandb)."""
    if cfg.report_to != "wandb":
        return ()
    flags = ["--report-to", "wandb", "--wandb-group", group, "--run-name", name]
    flags += [f for k, v in keys.items() for f in ("--wandb-config", f"{k}={v}")]  # seed: in each
    if cfg.wandb_project:
        flags += ["--wandb-project", cfg.wandb_project]
    for tag in cfg.wandb_tags:
        flags += ["--wandb-tags", tag]
    return tuple(flags)


def _report(cfg: CompareConfig, group: str, result: dict[str, Any], output_dir: Path) -> None:
    """The comparison's own W&B run, in its group: the table and the plots."""
    from direct_align.engine.tracking import Tracker

    keep = ("run", "method", "strength", "value", "true_reward", "reference_true_reward", "kl",
            "response_tokens", "total_wall_s", "models_in_memory", "tokens_generated")  # fmt: skip
    table = [{k: r[k] for k in keep} | {"peak_rss_mb": list(r["peak_rss_mb"].values())[-1]}
             for r in result["rows"]]  # fmt: skip
    cfg = dataclasses.replace(cfg, wandb_group=group)  # the summary run joins its runs' group
    tracker = Tracker(output_dir, cfg, config={"quick": cfg.quick, "seed": cfg.seed,
                                               "only": cfg.only, "machine": result["machine"]},
                      name=cfg.run_name or f"{group}-summary", jsonl=False)  # fmt: skip
    try:
        tracker.log_table("comparison", table, 0)
        tracker.log_images({Path(p).stem: Path(p) for p in result["plots"]}, 0)
        tracker.summary({"runtime_s": result["runtime_s"]})
    finally:
        tracker.close()
