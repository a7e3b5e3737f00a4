"""`direct-align ppo` from settings to outputs: the RLHF baseline the direct losses answer.

As for `train`, every input (output directory rules, models, tokenizer, prompts) is loaded and
checked before the output directory is created or emptied. On the built-in task with no
``--reward-model``, the reward model is trained first (the RM stage of SFT → RM → PPO) into
``OUTPUT_DIR/reward_model``, by `train-rm`'s built-in recipe.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from accelerate.utils import set_seed

from direct_align.builtin.build import BuiltinSpec
from direct_align.builtin.task import true_reward
from direct_align.config import save_yaml, uses_bf16
from direct_align.data.prompts import load_prompts
from direct_align.distributed import (
    NullTracker,
    make_accelerator,
    quiet_unless_main,
    refuse_sharding,
)
from direct_align.errors import ConfigError
from direct_align.evaluate import generation_report
from direct_align.models.loading import load_causal_lm, load_tokenizer
from direct_align.outputs import RunDir
from direct_align.ppo.config import PPOConfig, check_processes
from direct_align.ppo.models import ActorCritic
from direct_align.ppo.train import Evaluator, fit_ppo
from direct_align.rm.config import BUILTIN_PRESET as RM_PRESET
from direct_align.rm.config import RewardConfig, resolve_rm
from direct_align.rm.model import load_reward_model
from direct_align.rm.run import check_output_dir, run_train_rm
from direct_align.run import _save_final, resolve_inputs
from direct_align.tracking import Tracker
from direct_align.trainer import resident_mb

log = logging.getLogger(__name__)


def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval().to(device)


def _builtin_rm_config(cfg: PPOConfig, run: RunDir, processes: int) -> RewardConfig:
    """The RM stage on the built-in task's pairs: `direct-align train-rm` with its preset; with
    several processes each step's pairs are dealt out among them in equal micro-batches."""
    values = {"output_dir": str(run.path / "reward_model"), "seed": cfg.seed,
              "cache_dir": cfg.cache_dir, "label_noise": cfg.label_noise,
              "precision": cfg.precision, "report_to": "jsonl"}  # fmt: skip
    if processes > 1:
        pairs = RM_PRESET["batch_size"]
        if pairs % processes:
            raise ConfigError(f"the built-in reward model's steps of {pairs} pairs do not divide "
                              f"among {processes} processes; train one with `direct-align "
                              "train-rm` and pass --reward-model")  # fmt: skip
        values |= {"batch_size": pairs // processes, "grad_accum": processes}
    return resolve_rm(values)


def run_ppo(cfg: PPOConfig) -> dict[str, Any] | None:
    """Train a policy with PPO as configured; returns the summary (also in ``summary.json``),
    or None in the processes other than the main one."""
    started, rss_at_start = time.time(), resident_mb()  # the runtime before any model
    run = RunDir(cfg.output_dir)
    check_output_dir(run, cfg.overwrite)
    builtin = cfg.model is None and cfg.dataset is None
    if cfg.reward_model is None and not builtin:
        raise ConfigError("--reward-model is required with --model or --dataset (train one with "
                          "`direct-align train-rm`)")  # fmt: skip

    # 1. inputs: the built-in task fills in whatever was not given
    _, model_path, prompt_source, assets = resolve_inputs(cfg)
    tokenizer = load_tokenizer(model_path)
    prompts = load_prompts(prompt_source, tokenizer, split=cfg.split,
                           max_prompt_length=cfg.max_prompt_length)  # fmt: skip
    log.info("prompts: %d from %s", len(prompts), prompt_source)
    if cfg.reward_model is not None:
        reward_model = load_reward_model(cfg.reward_model, tokenizer, option="--reward-model")
    policy = load_causal_lm(model_path)
    accelerator = make_accelerator("bf16" if uses_bf16(cfg) else "no")
    refuse_sharding("direct-align ppo", accelerator)
    check_processes(cfg, accelerator.num_processes)
    quiet_unless_main(accelerator)
    main = accelerator.is_main_process
    rm_cfg = None if cfg.reward_model else _builtin_rm_config(cfg, run, accelerator.num_processes)

    # 2. outputs: only now is the output directory created or (with --overwrite) emptied, by
    #    the main process alone
    accelerator.wait_for_everyone()
    if main:
        run.prepare(overwrite=cfg.overwrite)
        run.checkpoints.rmdir()  # ppo writes no checkpoints; leave no empty folder
        save_yaml(cfg, run.path / "config.yaml")
    accelerator.wait_for_everyone()
    stages: dict[str, float] = {}
    rm_summary = None
    rm_path = cfg.reward_model
    if rm_cfg is not None:  # the RM stage of the pipeline, in as many processes
        log.info("reward model: training one on the built-in pairs into %s", rm_cfg.output_dir)
        rm_started = time.time()
        rm_summary = run_train_rm(rm_cfg)  # None in the other processes
        rm_path = str(RunDir(rm_cfg.output_dir).final)
        stages["reward_model_s"] = round(time.time() - rm_started, 1)
        reward_model = load_reward_model(rm_path, tokenizer)

    # 3. the models PPO holds: policy (+ value), reference, reward model, and maybe a critic
    ppo_started = time.time()
    device = accelerator.device
    set_seed(cfg.seed, device_specific=True)  # each process samples its own stream
    critic = load_reward_model(rm_path, tokenizer) if cfg.critic == "separate" else None
    actor_critic = ActorCritic(policy, critic)
    reference = _frozen(load_causal_lm(model_path), device)
    reward_model = _frozen(reward_model, device)
    models_in_memory = 3 + (critic is not None)
    log.info("ppo: %d models in memory (policy, %sreference, reward model)", models_in_memory,
             "critic, " if critic is not None else "")  # fmt: skip

    evaluate: Evaluator | None = None
    if main and assets is not None and cfg.dataset is None:  # the built-in task's hidden reward
        held_out = assets.held_out_prompts(cfg.eval_prompts)

        def evaluate(rollout: int) -> dict[str, float]:
            report = generation_report(actor_critic.policy, reference, tokenizer, held_out,
                                       reward=true_reward, seed=cfg.seed,
                                       max_new_tokens=BuiltinSpec().max_new_tokens)  # fmt: skip
            log.info("rollout %d: true reward %.3f, KL %.2f", rollout,
                     report["policy/true_reward"], report["policy/kl"])  # fmt: skip
            return {f"eval/{k}": v for k, v in report.items()}

    tracker = NullTracker()
    if main:
        tracker = Tracker(run.path, report_to=cfg.report_to, project=cfg.wandb_project,
                          run_name=cfg.run_name or run.path.name, config=cfg.to_dict())  # fmt: skip
    try:
        state = fit_ppo(actor_critic, reference, reward_model, prompts, cfg=cfg,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        accelerator=accelerator, tracker=tracker, evaluate=evaluate)  # fmt: skip
        accelerator.wait_for_everyone()
        if not main:  # the main process writes final/ and the summary
            return None
        policy = accelerator.unwrap_model(actor_critic).policy
        _save_final(policy, tokenizer, run)
        stages["ppo_s"] = round(time.time() - ppo_started, 1)
        summary: dict[str, Any] = {
            "rollouts": state.rollouts, "updates": state.updates, "responses": state.responses,
            "tokens_generated": state.tokens_generated, "prompts": len(prompts),
            "critic": cfg.critic, "kl_coef": cfg.kl_coef, "reward_model": rm_path,
            "models_in_memory": models_in_memory, "stages": stages, "rss_at_start_mb": rss_at_start,
            "processes": accelerator.num_processes,
            "runtime_s": round(time.time() - started, 1),
            "train_runtime_s": round(state.train_seconds, 3),
        }  # fmt: skip
        if rm_summary is not None:
            summary["reward_model_eval"] = rm_summary["final"]
        if evaluate is not None:
            records = [json.loads(line) for line in (run.path / "metrics.jsonl").open()]
            evals = [r for r in records if "eval/policy/true_reward" in r]
            summary["builtin"] = {k[len("eval/"):]: v for k, v in evals[-1].items() if k != "step"}
            summary["builtin"]["initial/true_reward"] = evals[0]["eval/policy/true_reward"]
        tracker.summary({k: v for k, v in summary.items() if isinstance(v, int | float)})
        run.write_json("summary.json", summary)
        return summary
    finally:
        tracker.close()

