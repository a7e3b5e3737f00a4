"""`direct-align train-rm` from settings to outputs.

As for `train`, every input (output directory rules, model, tokenizer, data) is loaded and checked
before the output directory is created or emptied, so bad input never costs existing work.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from direct_align.builtin.task import true_reward
from direct_align.config import save_yaml, uses_bf16
from direct_align.data import PairDataset, prepare_pairs
from direct_align.distributed import (
    NullTracker,
    check_process_count,
    make_accelerator,
    quiet_unless_main,
    refuse_sharding,
)
from direct_align.errors import ConfigError
from direct_align.models.loading import load_tokenizer
from direct_align.outputs import RunDir
from direct_align.rm.config import RewardConfig
from direct_align.rm.evaluate import RewardEval, pearson, spearman
from direct_align.rm.model import load_reward_model
from direct_align.rm.train import fit_rm
from direct_align.run import _save_final, resolve_inputs, split_holdout
from direct_align.tracking import Tracker
from direct_align.trainer import resident_mb

log = logging.getLogger(__name__)


def check_output_dir(run: RunDir, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite``; touches nothing."""
    if run.path.is_dir() and any(run.path.iterdir()) and not overwrite:
        raise ConfigError(f"--output-dir: '{run.path}' is not empty; pass --overwrite to "
                          "replace it")  # fmt: skip
    run.check(resume=False, overwrite=True)  # the remaining rules (e.g. not a directory)


def _prepare(source: str, tokenizer: PreTrainedTokenizerBase, cfg: RewardConfig,
             split: str) -> PairDataset:  # fmt: skip
    data = prepare_pairs(source, tokenizer, fmt=cfg.format, max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length, split=split)  # fmt: skip
    log.info("%s: %s format, %s", source, data.format, data.stats.describe())
    return data.pairs


def run_train_rm(cfg: RewardConfig) -> dict[str, Any] | None:
    """Train a reward model as configured; returns the summary (also in ``summary.json``), or
    None in the processes other than the main one. Under a multi-process launcher the
    micro-batches of each step are dealt out among the processes (as `train` does)."""
    started, rss_at_start = time.time(), resident_mb()  # the runtime before any model
    run = RunDir(cfg.output_dir)
    check_output_dir(run, cfg.overwrite)

    # 1. inputs: the built-in task fills in whatever was not given
    _, model_path, train_source, assets = resolve_inputs(cfg)
    tokenizer = load_tokenizer(model_path)
    train = _prepare(train_source, tokenizer, cfg, cfg.split)
    builtin_eval = cfg.dataset is None and not cfg.eval_dataset  # labelled by the hidden reward
    if cfg.eval_dataset:
        evals = _prepare(cfg.eval_dataset, tokenizer, cfg, cfg.eval_split or cfg.split)
    elif builtin_eval:
        evals = _prepare(str(assets.eval_file), tokenizer, cfg, "train")
    else:
        train, evals = split_holdout(train, cfg.eval_fraction, cfg.seed)
    log.info("pairs: %d train, %d eval", len(train), len(evals))

    # 2. the model: the trunk of the causal LM and a fresh scalar head, seeded
    bf16 = uses_bf16(cfg)  # reads only cfg.precision
    accelerator = make_accelerator("bf16" if bf16 else "no")
    refuse_sharding("direct-align train-rm", accelerator)
    check_process_count(cfg.grad_accum, accelerator)
    quiet_unless_main(accelerator)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    model = load_reward_model(model_path, tokenizer)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    # 3. outputs: only now is the output directory created or (with --overwrite) emptied, by
    #    the main process alone
    accelerator.wait_for_everyone()
    tracker = NullTracker()
    if main:
        run.prepare(overwrite=cfg.overwrite)
        run.checkpoints.rmdir()  # train-rm writes no checkpoints; leave no empty folder
        save_yaml(cfg, run.path / "config.yaml")
        tracker = Tracker(run.path, report_to=cfg.report_to, project=cfg.wandb_project,
                          run_name=cfg.run_name or run.path.name, config=cfg.to_dict())  # fmt: skip
    try:
        state, initial, final = fit_rm(model, train, evals, cfg=cfg, accelerator=accelerator,
                                       tracker=tracker, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        accelerator.wait_for_everyone()
        summary: dict[str, Any] | None = None
        if main:  # the main process writes final/ and the summary
            model = accelerator.unwrap_model(model)
            _save_final(model, tokenizer, run)
            summary = {
                "steps": state.step, "epochs": state.pairs_seen / len(train),
                "train_pairs": len(train), "eval_pairs": len(evals),
                "center_rewards_coef": cfg.center_rewards_coef, "rss_at_start_mb": rss_at_start,
                "initial": {f"eval/{k}": v for k, v in initial.metrics.items()},
                "final": {f"eval/{k}": v for k, v in final.metrics.items()},
                "processes": accelerator.num_processes,
                "runtime_s": round(time.time() - started, 1),
                "train_runtime_s": round(state.train_seconds, 3),
                "train_samples_per_s": round(state.pairs_seen / max(state.train_seconds, 1e-9), 4),
            }  # fmt: skip
            if builtin_eval:
                summary["builtin"] = {"initial": hidden_reward_agreement(evals, initial, tokenizer),
                                      "final": hidden_reward_agreement(evals, final, tokenizer)}  # fmt: skip
            hidden = summary.get("builtin", {}).get("final", {})
            tracker.summary({**summary["final"],
                             **{f"true_reward/{k}": v for k, v in hidden.items()}})  # fmt: skip
            run.write_json("summary.json", summary)
        accelerator.wait_for_everyone()  # final/ is complete for every process (ppo loads it)
        return summary
    finally:
        tracker.close()


def hidden_reward_agreement(pairs: PairDataset, result: RewardEval,
                            tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:  # fmt: skip
    """How well the RM's scores of every response of ``pairs`` (chosen and rejected, ``2N``)
    follow the built-in task's hidden :func:`true_reward` of the response text, across prompts.

    The texts are decoded from the tokens the RM scored, so truncation is accounted for.
    """
    responses = [*pairs.chosen_ids, *pairs.rejected_ids]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    truth = torch.tensor([true_reward(t) for t in texts], dtype=torch.float64)
    scores = torch.cat([result.chosen, result.rejected])
    return {"spearman": spearman(scores, truth), "pearson": pearson(scores, truth),
            "responses": float(len(texts))}  # fmt: skip
