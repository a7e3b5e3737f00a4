"""`direct-align train` from settings to outputs: offline, or ``--online``.

Every input (output directory rules, model, tokenizer, data, judges, reference log-probs) is
loaded and checked before the output directory is created or emptied, so bad input never costs
existing work. Offline, the reference scores every pair once (cached on disk), then only the
policy stays in memory. Online, fresh samples need reference log-probs every round: with LoRA
(``--lora-r``) and no ``--ref-model`` the reference is the policy with its adapters off (no
second copy of the weights), otherwise a reference model is held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from accelerate.utils import set_seed

from direct_align.builtin.inputs import Inputs, resolve_inputs
from direct_align.data import PairDataset, prepare_pairs, split_holdout
from direct_align.data.prompts import load_prompts
from direct_align.engine.distributed import from_main, reads_weights, shard_frozen
from direct_align.engine.session import Session, free_memory
from direct_align.engine.tracking import first_eval
from direct_align.errors import ConfigError, DataError
from direct_align.evaluation.heldout import prompt_keep, run_report
from direct_align.evaluation.report import SampleReport
from direct_align.losses import LOSSES
from direct_align.models.loading import (
    describe_model,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    preference_model,
)
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import AdaptersOff, adapters_disabled
from direct_align.preference.evaluate import Probe
from direct_align.preference.groups import group_kwargs
from direct_align.preference.offline import fit
from direct_align.preference.online import fit_online
from direct_align.preference.reference import (
    ReferenceCache,
    ReferenceLogps,
    cached_reference_logps,
    model_fingerprint,
    score_sharded,
)
from direct_align.preference.settings import (
    TrainConfig,
    balance_kto,
    eval_loss,
    loss_kwargs,
    uses_reference,  # fmt: skip
)
from direct_align.rewards import RewardModelJudge, load_rewards
from direct_align.settings import frozen_dtype, uses_bf16

log = logging.getLogger(__name__)


def run_train(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train as configured; returns the summary (also in ``summary.json``), or None in the
    processes other than the main one and when stopped early for a later ``--resume``."""
    with Session(cfg) as session:
        return (_run_online if cfg.online else _run_offline)(cfg, session)


def _prepare(source: str, tokenizer: Any, cfg: TrainConfig, split: str,
             loss: str | None = None) -> PairDataset:  # fmt: skip
    """The pairs (or KTO's labelled examples) of ``source`` for ``loss`` (default: the
    training loss; held-out data: the evaluation's, :func:`eval_loss`)."""
    loss = loss or cfg.loss
    data = prepare_pairs(source, tokenizer, fmt=cfg.format, max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length, split=split, unpaired=True,
                         unpaired_from_pairs=cfg.unpaired_from_pairs, seed=cfg.seed)  # fmt: skip
    kind = "unpaired " if data.unpaired else ""
    log.info("%s: %s%s format, %s", source, kind, data.format, data.stats.describe())
    if LOSSES[loss].unpaired and not data.unpaired:
        raise DataError(f"{source}: --loss {loss} trains on unpaired feedback (prompt, "
                        "completion, label) and these are pairs; pass --unpaired-from-pairs to "
                        "take chosen as desirable and rejected as undesirable")  # fmt: skip
    if data.unpaired and not LOSSES[loss].unpaired:
        raise DataError(f"{source}: unpaired feedback (prompt, completion, label) trains with "
                        f"--loss kto, not --loss {loss}, which needs pairs")  # fmt: skip
    return data.pairs


def _eval_pairs(cfg: TrainConfig, inputs: Inputs, tokenizer: Any) -> PairDataset | None:
    """The held-out pairs: --eval-dataset, or the built-in task's (None otherwise)."""
    loss = eval_loss(cfg)[0]
    if cfg.eval_dataset:
        return _prepare(cfg.eval_dataset, tokenizer, cfg, cfg.eval_split or cfg.split, loss)
    if cfg.dataset is None:
        return _prepare(str(_builtin_eval_file(cfg, inputs)), tokenizer, cfg, "train", loss)
    return None


def _builtin_eval_file(cfg: TrainConfig, inputs: Inputs) -> Any:
    """The built-in task's held-out pairs, or their responses as thumbs up/down for kto."""
    if LOSSES[eval_loss(cfg)[0]].unpaired:
        return inputs.assets.thumbs_eval_file(cfg.thumbs_threshold)
    return inputs.assets.eval_file


