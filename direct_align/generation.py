"""Sampling from a policy: batched ``generate``, sample-and-judge (online DPO, `label`), and the
log-probs of sampled responses (the evaluation's KL, :mod:`direct_align.evaluation.report`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedModel

from direct_align.engine.distributed import any_across, my_share, root_unsharded, shards, sum_across
from direct_align.models.logprobs import IGNORE, token_logps
from direct_align.rewards import JudgeError, Rewards


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


def sample_and_judge(lm: Any, rewards: Rewards, texts: list[str], prompt_ids: list[list[int]], *,
                     tokenizer: Any, cfg: Any, accelerator: Accelerator, batch_size: int,
                     seed: int, root: torch.nn.Module | None = None,
                     ) -> tuple[list[list[int]], torch.Tensor, dict[str, float]]:  # fmt: skip
    """``k`` responses to each prompt, judged: (``P × k`` response ids, prompt by prompt; their
    rewards ``[P × k]``; the judges' mean metrics over all of them). ``cfg`` (the settings of
    `train --online` or `label`) gives samples_per_prompt, max_new_tokens, temperature and top_p; ``root``: the
    prepared model that ``lm`` is inside of (under FSDP its own parameters are gathered around
    sampling, :func:`~direct_align.engine.distributed.root_unsharded`).

    With several processes each samples and judges every ``num_processes``-th prompt (with its
    own seed) and all receive every result. A judge failing in any process raises
    :class:`JudgeError` in all of them.
    """
    k = cfg.samples_per_prompt
    mine = my_share(range(len(texts)), accelerator)
    seed += 1_000_003 * accelerator.process_index
    # a sharded (FSDP) policy generates in all processes at once: as many prompts each (a short
    # share samples one more, dropped), every generate step in step with the others
    synced = shards(accelerator)
    extra = (-(-len(texts) // accelerator.num_processes) - len(mine)) if synced else 0
    with nullcontext() if root is None else root_unsharded(root, accelerator):
        responses = sample(lm, [prompt_ids[p] for p in mine + [0] * extra for _ in range(k)],
                           max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
                           temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                           synced=synced)[: len(mine) * k]  # fmt: skip
    decoded = tokenizer.batch_decode(responses, skip_special_tokens=True)
    ended = [bool(r) and r[-1] == tokenizer.eos_token_id for r in responses]
    error: JudgeError | None = None
    try:
        scores, metrics = rewards([texts[p] for p in mine for _ in range(k)], decoded,
                                  lengths=[len(r) for r in responses], ended=ended)  # fmt: skip
    except JudgeError as e:
        error = e
    if any_across(error is not None, accelerator):  # every process raises the first message
        if accelerator.num_processes > 1:
            raise JudgeError(gather_object([str(error)] if error else [])[0])
        raise error
    if accelerator.num_processes == 1:
        return responses, scores, metrics
    n = len(responses)
    metrics = sum_across({key: v * n for key, v in metrics.items()} | {"n": n}, accelerator)
    total = metrics.pop("n")
    records = gather_object([(p, responses[i * k : (i + 1) * k], scores[i * k : (i + 1) * k].tolist())
                             for i, p in enumerate(mine)])  # fmt: skip
    records.sort(key=lambda record: record[0])
    return ([r for _, rs, _ in records for r in rs],
            torch.tensor([x for _, _, xs in records for x in xs], dtype=torch.float64),
            {key: v / total for key, v in metrics.items()})  # fmt: skip


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
