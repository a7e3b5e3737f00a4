"""`direct-align compare`: the PPO pipeline against the direct losses on the built-in task.

Writes ``OUTPUT_DIR/comparison.json`` (one row per method, strength and seed, with the commands
that produced it and its evaluations along training; the per-run means ± std over seeds; each
method's headline: true reward at matched KL), the plots (``frontier.png``,
``reward_vs_time.png``, ``memory.png``, and on the proxy task ``overoptimisation.png``) and the
run directories of every stage under ``OUTPUT_DIR/runs`` (``runs/seed-N/`` with several seeds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from direct_align.builtin.build import BuiltinSpec, default_cache_dir, ensure_builtin
from direct_align.compare.execute import StageResult, run_cache, run_stage
from direct_align.compare.frontier import aggregate, headline
from direct_align.compare.owndata import OwnData, split_pairs
from direct_align.compare.plan import QUICK, Method, Stage, plan
from direct_align.compare.settings import CompareConfig
from direct_align.engine.outputs import RunDir
from direct_align.engine.tracking import read_metrics
from direct_align.errors import ConfigError
from direct_align.evaluation.report import reward_key

log = logging.getLogger(__name__)


def _above_start(result: StageResult) -> float:
    start = result.summary.get("rss_at_start_mb")
    return round(result.peak_rss_mb - start, 1) if start is not None else float("nan")


def run_curve(output_dir: str, builtin: dict[str, float]) -> list[dict[str, float]]:
    """The run's evaluations on the held-out prompts, in order of step, from step 0: there the
    policy is the reference, and its samples (same seed) are the reference's, so that point is
    the reference's reward at KL 0 when the run did not evaluate it itself. ``true_reward`` is
    the judging reward: the hidden one, or on own data the gold judge's."""
    key = reward_key(builtin)
    start = {"step": 0, "kl": 0.0, "true_reward": builtin[f"reference/{key}"]}
    if "reference/proxy_reward" in builtin:
        start["proxy_reward"] = builtin["reference/proxy_reward"]
    curve = [start]
    for record in read_metrics(Path(output_dir)):
        if f"eval/policy/{key}" in record:
            point = {"step": record["step"], "kl": record["eval/policy/kl"],
                     "true_reward": record[f"eval/policy/{key}"]}  # fmt: skip
            if "eval/policy/proxy_reward" in record:
                point["proxy_reward"] = record["eval/policy/proxy_reward"]
            curve = curve[1:] if record["step"] == 0 else curve  # evaluated at step 0 itself
            curve.append(point)
    return curve


def _row(method: Method, results: list[StageResult], seed: int) -> dict[str, Any]:
    """One line of the comparison, from the summaries of the method's stages."""
    final = results[-1].summary
    builtin = final.get("builtin") or final["evaluation"]  # own data: the gold judge's report
    key = reward_key(builtin)
    proxy = {k: builtin[f"{m}/proxy_reward"] for k, m in (("proxy_reward", "policy"),
             ("reference_proxy_reward", "reference")) if f"{m}/proxy_reward" in builtin}  # fmt: skip
    return {
        "run": method.name, "method": method.method, "strength": method.strength,
        "value": method.value, "seed": seed,
        "true_reward": builtin[f"policy/{key}"],
        "reference_true_reward": builtin[f"reference/{key}"],
        "kl": builtin["policy/kl"],
        **({"win_rate": builtin["policy/win_rate"]} if "policy/win_rate" in builtin else {}),
        "response_tokens": builtin["policy/response_tokens"],
        "wall_s": {r.stage: r.wall_s for r in results},
        "total_wall_s": round(sum(r.wall_s for r in results), 1),
        # of which the held-out evaluations (along training and at the end) of the last stage:
        # the same protocol for every method, and not part of what the method costs
        "eval_s": _eval_s(final),
        "cost_wall_s": round(sum(r.wall_s for r in results) - _eval_s(final), 1),
        # per stage: the process's peak, and what models, data and training added to it (the
        # runtime and imports excluded); the last stage is the method's own training
        "peak_rss_mb": {r.stage: r.peak_rss_mb for r in results},
        "peak_above_start_mb": {r.stage: _above_start(r) for r in results},
        "models_in_memory": final.get("models_in_memory", 1),
        "tokens_generated": final.get("tokens_generated", 0),
        "commands": [r.command for r in results],
        **proxy,
        "curve": run_curve(results[-1].output_dir, builtin),
    }  # fmt: skip