def _eval_source(cfg: TrainConfig, inputs: Inputs) -> str:
    """Where the held-out pairs come from (for the run's config)."""
    if cfg.eval_dataset:
        return cfg.eval_dataset
    if cfg.dataset is None:
        return str(_builtin_eval_file(cfg, inputs))
    return f"{inputs.source} (a held-out {cfg.eval_fraction:g} of it)"


def _scorer(cfg: TrainConfig, inputs: Inputs, tokenizer: Any, session: Session,
            splits: dict[str, PairDataset]) -> Callable[..., Any]:  # fmt: skip
    """:func:`cached_reference_logps` of ``splits``, waiting for a reference model."""
    return partial(cached_reference_logps, tokenizer=tokenizer, splits=splits,
                   cache=ReferenceCache(inputs.cache_dir / "reference"),
                   settings={"precision": "bf16" if uses_bf16(cfg) else "fp32"},
                   batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, layout=cfg.layout,
                   pad_token_id=tokenizer.pad_token_id, device=session.accelerator.device,
                   autocast=session.accelerator.autocast, accelerator=session.accelerator,
                   check_stop=lambda: session.check_stop("during the reference pass"))  # fmt: skip


def _sample_report(cfg: TrainConfig, inputs: Inputs, tokenizer: Any, session: Session,
                   judge: Any = None) -> SampleReport | None:  # fmt: skip
    """The report of the policy's samples at each evaluation: the built-in task's hidden reward,
    or on own data the --eval-prompts-file report (None without one)."""
    return run_report(cfg, inputs, tokenizer, cfg.ref_model or inputs.model_path,
                      device=session.accelerator.device, judge=judge)  # fmt: skip


def _conclude(session: Session, prepared: Any, tokenizer: Any, hidden: SampleReport | None,
              cfg: TrainConfig, summary: dict[str, Any], tracked: dict[str, float],
              ) -> dict[str, Any] | None:  # fmt: skip
    """Write final/ (every process takes part under FSDP), then in the main process the report
    of the trained policy's samples and the summary; returns the summary there."""
    model = session.save_final(prepared, tokenizer, how=cfg.lora_save)
    if not session.main:
        return None
    if hidden is not None:  # the reward, win rate and KL of the policy's samples
        model = model if model is not None else session.load_final()  # sharded: read it back
        report, rows = hidden(model)
        summary[hidden.name] = report  # "builtin", or "evaluation" on own data
        summary[hidden.seconds_key] = round(hidden.seconds, 1)  # along training and at the end
        session.tracker.log({f"eval/{k}": v for k, v in report.items()}, summary["steps"])
        session.tracker.log_table("eval/generations", rows, summary["steps"])
    return session.finish(summary, {**tracked, **(summary.get(hidden.name, {}) if hidden else {})})


def _probe(session: Session, hidden: SampleReport | None) -> Probe | None:
    """What an evaluation during training adds: the reward, win rate and KL of the policy's
    samples (built-in task, --eval-prompts-file), and a table of them. None where it cannot be
    computed: no such report, or a policy sharded by FSDP."""
    if hidden is None or session.sharded:
        return None

    def probe(lm: Any, step: int) -> dict[str, float]:
        report, rows = hidden(lm)
        session.tracker.log_table("eval/generations", rows, step)
        return {f"eval/{k}": v for k, v in report.items()}

    return probe


def _second_reference(cfg: TrainConfig, path: str, option: str,
                      accelerator: Any) -> tuple[PreferenceModel, str]:  # fmt: skip
    """A reference model apart from the policy, frozen in the compute dtype and ready to score
    (under FSDP sharded as the policy is, read by the main process alone), and the fingerprint
    of its whole weights that keys the reference cache, computed where they were read."""
    lm = load_causal_lm(path, dtype=frozen_dtype(cfg), option=option,
                        unread=not reads_weights(accelerator))  # fmt: skip
    fingerprint = from_main(lambda: model_fingerprint(lm), accelerator)
    reference = preference_model(lm, cfg, bf16=uses_bf16(cfg), device=accelerator.device)
    return shard_frozen(reference, accelerator), fingerprint


