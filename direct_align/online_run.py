"""`direct-align train --online` from settings to outputs.

As for offline training, every input (output directory rules, model, tokenizer, prompts, judges,
eval pairs and their reference log-probs) is loaded and checked before the output directory is
created or emptied. The reference stays available: fresh samples need reference log-probs every
round. With LoRA (``--lora-r``) and no ``--ref-model`` the reference is the policy itself with its
adapters disabled, so no second copy of the weights is loaded; otherwise a reference model is held
in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from accelerate.utils import set_seed

from direct_align.config import TrainConfig, uses_bf16, uses_reference
from direct_align.data import PairDataset
from direct_align.distributed import (
    check_process_count,
    gathered_state_dict,
    make_accelerator,
    quiet_unless_main,
    shards,
)
from direct_align.errors import ConfigError
from direct_align.models.loading import load_causal_lm, load_tokenizer
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import AdaptersOff
from direct_align.online import fit_online, load_prompts
from direct_align.outputs import RunDir
from direct_align.reference import (
    ReferenceCache,
    ReferenceLogps,
    cached_reference_logps,
    model_fingerprint,
)
from direct_align.rewards import RewardModelJudge, load_rewards
from direct_align.run import (
    _builtin_report,
    _check_resume_config,
    _first_eval,
    _prepare,
    _save_final,
    check_engine,
    load_policy,
    open_outputs,
    preference_model,
    resolve_inputs,
    score_sharded,
    whole_model,
)
from direct_align.trainer import resident_mb

log = logging.getLogger(__name__)


def run_online(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train online as configured; returns the summary (also written to ``summary.json``), or
    None in the processes other than the main one."""
    started, rss_at_start = time.time(), resident_mb()  # the runtime before any model
    run = RunDir(cfg.output_dir)
    run.check(resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:
        _check_resume_config(run, cfg)

    # 1. inputs: prompts (a dataset's prompt column, or the built-in task's), judges, eval pairs
    cache_dir, model_path, source, assets = resolve_inputs(cfg)
    tokenizer = load_tokenizer(model_path)
    prompts = load_prompts(source, cfg.split if cfg.dataset else None)
    log.info("prompts: %d from %s", len(prompts), source)
    accelerator = make_accelerator("bf16" if uses_bf16(cfg) else "no")
    check_process_count(cfg.grad_accum, accelerator)
    check_engine(cfg, run, accelerator)
    sharded = shards(accelerator)
    if cfg.prompts_per_round < accelerator.num_processes:
        raise ConfigError(f"--prompts-per-round {cfg.prompts_per_round} is fewer than the "
                          f"{accelerator.num_processes} processes (each samples a share of them)")  # fmt: skip
    quiet_unless_main(accelerator)
    main = accelerator.is_main_process
    rewards = load_rewards(cfg.reward or ["builtin"], length_penalty=cfg.length_penalty,
                           eos_penalty=cfg.eos_penalty, max_length=cfg.max_length,
                           device=accelerator.device)  # fmt: skip
    log.info("judge: %s", " + ".join(f"{j.weight:g}·{j.name}" for j in rewards.judges))
    evals: PairDataset | None = None
    if cfg.eval_dataset:
        evals = _prepare(cfg.eval_dataset, tokenizer, cfg, cfg.eval_split or cfg.split).pairs
    elif cfg.dataset is None:
        evals = _prepare(str(assets.eval_file), tokenizer, cfg, "train").pairs

    # 2. models: the policy, and the reference for the fresh samples: the policy with its LoRA
    # adapters off, or a second model held in memory
    set_seed(cfg.seed)
    policy = load_policy(model_path, cfg, accelerator.device)
    reference: PreferenceModel | AdaptersOff | None = None
    ref_eval: ReferenceLogps | Callable[[PreferenceModel], ReferenceLogps] | None = None
    if uses_reference(cfg) and cfg.lora_r is not None and not cfg.ref_model:
        # under FSDP no device holds the policy whole: it moves there sharded (fit_online)
        reference = AdaptersOff(policy if sharded else policy.to(accelerator.device))
    elif uses_reference(cfg):
        ref_lm = load_causal_lm(cfg.ref_model or model_path,
                                option="--ref-model" if cfg.ref_model else "--model")  # fmt: skip
        reference = preference_model(ref_lm.requires_grad_(False), cfg, accelerator.device)
        reference.to(accelerator.device).eval()
    if reference is not None and evals is not None:
        score = partial(cached_reference_logps, tokenizer=tokenizer, splits={"eval": evals},
                        cache=ReferenceCache(cache_dir / "reference"),
                        settings={"precision": "bf16" if uses_bf16(cfg) else "fp32"},
                        batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, layout=cfg.layout,
                        pad_token_id=tokenizer.pad_token_id, device=accelerator.device,
                        autocast=accelerator.autocast, accelerator=accelerator)  # fmt: skip
        if sharded and isinstance(reference, AdaptersOff):  # scored by the sharded policy
            whole_fp = model_fingerprint(policy.model)  # of the weights before sharding
            ref_eval = lambda prepared: score_sharded(  # noqa: E731
                score, prepared, fingerprint=whole_fp, status={})["eval"]
        else:
            ref_eval = score(reference)[0]["eval"]

    # 3. outputs: only now is the output directory created or (with --overwrite) emptied
    tracker = open_outputs(run, cfg, accelerator, "online_state")
    try:
        state, eval_metrics = fit_online(policy, reference, prompts, rewards, evals, ref_eval,
                                         tokenizer=tokenizer, cfg=cfg, accelerator=accelerator,
                                         run=run, tracker=tracker)  # fmt: skip
        accelerator.wait_for_everyone()
        whole = gathered_state_dict(policy, accelerator)  # FSDP: all processes gather
        if not main:  # the main process writes final/ and the summary
            return None
        model = accelerator.unwrap_model(policy).model
        _save_final(model, tokenizer, run, cfg.lora_save, whole)
        summary: dict[str, Any] = {
            "loss": cfg.loss, "beta": cfg.beta, "online": True, "rounds": state.round,
            "steps": state.step, "judge_calls": state.judge_calls, "train_pairs": state.pairs,
            "pairs_seen": state.pairs_seen, "tokens_generated": state.tokens_generated,
            # policy, a reference model for fresh pairs (not with LoRA: the policy with its
            # adapters off), reward-model judges
            "models_in_memory": 1 + isinstance(reference, PreferenceModel)
            + sum(isinstance(j.judge, RewardModelJudge) for j in rewards.judges),
            "processes": accelerator.num_processes, "rss_at_start_mb": rss_at_start,
            "initial": _first_eval(run), "final": eval_metrics,
            "runtime_s": round(time.time() - started, 1),
            "train_runtime_s": round(state.train_seconds, 3),
        }  # fmt: skip
        if cfg.dataset is None:
            summary["builtin"] = _builtin_report(whole_model(model, whole, run), model_path,
                                                 tokenizer, assets, cfg)  # fmt: skip
        tracker.summary({**eval_metrics, **summary.get("builtin", {}),
                         "online/judge_calls": state.judge_calls})  # fmt: skip
        run.write_json("summary.json", summary)
        return summary
    finally:
        tracker.close()
