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
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from direct_align.builtin.inputs import resolve_inputs
from direct_align.config import resolve
from direct_align.data.prompts import load_prompts
from direct_align.engine.distributed import reads_weights, shard_frozen
from direct_align.engine.optim import trained_dtype
from direct_align.engine.outputs import RunDir
from direct_align.engine.session import Session
from direct_align.engine.tracking import read_metrics
from direct_align.errors import ConfigError
from direct_align.evaluation.heldout import run_report
from direct_align.evaluation.report import SampleReport, reward_key
from direct_align.models.loading import (
    describe_model,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
)
from direct_align.ppo.loop import Evaluator, fit_ppo
from direct_align.ppo.models import ActorCritic, FrozenReference, FrozenRewardModel
from direct_align.ppo.settings import PPOConfig, check_processes
from direct_align.rm.model import load_reward_model
from direct_align.rm.run import run_train_rm
from direct_align.rm.settings import RewardConfig
from direct_align.settings import frozen_dtype, uses_bf16

log = logging.getLogger(__name__)


def builtin_rm_config(cfg: PPOConfig, rm_dir: Path, processes: int) -> RewardConfig:
    """The RM stage on the built-in task's pairs: `direct-align train-rm` with its preset, into
    ``rm_dir`` (continued there on --resume); with several processes each step's pairs are
    dealt out among them in equal micro-batches."""
    values: dict[str, Any] = {"output_dir": str(rm_dir), "seed": cfg.seed,
                              "cache_dir": cfg.cache_dir, "label_noise": cfg.label_noise,
                              "train_pairs": cfg.train_pairs,
                              "precision": cfg.precision, "report_to": "jsonl",
                              "resume": RunDir(rm_dir).last_checkpoint() is not None}  # fmt: skip
    if processes > 1:
        pairs = RewardConfig.builtin_preset["batch_size"]
        if pairs % processes:
            raise ConfigError(f"the built-in reward model's steps of {pairs} pairs do not divide "
                              f"among {processes} processes; train one with `direct-align "
                              "train-rm` and pass --reward-model")  # fmt: skip
        values |= {"batch_size": pairs // processes, "grad_accum": processes}
    return resolve(RewardConfig, values)


def run_ppo(cfg: PPOConfig) -> dict[str, Any] | None:
    """Train a policy with PPO as configured; returns the summary (also in ``summary.json``),
    or None in the processes other than the main one and when stopped early for a later
    ``--resume``."""
    rm_dir = Path(cfg.output_dir) / "reward_model"
    builtin_rm = cfg.reward_model is None
    # a run stopped during its RM stage has no PPO checkpoint yet: --resume continues that stage
    with Session(cfg) as session:
        # 1. inputs: the built-in task fills in whatever was not given
        inputs = resolve_inputs(cfg)
        tokenizer = load_tokenizer(inputs.model_path)
        prompts = load_prompts(inputs.source, tokenizer, split=cfg.split,
                               keep=cfg.max_prompt_length).ids  # fmt: skip
        log.info("prompts: %d from %s", len(prompts), inputs.source)
        accelerator = session.start(bf16=uses_bf16(cfg))
        check_processes(cfg, accelerator.num_processes)
        # under FSDP only the main process reads weights; the others receive their shards
        unread = not reads_weights(accelerator)
        set_seed(cfg.seed)  # a causal LM loaded as a reward model gets a fresh head
        if not builtin_rm:
            reward_model = load_reward_model(cfg.reward_model, tokenizer, option="--reward-model",
                                             dtype=frozen_dtype(cfg), unread=unread)  # fmt: skip
        policy = load_causal_lm(inputs.model_path, dtype=trained_dtype(cfg), unread=unread)
        rm_done = (rm_dir / "final").is_dir() and (rm_dir / "summary.json").is_file()
        rm_cfg = None
        if builtin_rm and not rm_done:
            rm_cfg = builtin_rm_config(cfg, rm_dir, accelerator.num_processes)

        # the report of the policy's samples (checked now: its prompts and judges are inputs)
        hidden: SampleReport | None = None
        if session.main:
            hidden = run_report(cfg, inputs, tokenizer, inputs.model_path,
                                device=accelerator.device,
                                judge=[cfg.reward_model] if cfg.reward_model else None)  # fmt: skip

        # 2. outputs: only now is the output directory created or (with --overwrite) emptied
        session.open(inputs={
            "model": describe_model(policy, inputs.model_path),
            "data": {"source": inputs.source, "prompt_rows": len(prompts)},
            "reward_model": cfg.reward_model or str(rm_dir / "final"), "critic": cfg.critic})  # fmt: skip
        stages: dict[str, float] = {}
        rm_path = cfg.reward_model
        if builtin_rm:  # the RM stage of the pipeline, in as many processes
            if rm_cfg is not None:
                log.info("reward model: training one on the built-in pairs into %s", rm_dir)
                rm_started = time.time()
                rm_summary = run_train_rm(rm_cfg)
                stages["reward_model_s"] = round(time.time() - rm_started, 1)
                if rm_summary is None and not (rm_dir / "final").is_dir():
                    return None  # the stage stopped early (--max-steps-per-run)
            else:
                log.info("reward model: trained already in %s", rm_dir)
            rm_path = str(rm_dir / "final")
            reward_model = load_reward_model(rm_path, tokenizer, dtype=frozen_dtype(cfg),
                                             unread=unread)  # fmt: skip

        # 3. the models PPO holds: policy (+ value), reference, reward model, and maybe a critic;
        #    under FSDP each is sharded (the frozen two here, policy and critic in fit_ppo)
        ppo_started = time.time()
        critic = None
        if cfg.critic == "separate":
            critic = load_reward_model(rm_path, tokenizer, dtype=trained_dtype(cfg), unread=unread)
        if cfg.disable_dropout:
            for model in (policy, critic) if critic is not None else (policy,):
                disable_dropout(model)
        actor_critic = ActorCritic(policy, critic)
        reference_lm = load_causal_lm(inputs.model_path, dtype=frozen_dtype(cfg), unread=unread)
        reference = shard_frozen(FrozenReference(reference_lm), accelerator)
        reward_model = shard_frozen(FrozenRewardModel(reward_model), accelerator)
        set_seed(cfg.seed, device_specific=True)  # each process samples its own stream
        models_in_memory = 3 + (critic is not None)
        log.info("ppo: %d models in memory (policy, %sreference, reward model)", models_in_memory,
                 "critic, " if critic is not None else "")  # fmt: skip

        # the report of the policy's samples (the built-in task's hidden reward, or own data's
        # --eval-prompts-file), in the main process: along training, or under FSDP (no process
        # holds the policy whole) of final/ alone
        evaluate: Evaluator | None = None
        if hidden is not None and not session.sharded:
            hidden.reference = reference_lm  # in memory already: not loaded a second time

        if hidden is not None and not session.sharded:

            def evaluate(rollout: int) -> dict[str, float]:  # the policy's samples, judged
                report, rows = hidden(actor_critic.policy)
                log.info("rollout %d: %s %.3f, KL %.2f", rollout, reward_key(report).replace("_", " "),
                         report[f"policy/{reward_key(report)}"], report["policy/kl"])  # fmt: skip
                session.tracker.log_table("eval/generations", rows, rollout)
                return {f"eval/{k}": v for k, v in report.items()}

        state, prepared, finished = fit_ppo(actor_critic, reference, reward_model, prompts,
                                            cfg=cfg, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id, session=session,
                                            evaluate=evaluate)  # fmt: skip
        if not finished:
            return None
        session.save_final(prepared, tokenizer, inner="policy")
        if not session.main:
            return None
        stages["ppo_s"] = round(time.time() - ppo_started, 1)
        summary: dict[str, Any] = {
            "rollouts": state.step, "updates": state.updates, "responses": state.responses,
            "tokens_generated": state.tokens_generated, "prompts": len(prompts),
            "critic": cfg.critic, "kl_coef": cfg.kl_coef, "reward_model": rm_path,
            "models_in_memory": models_in_memory, "stages": stages,
            "train_runtime_s": round(state.train_seconds, 3),
        }  # fmt: skip
        if builtin_rm:
            rm_summary = json.loads((rm_dir / "summary.json").read_text())
            summary["reward_model_eval"] = rm_summary["final"]
            stages.setdefault("reward_model_s", rm_summary["runtime_s"])
        if hidden is not None:
            if evaluate is None:  # sharded: the trained policy, read back from final/
                report, rows = hidden(session.load_final())
                session.tracker.log_table("eval/generations", rows, state.step)
                session.tracker.log({f"eval/{k}": v for k, v in report.items()}, state.step)
            key = hidden.key
            evals = [r for r in read_metrics(session.run.path) if f"eval/policy/{key}" in r]
            summary[hidden.name] = {k[len("eval/"):]: v for k, v in evals[-1].items() if k != "step"}
            # the initial policy is the reference, sampled with the same seed: the same samples
            summary[hidden.name][f"initial/{key}"] = (
                evals[0][f"eval/policy/{key}"] if evaluate is not None
                else summary[hidden.name][f"reference/{key}"])  # fmt: skip
            summary[hidden.seconds_key] = round(hidden.seconds, 1)
        return session.finish(summary, {**{k: v for k, v in summary.items()
                                           if isinstance(v, int | float)},
                                        **summary.get(hidden.name if hidden else "", {})})  # fmt: skip