def _start(cfg: TrainConfig, session: Session) -> None:
    session.start(bf16=uses_bf16(cfg), grad_accum=cfg.grad_accum)
    if cfg.lora_r is not None and cfg.lora_save == "merged" and session.sharded:
        raise ConfigError("--lora-save merged is not supported under FSDP; save the adapter")


def _run_offline(cfg: TrainConfig, session: Session) -> dict[str, Any] | None:
    # 1. inputs: the built-in task fills in whatever was not given
    inputs = resolve_inputs(cfg)
    tokenizer = load_tokenizer(inputs.model_path)
    train = _prepare(inputs.source, tokenizer, cfg, cfg.split)
    evals = _eval_pairs(cfg, inputs, tokenizer)
    if evals is None:
        train, evals = split_holdout(train, cfg.eval_fraction, cfg.seed)
    log.info("%s: %d train, %d eval", "examples" if train.labels is not None else "pairs",
             len(train), len(evals))  # fmt: skip
    if train.labels is not None:
        cfg = balance_kto(cfg, train.labels)

    # 2. models; the reference scores every pair once, then only the policy stays in memory
    _start(cfg, session)
    hidden = _sample_report(cfg, inputs, tokenizer, session)
    accelerator = session.accelerator
    set_seed(cfg.seed)
    policy = load_policy(inputs.model_path, cfg, bf16=uses_bf16(cfg), device=accelerator.device,
                         unread=not reads_weights(accelerator))  # fmt: skip
    refs: dict[str, ReferenceLogps] | Callable[[PreferenceModel], dict[str, ReferenceLogps]] = {}
    ref_status: dict[str, str] = {}
    if uses_reference(cfg):
        score = _scorer(cfg, inputs, tokenizer, session, {"train": train, "eval": evals})
        if session.sharded and not cfg.ref_model:
            # FSDP: no device holds the policy whole; the sharded initial policy scores the
            # pairs in fit, before any step (so the output directory exists by then)
            fingerprint = from_main(lambda: model_fingerprint(policy.model), accelerator)
            refs = partial(score_sharded, score, fingerprint=fingerprint, status=ref_status)
        elif cfg.ref_model:  # scores the pairs once, then is freed
            reference, fingerprint = _second_reference(cfg, cfg.ref_model, "--ref-model",
                                                       accelerator)  # fmt: skip
            refs, ref_status = score(reference, fingerprint=fingerprint)
            del reference
            free_memory()
        else:  # the initial policy; with LoRA, the base (adapters off)
            with adapters_disabled(policy.to(accelerator.device)):
                refs, ref_status = score(policy)
            free_memory()

    # 3. outputs: only now is the output directory created or (with --overwrite) emptied
    session.open(inputs={
        "model": describe_model(policy, inputs.model_path),
        "data": {"source": inputs.source, "eval_source": _eval_source(cfg, inputs),
                 "train_rows": len(train), "eval_rows": len(evals)},
        "reference": {"model": cfg.ref_model or inputs.model_path, "cache": ref_status}})  # fmt: skip
    state, eval_metrics, prepared, finished = fit(policy, train, evals, refs, cfg=cfg,
                                                  session=session,
                                                  pad_token_id=tokenizer.pad_token_id,
                                                  probe=_probe(session, hidden))  # fmt: skip
    if not finished:
        return None
    summary: dict[str, Any] = {
        "loss": cfg.loss, "beta": cfg.beta, **loss_kwargs(cfg), "steps": state.step,
        "epochs": state.pairs_seen / len(train), "train_pairs": len(train),
        "eval_pairs": len(evals), "initial": first_eval(session.run.path), "final": eval_metrics,
        "reference_cache": ref_status,
        "models_in_memory": 1,  # while training: the policy (reference log-probs are cached)
        "train_runtime_s": round(state.train_seconds, 3),
        "train_samples_per_s": round(state.pairs_seen / max(state.train_seconds, 1e-9), 4),
    }  # fmt: skip
    return _conclude(session, prepared, tokenizer, hidden, cfg, summary, tracked=eval_metrics)