def _eval_s(summary: dict[str, Any]) -> float:
    """Seconds a stage spent on the sampled evaluations (built-in task, or own data's)."""
    return summary.get("builtin_eval_s", summary.get("eval_s", 0.0))


def replot(output_dir: str) -> dict[str, Any]:
    """Redraw the plots of a finished comparison from its ``comparison.json``."""
    from direct_align.compare.plots import write_plots

    path = Path(output_dir) / "comparison.json"
    if not path.is_file():
        raise ConfigError(f"--plots-only: no comparison.json in '{output_dir}'")
    result = json.loads(path.read_text())
    result["plots"] = [str(p) for p in write_plots(result, Path(output_dir))]
    return result


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every planned method (or those named in ``cfg.only``) for each seed, and write the
    table and plots."""
    started = time.time()
    run = RunDir(cfg.output_dir)
    run.check(resume=False, overwrite=cfg.overwrite, resumable=False)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    staging = Path(tempfile.mkdtemp(prefix="direct-align-compare-"))
    own = None
    if cfg.dataset is not None:  # checked and split before the output directory is touched
        assert cfg.model is not None
        try:
            own = split_pairs(cfg.model, cfg.dataset, staging, split=cfg.split, seed=cfg.seed,
                              gold_fraction=cfg.gold_fraction, judge=cfg.gold_judge())  # fmt: skip
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        sft_s: Any = "own model (--model)"
    else:
        build_start = time.time()
        ensure_builtin(cache_root, BuiltinSpec())  # the SFT stage, shared by every method
        sft_s = round(time.time() - build_start, 1)
    run.prepare(overwrite=cfg.overwrite, checkpoints=False)
    group = cfg.wandb_group or run.path.name
    judge: dict[str, Any] | None = None
    if own is not None:
        own = _move_data(own, staging, run.path / "data")
        judge = _gold_judge(cfg, own, run.path, cache_root, group)
    shutil.rmtree(staging, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    reward_models: list[dict[str, Any]] = []
    for seed in seeds:
        where = run.path / (f"seed-{seed}" if len(seeds) > 1 else "")
        seed_rows, rm_result = _run_seed(cfg, seed, where, cache_root, group, own, judge)
        rows += seed_rows
        if rm_result is not None:
            reward_models.append(_reward_model(rm_result, seed))

    result = {
        "quick": cfg.quick, "task": "own" if own else cfg.task, "seed": cfg.seed, "seeds": seeds,
        "rows": rows,
        **({"judge": judge, "data": {"model": own.model, "dataset": cfg.dataset, "rows": own.rows},
            "reward_label": "gold reward of samples (higher is better)"} if own else {}),
        "runs": aggregate(rows), "headline": headline(rows),
        "reward_model": reward_models[0] if reward_models else None,
        "reward_models": reward_models,
        "sft": {"stage": "the base model, shared by every method",
                "wall_s": sft_s if not isinstance(sft_s, float) or sft_s > 5 else "cached"},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "platform": platform.platform(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "runtime_s": round(time.time() - started, 1),
    }  # fmt: skip
    run.write_json("comparison.json", result)
    from direct_align.compare.plots import write_plots  # matplotlib only when plotting

    result["plots"] = [str(p) for p in write_plots(result, run.path)]
    run.write_json("comparison.json", result)
    if cfg.report_to == "wandb":
        _report(cfg, group, result, run.path)
    return result


def _reward_model(result: StageResult, seed: int) -> dict[str, Any]:
    return {"seed": seed, "wall_s": result.wall_s, "peak_rss_mb": result.peak_rss_mb,
            "peak_above_start_mb": _above_start(result), "command": result.command,
            "eval": result.summary["final"], "hidden_reward": result.summary.get("builtin")}  # fmt: skip


def _move_data(own: OwnData, staging: Path, data: Path) -> OwnData:
    """``own`` with its split files moved from ``staging`` into the run's ``data/``."""
    shutil.move(str(staging), str(data))
    moved = {name: None if path is None else data / path.name
             for name, path in (("train", own.train), ("eval", own.eval), ("gold", own.gold))}  # fmt: skip
    return dataclasses.replace(own, **moved)


