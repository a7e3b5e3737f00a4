"""Evaluation: preference metrics on held-out pairs; sampling, true reward and KL of generations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from statistics import mean
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from direct_align.data import PairDataset
from direct_align.data.packing import build_batch
from direct_align.distributed import even_share, sum_across
from direct_align.losses import preference_loss
from direct_align.models.logprobs import IGNORE, PreferenceModel, token_logps
from direct_align.reference import ReferenceLogps


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
    (:func:`~direct_align.distributed.even_share`) and the sums added up: every process returns
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
            **loss_kwargs,
        )  # fmt: skip
        for key, v in {"loss": value.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + v * len(index) * real
    model.train(was_training)
    if shared:
        totals = sum_across(totals, accelerator)
    return {key: v / len(pairs) for key, v in totals.items()}


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt ids as training sees a standard-format prompt: BOS (if any) then the text."""
    ids = tokenizer(list(prompts), add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return [[bos, *p] if bos is not None and (not p or p[0] != bos) else p for p in ids]


def left_pad(prompt_ids: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest, as ``generate`` wants them: (ids, mask), ``[B, P]``."""
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompt_ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    synced: bool = False,
) -> list[list[int]]:
    """One sampled response per prompt (ancestral sampling, no top-k; nucleus sampling when
    ``top_p < 1``), ending at EOS.

    Batched ``generate`` with a KV cache on left-padded prompts; the global RNG is left as found.
    Deterministic for a given (seed, batch_size): batches draw from one random stream in turn.
    ``synced``: the model is sharded (FSDP) and every process calls this with as many prompts;
    each keeps stepping until all are done (``generate``'s ``synced_gpus``).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompt_ids), batch_size):
            ids, mask = left_pad(prompt_ids[start : start + batch_size], pad_token_id)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                temperature=temperature, top_k=0, top_p=top_p, max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, synced_gpus=synced,
            )  # fmt: skip
            for row in out[:, width:].tolist():
                cut = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
                responses.append(row[:cut])
    model.train(was_training)
    return responses


@torch.no_grad()
def score_responses(
    model: PreTrainedModel,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    pad_token_id: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Log-prob sums [N] of each response given its prompt."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [p + r for p, r in zip(prompt_ids[start : start + batch_size],
                                      response_ids[start : start + batch_size])]  # fmt: skip
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for i, (row, p) in enumerate(zip(rows, prompt_ids[start : start + batch_size])):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, len(p) : len(row)] = torch.tensor(row[len(p) :], dtype=torch.long)
            mask[i, : len(row)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       use_cache=False).logits  # fmt: skip
        logps, _ = token_logps(logits, labels.to(device))
        sums.append(logps.sum(-1).float().cpu())
    model.train(was_training)
    return torch.cat(sums)


def generation_report(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    reward: Callable[[str], float],
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """True reward of the reference's and the policy's samples on ``prompts``, and KL.

    KL(policy‖reference) is the sequence-level Monte-Carlo estimate used in the DPO paper's
    reward/KL frontier: the mean over policy samples y of log π(y|x) − log π_ref(y|x), in nats.
    """
    prompt_ids = encode_prompts(tokenizer, prompts)
    common = {"max_new_tokens": max_new_tokens, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "batch_size": batch_size, "seed": seed}  # fmt: skip
    report: dict[str, float] = {}
    for name, model in (("reference", reference), ("policy", policy)):
        responses = sample(model, prompt_ids, **common)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        report[f"{name}/true_reward"] = mean(map(reward, texts))
        report[f"{name}/response_tokens"] = float(mean(map(len, responses)))
    pad = tokenizer.pad_token_id
    logp_policy = score_responses(policy, prompt_ids, responses, pad_token_id=pad)
    logp_ref = score_responses(reference, prompt_ids, responses, pad_token_id=pad)
    report["policy/kl"] = (logp_policy - logp_ref).mean().item()
    return report