def _run_online(cfg: TrainConfig, session: Session) -> dict[str, Any] | None:
    # 1. inputs: prompts (a dataset's prompt column, or the built-in task's), judges, eval pairs
    inputs = resolve_inputs(cfg)
    tokenizer = load_tokenizer(inputs.model_path)
    prompts = load_prompts(inputs.source, tokenizer, split=cfg.split if cfg.dataset else None,
                           keep=prompt_keep(cfg), fmt=cfg.format)  # fmt: skip
    log.info("prompts: %d from %s", len(prompts), inputs.source)
    _start(cfg, session)
    accelerator = session.accelerator
    if cfg.prompts_per_round < accelerator.num_processes:
        raise ConfigError(f"--prompts-per-round {cfg.prompts_per_round} is fewer than the "
                          f"{accelerator.num_processes} processes (each samples a share of them)")  # fmt: skip
    rewards = load_rewards(cfg.reward or ["builtin"], length_penalty=cfg.length_penalty,
                           eos_penalty=cfg.eos_penalty, max_length=cfg.max_length,
                           device=accelerator.device)  # fmt: skip
    log.info("judge: %s", " + ".join(f"{j.weight:g}·{j.name}" for j in rewards.judges))
    evals = _eval_pairs(cfg, inputs, tokenizer)
    hidden = _sample_report(cfg, inputs, tokenizer, session, judge=rewards)

    # 2. models: the policy, and the reference for the fresh samples: the policy with its LoRA
    #    adapters off, or a second model held in memory
    set_seed(cfg.seed)
    bf16 = uses_bf16(cfg)
    policy = load_policy(inputs.model_path, cfg, bf16=bf16, device=accelerator.device,
                         unread=not reads_weights(accelerator))  # fmt: skip
    reference: PreferenceModel | AdaptersOff | None = None
    ref_fp: str | None = None  # of a second reference model (else computed when scoring)
    ref_eval: ReferenceLogps | Callable[[PreferenceModel], ReferenceLogps] | None = None
    if uses_reference(cfg) and cfg.lora_r is not None and not cfg.ref_model:
        # under FSDP no device holds the policy whole: it moves there sharded (fit_online)
        reference = AdaptersOff(policy if session.sharded else policy.to(accelerator.device))
    elif uses_reference(cfg):
        reference, ref_fp = _second_reference(cfg, cfg.ref_model or inputs.model_path,
                                              "--ref-model" if cfg.ref_model else "--model",
                                              accelerator)  # fmt: skip
    if reference is not None and evals is not None:
        score = _scorer(cfg, inputs, tokenizer, session, {"eval": evals})
        if session.sharded and isinstance(reference, AdaptersOff):  # the sharded policy scores
            whole_fp = from_main(lambda: model_fingerprint(policy.model), accelerator)
            ref_eval = lambda prepared: score_sharded(  # noqa: E731
                score, prepared, fingerprint=whole_fp, status={})["eval"]
        else:
            ref_eval = score(reference, fingerprint=ref_fp)[0]["eval"]

    # 3. outputs: only now is the output directory created or (with --overwrite) emptied
    session.open(inputs={
        "model": describe_model(policy, inputs.model_path),
        "data": {"source": inputs.source, "prompt_rows": len(prompts),
                 "eval_rows": len(evals) if evals is not None else 0},
        "judges": {j.name: j.weight for j in rewards.judges},
        "reference": {"model": cfg.ref_model or inputs.model_path}})  # fmt: skip
    state, eval_metrics, prepared, finished = fit_online(
        policy, reference, prompts, rewards, evals, ref_eval, tokenizer=tokenizer, cfg=cfg,
        session=session, probe=_probe(session, hidden))  # fmt: skip
    if not finished:
        return None
    summary: dict[str, Any] = {
        "loss": cfg.loss, "beta": cfg.beta, **group_kwargs(cfg), "eval_loss": eval_loss(cfg)[0],
        "online": True, "rounds": state.round,
        "steps": state.step, "judge_calls": state.judge_calls, "train_pairs": state.pairs,
        "pairs_seen": state.pairs_seen, "tokens_generated": state.tokens_generated,
        # policy, a reference model for fresh pairs (not with LoRA: the policy with its
        # adapters off), reward-model judges
        "models_in_memory": 1 + isinstance(reference, PreferenceModel)
        + sum(isinstance(j.judge, RewardModelJudge) for j in rewards.judges),
        "initial": first_eval(session.run.path), "final": eval_metrics,
        "train_runtime_s": round(state.train_seconds, 3),
    }  # fmt: skip
    return _conclude(session, prepared, tokenizer, hidden, cfg, summary,
                     tracked={**eval_metrics, "online/judge_calls": state.judge_calls})  # fmt: skip