def _gold_judge(cfg: CompareConfig, own: OwnData, out: Path, cache_root: Path,
                group: str) -> dict[str, Any]:  # fmt: skip
    """The judge of every run on own data: the user's, or a reward model trained once on the
    gold pairs that no method sees (described as such)."""
    if own.judge:
        return {"specs": own.judge, "description": f"{' + '.join(own.judge)} (given by the user)"}
    assert own.gold is not None
    args = ("--model", own.model, "--dataset", str(own.gold), "--seed", str(cfg.seed))
    if cfg.quick:
        args += ("--max-steps", str(QUICK.rm_steps))
    stage = Stage("gold_reward_model", "train-rm", args)
    cache = run_cache(out / "cache", "gold_reward_model", cache_root / "builtin")
    tracking = _tracking(cfg, group, "gold-reward-model", {"method": "gold-reward-model"})
    result = run_stage(stage, out / "gold_reward_model", cache, tracking, warm=cfg.quick)
    accuracy = result.summary["final"].get("eval/rewards/accuracies", float("nan"))
    spec = str(Path(result.output_dir) / "final")
    return {"specs": [spec], "command": result.command, "wall_s": result.wall_s,
            "eval": result.summary["final"],
            "description": f"a reward model trained on {own.rows['gold']} held-out pairs that no "
                           f"method sees ({cfg.gold_fraction:g} of the pairs after the evaluation "
                           f"share; held-out pair accuracy {accuracy:.3f}): {spec}; a learnt "
                           "judge, not a ground truth"}  # fmt: skip


def _run_seed(cfg: CompareConfig, seed: int, where: Path, cache_root: Path, group: str,
              own: OwnData | None = None, judge: dict[str, Any] | None = None,
              ) -> tuple[list[dict[str, Any]], StageResult | None]:  # fmt: skip
    """Every method of one seed, into ``where/runs``; the rows and the reward-model stage.
    On own data (``own``) every method's last stage is judged by ``judge``."""
    data = () if own is None else ("--model", own.model, "--dataset", str(own.train),
                                   "--eval-prompts-file", str(own.eval))  # fmt: skip
    shared_rm, methods = plan(cfg.quick, seed, cfg.task, data)
    if cfg.only:
        methods = [m for m in methods if m.method in cfg.only]
    runs, caches = where / "runs", where / "cache"
    runs.mkdir(parents=True)
    seed_keys = {"seed": seed} if cfg.seeds > 1 else {}
    rm_result: StageResult | None = None

    def reward_model() -> StageResult:
        nonlocal rm_result
        if rm_result is None:
            cache = run_cache(caches, "reward_model", cache_root / "builtin")
            tracking = _tracking(cfg, group, _name("reward-model", seed_keys),
                                 {"method": "reward-model", **seed_keys})  # fmt: skip
            rm_result = run_stage(shared_rm, runs / "reward_model", cache, tracking, warm=cfg.quick)
        return rm_result

    if cfg.task == "proxy" and methods:  # every run is also scored by the reward model
        reward_model()
    rows = []
    for i, method in enumerate(methods, 1):
        log.info("compare: seed %d [%d/%d] %s", seed, i, len(methods), method.name)
        results = []
        for stage in method.stages:
            if stage == shared_rm:
                results.append(reward_model())
                continue
            results.append(_run_method_stage(cfg, stage, method, rm_result, runs, caches,
                                             cache_root, group, seed_keys, judge))  # fmt: skip
        rows.append(_row(method, results, seed))
        r = rows[-1]
        log.info("compare: %s true reward %.3f, KL %.2f, %.0f s, peak %.0f MB", method.name,
                 r["true_reward"], r["kl"], r["total_wall_s"], r["peak_rss_mb"][method.stages[-1].name])  # fmt: skip
    return rows, rm_result


