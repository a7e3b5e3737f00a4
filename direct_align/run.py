"""`direct-align train` from settings to outputs.

Order matters for safety: every input is loaded and validated (config, output directory rules,
model, tokenizer, data) and the reference pass is done before the output directory is touched,
so bad input never costs existing work.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from direct_align.builtin.build import BuiltinAssets, BuiltinSpec, default_cache_dir, ensure_builtin
from direct_align.builtin.task import true_reward
from direct_align.config import TrainConfig, save_yaml, uses_bf16, uses_reference
from direct_align.data import PairDataset, PreparedData, prepare_pairs
from direct_align.distributed import (
    NullTracker,
    check_process_count,
    check_resumable,
    gathered_state_dict,
    make_accelerator,
    quiet_unless_main,
    shards,
)
from direct_align.errors import ConfigError, DataError
from direct_align.evaluate import generation_report
from direct_align.models.loading import load_causal_lm, load_tokenizer
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import (
    ALL_LINEAR,
    adapters_disabled,
    apply_lora,
    save_final,
    trainable_summary,
)
from direct_align.models.varlen import choose_attention, use_varlen_attention
from direct_align.outputs import RunDir, read_state
from direct_align.reference import (
    ReferenceCache,
    ReferenceLogps,
    cached_reference_logps,
    model_fingerprint,
)
from direct_align.tracking import Tracker
from direct_align.trainer import fit, resident_mb

log = logging.getLogger(__name__)

# Settings that may differ between a run and its --resume; any other difference is refused.
RESUMABLE = {"resume", "overwrite", "max_steps_per_run", "report_to", "eval_every", "save_every",
             "log_every", "save_total_limit", "run_name", "cache_dir", "eval_batch_size"}  # fmt: skip


def split_holdout(pairs: PairDataset, fraction: float, seed: int) -> tuple[PairDataset, PairDataset]:
    """A seeded random share of the pairs for evaluation (at least one), the rest for training."""
    if len(pairs) < 2:
        raise DataError(f"need at least 2 pairs to hold out an eval split, got {len(pairs)}")
    n_eval = max(1, round(fraction * len(pairs)))
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return pairs.subset(order[n_eval:]), pairs.subset(order[:n_eval])


def _check_resume_config(run: RunDir, cfg: TrainConfig) -> None:
    saved_path = run.path / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    differs = [f"{k}: {saved[k]!r} → {v!r}" for k, v in cfg.to_dict().items()
               if k not in RESUMABLE and k in saved and saved[k] != v]  # fmt: skip
    if differs:
        raise ConfigError(f"--resume: settings differ from {saved_path} ({'; '.join(differs)})")


def preference_model(model: Any, cfg: TrainConfig,
                     device: torch.device | str | None = None) -> PreferenceModel:  # fmt: skip
    """Wrap a causal LM for the configured layout, attention and log-prob computation.

    ``device``: where the model will run (default: where its parameters are now); ``--attn auto``
    picks the best segment attention kernel available there.
    """
    if cfg.layout == "padded" or cfg.attn in ("sdpa", "eager"):
        if cfg.attn in ("sdpa", "eager"):
            model.set_attn_implementation(cfg.attn)
        log.info("attention: %s with masks", model.config._attn_implementation)
        return PreferenceModel(model, chunked=cfg.chunked_logprobs, attention="mask")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    name, why = choose_attention(cfg.attn, device, half=uses_bf16(cfg))
    use_varlen_attention(model, name)
    log.info("attention: %s (%s)", name, why)
    # every segment-based kernel reads the segments that PreferenceModel passes in "segments" mode
    return PreferenceModel(model, chunked=cfg.chunked_logprobs, attention="segments")


def load_policy(model_path: str, cfg: TrainConfig, device: torch.device) -> PreferenceModel:
    """The policy to train: the model at ``model_path``, with LoRA adapters when ``--lora-r``
    is set, wrapped for the configured attention and log-probs, with gradient checkpointing
    when asked."""
    model = load_causal_lm(model_path)
    if cfg.lora_r is not None:
        model = apply_lora(model, cfg)
        log.info("LoRA r=%d alpha=%g on %s: %s", cfg.lora_r, cfg.lora_alpha,
                 cfg.lora_targets or ALL_LINEAR, trainable_summary(model))  # fmt: skip
    policy = preference_model(model, cfg, device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.lora_r is not None:  # frozen embeddings: recomputed blocks need an input that
            model.enable_input_require_grads()  # requires grad to pass gradients to adapters
    return policy


def resolve_inputs(cfg: Any) -> tuple[Path, str, str, BuiltinAssets | None]:
    """(cache dir, model path, training data source, built-in assets or None) of a run whose
    ``cfg`` has ``cache_dir``, ``model``, ``dataset`` and ``label_noise``; the built-in task
    (built once into the cache) fills in whatever was not given."""
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    assets = None
    if cfg.model is None or cfg.dataset is None:
        assets = ensure_builtin(cache_dir, BuiltinSpec())
    model_path = cfg.model or str(assets.model_dir)
    train_source = cfg.dataset or str(assets.train_file(cfg.label_noise))
    return cache_dir, model_path, train_source, assets


def _prepare(source: str, tokenizer: Any, cfg: TrainConfig, split: str) -> PreparedData:
    data = prepare_pairs(source, tokenizer, fmt=cfg.format, max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length, split=split)  # fmt: skip
    log.info("%s: %s format, %s", source, data.format, data.stats.describe())
    return data


def run_train(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train as configured; returns the summary, or None when stopped early for a later resume."""
    if cfg.online:  # sample, judge, learn: direct_align.online
        from direct_align.online_run import run_online

        return run_online(cfg)
    started, rss_at_start = time.time(), resident_mb()  # the runtime before any model
    run = RunDir(cfg.output_dir)
    run.check(resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:
        _check_resume_config(run, cfg)

    # 1. inputs: the built-in task fills in whatever was not given
    cache_dir, model_path, train_source, assets = resolve_inputs(cfg)
    tokenizer = load_tokenizer(model_path)
    train = _prepare(train_source, tokenizer, cfg, cfg.split).pairs
    if cfg.eval_dataset:
        evals = _prepare(cfg.eval_dataset, tokenizer, cfg, cfg.eval_split or cfg.split).pairs
    elif cfg.dataset is None:
        evals = _prepare(str(assets.eval_file), tokenizer, cfg, "train").pairs
    else:
        train, evals = split_holdout(train, cfg.eval_fraction, cfg.seed)
    log.info("pairs: %d train, %d eval", len(train), len(evals))

    # 2. models; the reference scores every pair once, then only the policy stays in memory
    bf16 = uses_bf16(cfg)
    accelerator = make_accelerator("bf16" if bf16 else "no")
    check_process_count(cfg.grad_accum, accelerator)
    check_engine(cfg, run, accelerator)
    quiet_unless_main(accelerator)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    policy = load_policy(model_path, cfg, accelerator.device)
    refs: dict[str, ReferenceLogps] | Callable[[PreferenceModel], dict[str, ReferenceLogps]] = {}
    ref_status: dict[str, str] = {}
    if uses_reference(cfg):
        score = partial(cached_reference_logps, tokenizer=tokenizer,
                        splits={"train": train, "eval": evals},
                        cache=ReferenceCache(cache_dir / "reference"),
                        settings={"precision": "bf16" if bf16 else "fp32"},
                        batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, layout=cfg.layout,
                        pad_token_id=tokenizer.pad_token_id, device=accelerator.device,
                        autocast=accelerator.autocast, accelerator=accelerator)  # fmt: skip
        if shards(accelerator) and not cfg.ref_model:
            # FSDP: no device holds the policy whole; the sharded initial policy scores the
            # pairs in fit, before any step (so the output directory exists by then)
            refs = partial(score_sharded, score, fingerprint=model_fingerprint(policy.model),
                           status=ref_status)  # fmt: skip
        else:
            reference = policy  # the initial policy; with LoRA, the base (adapters off below)
            if cfg.ref_model:
                ref_lm = load_causal_lm(cfg.ref_model, option="--ref-model")
                reference = preference_model(ref_lm, cfg, accelerator.device)
            reference.to(accelerator.device)
            with adapters_disabled(reference):
                refs, ref_status = score(reference)
            del reference
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # 3. outputs: only now is the output directory created or (with --overwrite) emptied
    tracker = open_outputs(run, cfg, accelerator, "train_state")
    try:
        state, eval_metrics, finished = fit(policy, train, evals, refs, cfg=cfg,
                                            accelerator=accelerator, run=run, tracker=tracker,
                                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        if not finished:
            return None
        accelerator.wait_for_everyone()
        whole = gathered_state_dict(policy, accelerator)  # FSDP: all processes gather
        if not main:  # the main process writes final/ and the summary
            return None
        model = accelerator.unwrap_model(policy).model
        _save_final(model, tokenizer, run, cfg.lora_save, whole)
        initial = _first_eval(run)  # step 0, also when logged before a resume
        summary: dict[str, Any] = {
            "loss": cfg.loss, "beta": cfg.beta, "steps": state.step,
            "epochs": state.pairs_seen / len(train), "train_pairs": len(train),
            "eval_pairs": len(evals), "initial": initial, "final": eval_metrics,
            "reference_cache": ref_status, "runtime_s": round(time.time() - started, 1),
            "models_in_memory": 1,  # while training: the policy (reference log-probs are cached)
            "processes": accelerator.num_processes,
            "rss_at_start_mb": rss_at_start,
            "train_runtime_s": round(state.train_seconds, 3),
            "train_samples_per_s": round(state.pairs_seen / max(state.train_seconds, 1e-9), 4),
        }  # fmt: skip
        if cfg.dataset is None:
            summary["builtin"] = _builtin_report(whole_model(model, whole, run), model_path,
                                                 tokenizer, assets, cfg)  # fmt: skip
        tracker.summary({**eval_metrics, **summary.get("builtin", {})})
        run.write_json("summary.json", summary)
        return summary
    finally:
        tracker.close()


def open_outputs(run: RunDir, cfg: TrainConfig, accelerator: Accelerator,
                 state_key: str) -> Tracker | NullTracker:  # fmt: skip
    """Create (or with --overwrite empty) the output directory, write ``config.yaml`` and open
    the tracker, continuing from the checkpoint's ``state_key`` step on --resume. The main
    process alone does this; the others wait for it and get a :class:`NullTracker`."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.prepare(overwrite=cfg.overwrite)
        if not cfg.resume:
            save_yaml(cfg, run.path / "config.yaml")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return NullTracker()
    resume_step = read_state(run.last_checkpoint())[state_key]["step"] if cfg.resume else None
    return Tracker(run.path, report_to=cfg.report_to, project=cfg.wandb_project,
                   run_name=cfg.run_name or run.path.name, config=cfg.to_dict(),
                   resume_step=resume_step)  # fmt: skip


def check_engine(cfg: TrainConfig, run: RunDir, accelerator: Accelerator) -> None:
    """Refuse what the engine (DDP or FSDP) rules out, before any work: resuming a checkpoint
    written by the other engine, and saving a merged LoRA model from a sharded one."""
    if cfg.resume:
        check_resumable(run.last_checkpoint(), accelerator)
    if cfg.lora_r is not None and cfg.lora_save == "merged" and shards(accelerator):
        raise ConfigError("--lora-save merged is not supported under FSDP; save the adapter")


def whole_model(model: Any, whole: dict[str, torch.Tensor] | None, run: RunDir) -> Any:
    """The trained policy in one piece, to sample from in the main process alone: ``model``,
    or when it was sharded (``whole``: its gathered weights) ``final/`` loaded back."""
    return model if whole is None else load_causal_lm(str(run.final))


def score_sharded(score: Callable[..., tuple[dict[str, ReferenceLogps], dict[str, str]]],
                   policy: PreferenceModel, *, fingerprint: str,
                   status: dict[str, str]) -> dict[str, ReferenceLogps]:  # fmt: skip
    """``score`` (:func:`cached_reference_logps`) of the prepared, sharded initial ``policy``
    (with LoRA, its adapters off) under the ``fingerprint`` of its whole weights; the cache
    status goes into ``status``."""
    with adapters_disabled(policy):
        refs, found = score(policy, fingerprint=fingerprint)
    status.update(found)
    return refs


def _first_eval(run: RunDir) -> dict[str, float]:
    """The step-0 eval record of metrics.jsonl (the initial policy), if logged."""
    path = run.path / "metrics.jsonl"
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 0 and any(k.startswith("eval/") for k in record):
            return {k: v for k, v in record.items() if k != "step"}
    return {}


def _save_final(model: Any, tokenizer: Any, run: RunDir, how: str = "adapter",
                state_dict: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """``final/``, written whole or not at all; ``how``: a LoRA policy's adapter or merged model;
    ``state_dict``: the weights gathered from a sharded (FSDP) ``model``."""
    tmp = run.final.with_name("final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_final(model, tokenizer, tmp, how, state_dict)
    os.replace(tmp, run.final)
    log.info("saved %s", run.final)


def _builtin_report(model: Any, reference_path: str, tokenizer: Any, assets: BuiltinAssets,
                    cfg: TrainConfig) -> dict[str, float]:  # fmt: skip
    """True reward and KL of samples on held-out prompts of the built-in task."""
    reference = load_causal_lm(reference_path).to(next(model.parameters()).device)
    report = generation_report(model, reference, tokenizer, assets.held_out_prompts(cfg.eval_prompts),
                               reward=true_reward, max_new_tokens=BuiltinSpec().max_new_tokens,
                               seed=cfg.seed)  # fmt: skip
    del reference
    return report
