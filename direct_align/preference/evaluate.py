"""Held-out preference metrics: the loss, implicit rewards and accuracy of a policy on pairs."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from accelerate import Accelerator

from direct_align.data import PairDataset
from direct_align.data.packing import build_batch
from direct_align.engine.distributed import even_share, sum_across
from direct_align.losses import preference_loss
from direct_align.models.logprobs import PreferenceModel
from direct_align.preference.reference import ReferenceLogps

# (the policy's causal LM, step) → eval/* metrics of its samples, logging a table of them
Probe = Callable[[Any, int], dict[str, float]]


@torch.no_grad()
def evaluate_pairs(
    model: PreferenceModel,
    pairs: PairDataset,
    ref: ReferenceLogps | None,
    *,
    loss: str,
    beta: float,
    loss_kwargs: dict[str, Any],
    batch_size: int,
    layout: str,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Loss and reward metrics over all ``pairs``, averaged pair-weighted over batches.

    With an ``accelerator`` of several processes the batches are dealt out among them
    (:func:`~direct_align.engine.distributed.even_share`) and the sums added up: every process returns
    the metrics of all pairs.
    """
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    order = sorted(range(len(pairs)), key=pairs.pair_tokens)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    shared = accelerator is not None and accelerator.num_processes > 1 and batches
    mine = even_share(batches, accelerator) if shared else [(b, True) for b in batches]
    for index, real in mine:
        batch = build_batch(pairs, index, layout, pad_token_id).to(device)
        with autocast():
            out = model(batch)
        refs = ref.select(batch.index.cpu()) if ref is not None else (None, None)
        value, metrics = preference_loss(
            loss, chosen_logps=out.chosen, rejected_logps=out.rejected,
            ref_chosen_logps=None if refs[0] is None else refs[0].to(device),
            ref_rejected_logps=None if refs[1] is None else refs[1].to(device),
            chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths, beta=beta,
            labels=pairs.labels_of(batch.index, device), **loss_kwargs,
        )  # fmt: skip
        for key, v in {"loss": value.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + v * len(index) * real
    model.train(was_training)
    if shared:
        totals = sum_across(totals, accelerator)
    return {key: v / len(pairs) for key, v in totals.items()}


def eval_metrics(model: PreferenceModel, evals: PairDataset, ref: ReferenceLogps | None, *,
                 cfg: Any, accelerator: Accelerator, pad_token_id: int) -> dict[str, float]:  # fmt: skip
    """``eval/*`` metrics of the held-out pairs under the settings of `train` (``cfg``)."""
    from direct_align.preference.settings import eval_loss

    loss, beta, options = eval_loss(cfg)
    metrics = evaluate_pairs(model, evals, ref, loss=loss, beta=beta, loss_kwargs=options,
                             batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                             layout=cfg.layout, pad_token_id=pad_token_id,
                             device=accelerator.device, autocast=accelerator.autocast,
                             accelerator=accelerator)  # fmt: skip
    return {f"eval/{k}": v for k, v in metrics.items()}


def held_out_evaluation(loop: Any, model: Any, evals: PairDataset | None,
                        ref: ReferenceLogps | None, *, cfg: Any, session: Any, pad_token_id: int,
                        probe: Probe | None) -> Callable[[], dict[str, float]]:  # fmt: skip
    """The evaluation a preference loop (offline or online) runs at its cadence and at the end:
    the held-out metrics, checked finite; at the final one a stop signal leaves a checkpoint
    first; otherwise the ``probe`` (main process, after the first step) adds the report of the
    policy's samples (with or without held-out pairs). Logged at the loop's step and returned."""

    def evaluate() -> dict[str, float]:
        step = loop.state.step
        metrics: dict[str, float] = {}
        if evals is not None:
            metrics = eval_metrics(model, evals, ref, cfg=cfg, accelerator=session.accelerator,
                                   pad_token_id=pad_token_id)  # fmt: skip
            loop.check_eval(metrics["eval/loss"])
            if loop.finished:  # the final evaluation: a stop signal now leaves a checkpoint first
                loop.stop_if_requested(f"at step {step}, during the final evaluation")
        if probe is not None and not loop.finished and step > 0 and session.main:
            metrics |= probe(session.accelerator.unwrap_model(model).model, step)
        if metrics:
            session.tracker.log(metrics, step)
        return metrics

    return evaluate
