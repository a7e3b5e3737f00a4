"""The offline preference loop: direct losses on a fixed set of pairs, read top to bottom.

Per optimizer step: ``grad_accum`` micro-batches of pairs (a fixed count, or a token budget),
laid out for one forward each → policy log-prob sums → loss against the cached reference sums →
backward, each micro-batch weighted by its share of the step's pairs (so every step is a mean
over its pairs, whatever the micro-batch sizes) → clip → AdamW → schedule. The data order is
deterministic per (seed, epoch) (:mod:`direct_align.data.batching`), so the position (epoch,
micro-batch) is all a checkpoint needs to resume the exact same sequence of batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from direct_align.data import PairDataset
from direct_align.data.batching import Batcher
from direct_align.data.packing import build_batch
from direct_align.engine.loop import EpochState, Loop
from direct_align.engine.session import Session
from direct_align.engine.step import Forward, make_optimizer, optimizer_step, prepare
from direct_align.losses import preference_loss
from direct_align.models.logprobs import PreferenceModel
from direct_align.preference.evaluate import Probe, held_out_evaluation
from direct_align.preference.reference import ReferenceLogps
from direct_align.preference.settings import TrainConfig, loss_kwargs

# the reference sums of the train and eval pairs, or (FSDP, where only the sharded policy
# exists) a function that computes them from the prepared policy
References = dict[str, ReferenceLogps] | Callable[[PreferenceModel], dict[str, ReferenceLogps]]


def train_step(model: Any, data: PairDataset, group: list[list[int]], ref: ReferenceLogps | None,
               *, cfg: TrainConfig, accelerator: Accelerator, optimizer: torch.optim.Optimizer,
               scheduler: Any, pad_token_id: int) -> tuple[dict[str, float], int]:  # fmt: skip
    """One optimizer step on the micro-batches ``group`` (pair indices into ``data``, whose
    reference sums are ``ref``; None: reference-free), each process taking its share.

    Returns (the step's pair-weighted metrics with ``grad_norm``, tokens computed); raises
    :class:`~direct_align.engine.loop.NonFinite` before a non-finite loss reaches the weights.
    """
    device = accelerator.device
    options = loss_kwargs(cfg)

    def forward(index: list[int]) -> Forward:
        batch = build_batch(data, index, cfg.layout, pad_token_id).to(device)
        out = model(batch)
        ref_c, ref_r = ref.select(batch.index.cpu()) if ref else (None, None)
        loss, metrics = preference_loss(
            cfg.loss, chosen_logps=out.chosen, rejected_logps=out.rejected,
            ref_chosen_logps=None if ref_c is None else ref_c.to(device),
            ref_rejected_logps=None if ref_r is None else ref_r.to(device),
            chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths,
            beta=cfg.beta, labels=data.labels_of(batch.index, device), **options,
        )  # fmt: skip
        return Forward(loss, metrics, batch.num_tokens)

    return optimizer_step(model, group, forward, accelerator=accelerator, optimizer=optimizer,
                          scheduler=scheduler, max_grad_norm=cfg.max_grad_norm)


def fit(policy: PreferenceModel, train: PairDataset, evals: PairDataset, refs: References, *,
        cfg: TrainConfig, session: Session, pad_token_id: int,
        probe: Probe | None = None) -> tuple[EpochState, dict[str, float], Any, bool]:  # fmt: skip
    """Train until the last step, or until ``--max-steps-per-run`` steps in this invocation.

    ``probe``: what evaluations during training add (samples of the policy, scored), in the
    main process. Returns (state, the last eval metrics, the prepared policy, finished). Raises
    :class:`~direct_align.errors.Interrupted` after saving a checkpoint on SIGTERM/SIGINT, and
    DirectAlignError on a non-finite loss, before it reaches the weights.
    """
    accelerator = session.accelerator
    batcher = Batcher(train, batch_size=cfg.batch_size, seed=cfg.seed, layout=cfg.layout,
                      max_tokens=cfg.max_tokens_per_batch)  # fmt: skip
    total = batcher.total_steps(cfg.epochs, cfg.grad_accum, cfg.max_steps)
    optimizer, scheduler = make_optimizer(policy, cfg, total)
    model, optimizer, load_kwargs = prepare(policy, optimizer, scheduler, accelerator=accelerator,
                                            micro_batch_size=cfg.batch_size,
                                            max_grad_norm=cfg.max_grad_norm)  # fmt: skip
    if callable(refs):  # under FSDP: the sharded initial policy scores the pairs, before resuming
        refs = refs(model)
    ref_train, ref_eval = refs.get("train"), refs.get("eval")
    loop = Loop(session, EpochState(), model=model, scheduler=scheduler, total=total, cfg=cfg,
                desc=f"train ({cfg.loss})")
    loop.resume(load_kwargs)
    state = loop.state

    evaluate = held_out_evaluation(loop, model, evals, ref_eval, cfg=cfg, session=session,
                                   pad_token_id=pad_token_id, probe=probe)  # fmt: skip

    eval_metrics_now = evaluate() if state.step == 0 else {}
    groups = batcher.step_groups(cfg.grad_accum, state)
    with loop.running():
        while not loop.finished:
            # 1. forward and backward over this step's micro-batches (each process its share),
            #    then clip, AdamW, schedule
            group = next(groups)
            with loop.step():
                metrics, tokens = train_step(model, train, group, ref_train, cfg=cfg,
                                             accelerator=accelerator, optimizer=optimizer,
                                             scheduler=scheduler, pad_token_id=pad_token_id)  # fmt: skip
            state.micro += len(group)
            state.pairs_seen += sum(map(len, group))
            loop.record(metrics, tokens, loss=metrics["loss"], acc=metrics["rewards/accuracies"])
            # 2. log, evaluate, checkpoint, stop (signals, --max-steps-per-run)
            loop.log_train({"train/lr": scheduler.get_last_lr()[0],
                            "train/epoch": state.pairs_seen / len(train)})  # fmt: skip
            if loop.eval_due():
                eval_metrics_now = evaluate()
            if loop.boundary():
                return state, eval_metrics_now, model, False
    return state, evaluate(), model, True
