"""`direct-align train-rm` from settings to outputs.

As for `train`, every input (output directory rules, model, tokenizer, data) is loaded and checked
before the output directory is created or emptied, so bad input never costs existing work; the
run checkpoints and resumes as `train` does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from direct_align.builtin.inputs import resolve_inputs
from direct_align.builtin.task import true_reward
from direct_align.data import PairDataset, prepare_pairs, split_holdout
from direct_align.engine.distributed import reads_weights
from direct_align.engine.optim import trained_dtype
from direct_align.engine.session import Session
from direct_align.models.loading import describe_model, disable_dropout, load_tokenizer
from direct_align.rm.evaluate import RewardEval, pearson, spearman
from direct_align.rm.loop import fit_rm
from direct_align.rm.model import load_reward_model
from direct_align.rm.settings import RewardConfig
from direct_align.settings import uses_bf16

log = logging.getLogger(__name__)


def _prepare(source: str, tokenizer: PreTrainedTokenizerBase, cfg: RewardConfig,
             split: str) -> PairDataset:  # fmt: skip
    data = prepare_pairs(source, tokenizer, fmt=cfg.format, max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length, split=split)  # fmt: skip
    log.info("%s: %s format, %s", source, data.format, data.stats.describe())
    return data.pairs


def run_train_rm(cfg: RewardConfig) -> dict[str, Any] | None:
    """Train a reward model as configured; returns the summary (also in ``summary.json``), or
    None in the processes other than the main one and when stopped early for a later
    ``--resume``. Under a multi-process launcher the micro-batches of each step are dealt out
    among the processes (as `train` does)."""
    with Session(cfg) as session:
        # 1. inputs: the built-in task fills in whatever was not given
        inputs = resolve_inputs(cfg)
        tokenizer = load_tokenizer(inputs.model_path)
        train = _prepare(inputs.source, tokenizer, cfg, cfg.split)
        builtin_eval = cfg.dataset is None and not cfg.eval_dataset  # labelled by the hidden reward
        if cfg.eval_dataset:
            evals = _prepare(cfg.eval_dataset, tokenizer, cfg, cfg.eval_split or cfg.split)
        elif builtin_eval:
            evals = _prepare(str(inputs.assets.eval_file), tokenizer, cfg, "train")
        else:
            train, evals = split_holdout(train, cfg.eval_fraction, cfg.seed)
        log.info("pairs: %d train, %d eval", len(train), len(evals))

        # 2. the model: the trunk of the causal LM and a fresh scalar head, seeded
        accelerator = session.start(bf16=uses_bf16(cfg), grad_accum=cfg.grad_accum)
        set_seed(cfg.seed)
        model = load_reward_model(inputs.model_path, tokenizer, dtype=trained_dtype(cfg),
                                  unread=not reads_weights(accelerator))  # fmt: skip
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()

        # 3. outputs: only now is the output directory created or (with --overwrite) emptied
        session.open(inputs={"model": describe_model(model, inputs.model_path),
                             "data": {"source": inputs.source, "train_rows": len(train),
                                      "eval_rows": len(evals)}})  # fmt: skip
        state, initial, final, prepared = fit_rm(model, train, evals, cfg=cfg, session=session,
                                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        if final is None:  # stopped by --max-steps-per-run
            return None
        session.save_final(prepared, tokenizer, inner=None)
        summary: dict[str, Any] = {
            "steps": state.step, "epochs": state.pairs_seen / len(train),
            "train_pairs": len(train), "eval_pairs": len(evals),
            "center_rewards_coef": cfg.center_rewards_coef,
            "initial": {f"eval/{k}": v for k, v in initial.metrics.items()},
            "final": {f"eval/{k}": v for k, v in final.metrics.items()},
            "train_runtime_s": round(state.train_seconds, 3),
            "train_samples_per_s": round(state.pairs_seen / max(state.train_seconds, 1e-9), 4),
        }  # fmt: skip
        if builtin_eval:
            summary["builtin"] = {"initial": hidden_reward_agreement(evals, initial, tokenizer),
                                  "final": hidden_reward_agreement(evals, final, tokenizer)}  # fmt: skip
        hidden = summary.get("builtin", {}).get("final", {})
        result = session.finish(summary, {**summary["final"],
                                          **{f"true_reward/{k}": v for k, v in hidden.items()}})  # fmt: skip
        session.barrier()  # final/ is complete for every process (ppo loads it)
        return result


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