def _run_method_stage(cfg: CompareConfig, stage: Stage, method: Method,
                      rm_result: StageResult | None, runs: Path, caches: Path, cache_root: Path,
                      group: str, seed_keys: dict[str, int],
                      judge: dict[str, Any] | None = None) -> StageResult:  # fmt: skip
    """A method's own stage, given the reward model where it learns from or is scored by it,
    and on own data the gold ``judge`` that scores its samples."""
    extra: tuple[str, ...] = ()
    rm_final = None if rm_result is None else str(Path(rm_result.output_dir) / "final")
    if stage.name in ("ppo", "online"):  # both learn from the shared reward model
        extra = ("--reward-model" if stage.name == "ppo" else "--reward", rm_final)
    if cfg.task == "proxy":
        extra += ("--eval-reward-model", rm_final)
    if judge is not None:
        extra += tuple(f for spec in judge["specs"] for f in ("--eval-judge", spec))
    # quick: one cache for every run, so the reference log-probs are computed once, as a user
    # would have them; a full comparison charges every run its own reference pass
    cache = run_cache(caches, "shared" if cfg.quick else method.name, cache_root / "builtin")
    tracking = _tracking(cfg, group, _name(method.name, seed_keys), {
        "method": method.method, "strength": method.strength, "value": method.value,
        **seed_keys})  # fmt: skip
    return run_stage(stage, runs / method.name, cache, (*extra, *tracking), warm=cfg.quick)


def _name(run: str, seed_keys: dict[str, int]) -> str:
    return f"{run}-seed{seed_keys['seed']}" if seed_keys else run


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


def _flat(entry: dict[str, Any]) -> dict[str, Any]:
    """A headline entry with its (mean, std) pairs as two columns each."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, tuple | list):
            out[key], out[f"{key}_std"] = value
        else:
            out[key] = value
    return out


def _report(cfg: CompareConfig, group: str, result: dict[str, Any], output_dir: Path) -> None:
    """The comparison's own W&B run, in its group: the table and the plots."""
    from direct_align.engine.tracking import Tracker

    keep = ("run", "method", "strength", "value", "seed", "true_reward", "reference_true_reward", "kl",
            "response_tokens", "total_wall_s", "cost_wall_s", "models_in_memory",
            "tokens_generated")  # fmt: skip
    table = [{k: r[k] for k in keep} | {"peak_rss_mb": list(r["peak_rss_mb"].values())[-1]}
             for r in result["rows"]]  # fmt: skip
    cfg = dataclasses.replace(cfg, wandb_group=group)  # the summary run joins its runs' group
    tracker = Tracker(output_dir, cfg, config={"quick": cfg.quick, "task": cfg.task,
                                               "seeds": result["seeds"], "only": cfg.only,
                                               "machine": result["machine"]},
                      name=cfg.run_name or f"{group}-summary", jsonl=False)  # fmt: skip
    try:
        tracker.log_table("comparison", table, 0)
        tracker.log_table("headline", [_flat(h) for h in result["headline"]], 0)
        tracker.log_images({Path(p).stem: Path(p) for p in result["plots"]}, 0)
        tracker.summary({"runtime_s": result["runtime_s"]})
    finally:
        tracker.close()
