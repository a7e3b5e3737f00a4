"""Online DPO: the policy samples, a judge scores, the policy learns from its own fresh pairs.

As in online AI-feedback DPO (Guo et al. 2024) and iterative DPO (Xiong et al. 2024), each
round of :func:`fit_online`:

1. takes the next ``prompts_per_round`` prompts (a seeded permutation, repeated when used up);
2. samples ``k = samples_per_prompt`` responses per prompt from the current policy (batched
   ``generate`` with a KV cache; temperature, top-p, ``max_new_tokens``);
3. scores every response with the judge (:mod:`direct_align.rewards`): ``k`` judge calls per
   prompt, where a *judge call* is one response scored;
4. pairs the best response of each prompt against its worst, or with ``pair_margin`` every two
   whose rewards differ by more than it; a prompt whose responses all tie gives no pair;
5. computes the reference log-probs of the fresh pairs with the reference model held in memory,
   or with LoRA the policy with its adapters off (none for reference-free losses such as SimPO
   and ORPO);
6. trains ``epochs`` passes over the round's pairs, in optimizer steps of ``batch_size ×
   grad_accum`` pairs (:func:`direct_align.trainer.optimizer_step`, as offline training).

A checkpoint at a round's end holds the weights, optimizer, schedule and RNG states; the data
of a round is a function of (seed, round), so ``--resume`` continues with the very same rounds.
A judge that fails stops the run after the last round's work is checkpointed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from direct_align.config import TrainConfig
from direct_align.data import PairDataset, fit_pair, load_source
from direct_align.data.batching import Batcher
from direct_align.data.tokenize import _left_truncate
from direct_align.distributed import (
    any_across,
    my_share,
    root_unsharded,
    shards,
    sum_across,
)
from direct_align.errors import DataError
from direct_align.evaluate import encode_prompts, sample
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import AdaptersOff
from direct_align.outputs import RunDir, read_state
from direct_align.progress import progress
from direct_align.reference import ReferenceLogps, score_shared
from direct_align.rewards import JudgeError, Rewards
from direct_align.tracking import Tracker
from direct_align.trainer import (
    LogWindow,
    eval_metrics_of,
    loss_kwargs,
    make_optimizer,
    optimizer_step,
    prepare_training,
)

log = logging.getLogger(__name__)


@dataclass
class OnlineState:
    """Where online training is: everything besides weights, optimizer and RNG that resuming needs."""

    round: int = 0  # rounds done
    step: int = 0  # optimizer steps done
    pairs: int = 0  # pairs made from judged samples
    pairs_seen: int = 0  # pairs trained on, counted once per epoch
    judge_calls: int = 0  # responses scored
    tokens_generated: int = 0  # response tokens sampled
    train_seconds: float = 0.0


def load_prompts(source: str, split: str | None = None) -> list[str]:
    """The ``prompt`` column of a dataset (any source :func:`load_source` reads), as texts."""
    ds = load_source(source, split=split)
    if "prompt" not in ds.column_names:
        raise DataError(f"{source}: online training needs a 'prompt' column "
                        f"(columns: {', '.join(ds.column_names)})")  # fmt: skip
    prompts = ds["prompt"]
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{source}: row {i}: 'prompt' must be non-empty text, got {p!r}")
    return list(prompts)


def round_prompts(n: int, per_round: int, seed: int, round_index: int) -> list[int]:
    """Indices of the prompts of round ``round_index``: consecutive slices of seeded
    permutations of ``range(n)``, a new permutation each time the prompts are used up."""
    out: list[int] = []
    position = round_index * per_round
    while len(out) < per_round:
        cycle, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + cycle))
        take = order[offset : offset + per_round - len(out)].tolist()
        out += take
        position += len(take)
    return out


def make_pairs(scores: torch.Tensor, margin: float | None = None) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) index triples from rewards ``[P, k]`` of k responses a prompt.

    Without ``margin``: the best response against the worst (the first of equals), none when
    all k tie. With ``margin``: every ordered pair whose rewards differ by more than ``margin``.
    """
    triples = []
    for p, row in enumerate(scores.tolist()):
        if margin is None:
            best = max(range(len(row)), key=row.__getitem__)
            worst = min(range(len(row)), key=row.__getitem__)
            if row[best] > row[worst]:
                triples.append((p, best, worst))
        else:
            triples += [(p, i, j) for i in range(len(row)) for j in range(len(row))
                        if row[i] - row[j] > margin]  # fmt: skip
    return triples


def pairs_from_samples(prompt_ids: list[list[int]], responses: list[list[int]], k: int,
                       triples: list[tuple[int, int, int]], *, max_length: int,
                       max_prompt_length: int | None, bos_id: int | None) -> PairDataset:  # fmt: skip
    """The pairs ``triples`` as token ids, fitted into ``max_length`` as offline pairs are.

    ``responses`` holds ``k`` responses per prompt, prompt by prompt (``P × k`` lists); pairs
    whose responses are identical after truncation are left out.
    """
    out = PairDataset([], [], [])
    for p, c, r in triples:
        fitted = fit_pair(prompt_ids[p], responses[p * k + c], responses[p * k + r],
                          max_length=max_length, max_prompt_length=max_prompt_length,
                          bos_id=bos_id)  # fmt: skip
        if fitted is None or fitted[1] == fitted[2] or not fitted[1] or not fitted[2]:
            continue
        out.prompt_ids.append(fitted[0])
        out.chosen_ids.append(fitted[1])
        out.rejected_ids.append(fitted[2])
    return out


def steps_per_round(cfg: TrainConfig) -> int:
    """The most optimizer steps one round can take (each prompt giving its most pairs)."""
    k = cfg.samples_per_prompt
    pairs = cfg.prompts_per_round * (1 if cfg.pair_margin is None else k * (k - 1) // 2)
    return cfg.epochs * math.ceil(math.ceil(pairs / cfg.batch_size) / cfg.grad_accum)


def fit_online(
    model: PreferenceModel,
    reference: PreferenceModel | AdaptersOff | None,
    prompts: list[str],
    rewards: Rewards,
    evals: PairDataset | None,
    ref_eval: ReferenceLogps | Callable[[PreferenceModel], ReferenceLogps] | None,
    *,
    tokenizer: Any,
    cfg: TrainConfig,
    accelerator: Accelerator,
    run: RunDir,
    tracker: Tracker,
) -> tuple[OnlineState, dict[str, float]]:
    """Train for ``cfg.rounds`` rounds (see the module docstring); returns (state, last eval).

    The learning-rate schedule is laid out over the most steps the rounds can take; rounds that
    give fewer pairs (ties) end it early. Raises :class:`~direct_align.rewards.JudgeError` after
    checkpointing the rounds done, and DirectAlignError on a non-finite loss.
    """
    device = accelerator.device
    pad = tokenizer.pad_token_id
    total = cfg.rounds * steps_per_round(cfg)
    optimizer, scheduler = make_optimizer(model, cfg, total)
    model, optimizer, load_kwargs = prepare_training(model, optimizer, scheduler, cfg=cfg,
                                                     accelerator=accelerator)  # fmt: skip
    if callable(ref_eval):  # under FSDP: scored by the sharded initial policy, before resuming
        ref_eval = ref_eval(model)
    state = OnlineState()
    if cfg.resume:
        checkpoint = run.last_checkpoint()
        accelerator.load_state(str(checkpoint), **load_kwargs)
        state = OnlineState(**read_state(checkpoint)["online_state"])
        log.info("resuming from %s (round %d of %d)", checkpoint, state.round, cfg.rounds)
    extra = loss_kwargs(cfg)
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size
    saved_round = state.round

    def evaluate() -> dict[str, float]:
        if evals is None:
            return {}
        metrics = eval_metrics_of(model, evals, ref_eval, cfg=cfg, accelerator=accelerator,
                                  pad_token_id=pad)  # fmt: skip
        tracker.log(metrics, state.step)
        return metrics

    def checkpoint() -> None:
        nonlocal saved_round
        run.save_checkpoint(state.step, lambda d: accelerator.save_state(str(d)),
                            {"online_state": asdict(state), "total_steps": total},
                            keep=cfg.save_total_limit, main=accelerator.is_main_process,
                            barrier=accelerator.wait_for_everyone)  # fmt: skip
        saved_round = state.round

    eval_metrics = evaluate() if state.round == 0 else {}
    k = cfg.samples_per_prompt
    bar = progress(total=cfg.rounds, initial=state.round, desc=f"online ({cfg.loss})",
                   unit="round", disable=not accelerator.is_main_process)  # fmt: skip
    try:
        while state.round < cfg.rounds:
            # 1-3. this round's prompts, k samples each from the current policy, all judged: k
            #      calls a prompt (with several processes each takes its share of the prompts)
            index = round_prompts(len(prompts), cfg.prompts_per_round, cfg.seed, state.round)
            texts = [prompts[i] for i in index]
            prompt_ids = encode_for_sampling(tokenizer, texts, cfg)
            lm = accelerator.unwrap_model(model).model
            try:
                responses, scores, judge_metrics = sample_and_judge(
                    lm, rewards, texts, prompt_ids, tokenizer=tokenizer, cfg=cfg,
                    accelerator=accelerator, batch_size=eval_batch * 2,
                    seed=cfg.seed * 100_003 + state.round, root=model)  # fmt: skip
            except JudgeError as e:
                raise _judge_failed(e, state, saved_round, checkpoint, run) from None
            ended = [bool(r) and r[-1] == tokenizer.eos_token_id for r in responses]
            state.judge_calls += len(responses)
            state.tokens_generated += sum(map(len, responses))
            # 4-5. pairs, and their reference log-probs
            triples = make_pairs(scores.view(len(texts), k), cfg.pair_margin)
            data = pairs_from_samples(prompt_ids, responses, k, triples, max_length=cfg.max_length,
                                      max_prompt_length=cfg.max_prompt_length,
                                      bos_id=tokenizer.bos_token_id)  # fmt: skip
            state.pairs += len(data)
            ref = None
            if reference is not None and len(data):
                ref = score_shared(reference, data, batch_size=eval_batch, layout=cfg.layout,
                                   pad_token_id=pad, device=device, autocast=accelerator.autocast,
                                   accelerator=accelerator)  # fmt: skip
            # 6. optimizer steps on the round's pairs
            window = LogWindow()
            batcher = Batcher(data, batch_size=cfg.batch_size, seed=cfg.seed + state.round,
                              layout=cfg.layout) if len(data) else None  # fmt: skip
            for epoch in range(cfg.epochs if batcher else 0):
                micro = batcher.micro_batches(epoch)
                for start in range(0, len(micro), cfg.grad_accum):
                    group = micro[start : start + cfg.grad_accum]
                    step_start = time.perf_counter()
                    metrics, tokens = optimizer_step(
                        model, data, group, ref, cfg=cfg, accelerator=accelerator,
                        optimizer=optimizer, scheduler=scheduler, pad_token_id=pad,
                        loss_options=extra, step=state.step + 1, run=run,
                    )  # fmt: skip
                    state.step += 1
                    state.pairs_seen += sum(map(len, group))
                    state.train_seconds += time.perf_counter() - step_start
                    window.add(metrics)
                    window.tokens += tokens
            state.round += 1
            logged = {f"online/{key}": v for key, v in judge_metrics.items()}
            logged |= {"online/round": state.round, "online/judge_calls": state.judge_calls,
                       "online/pairs": len(data), "online/prompts_without_pair": len(texts) - len({p for p, _, _ in triples}),
                       "online/response_tokens": sum(map(len, responses)) / len(responses),
                       "online/missing_eos": 1 - sum(ended) / len(ended)}  # fmt: skip
            steps_taken = window.steps  # this round's (flush starts the window anew)
            if window.steps:
                logged |= window.flush(scheduler.get_last_lr()[0], state.round, device)
            tracker.log(logged, state.step)
            bar.update(1)
            bar.set_postfix(reward=f"{judge_metrics['reward/total']:.3f}", pairs=len(data),
                            refresh=False)  # fmt: skip
            last = state.round == cfg.rounds
            if cfg.eval_every and not last and _crossed(state.step, steps_taken, cfg.eval_every):
                eval_metrics = evaluate()
            if cfg.save_every and not last and _crossed(state.step, steps_taken, cfg.save_every):
                checkpoint()
    finally:
        bar.close()
    return state, evaluate() or eval_metrics


def sample_and_judge(lm: Any, rewards: Rewards, texts: list[str], prompt_ids: list[list[int]], *,
                     tokenizer: Any, cfg: Any, accelerator: Accelerator, batch_size: int,
                     seed: int, root: torch.nn.Module | None = None,
                     ) -> tuple[list[list[int]], torch.Tensor, dict[str, float]]:  # fmt: skip
    """``k`` responses to each prompt, judged: (``P × k`` response ids, prompt by prompt; their
    rewards ``[P × k]``; the judges' mean metrics over all of them). ``cfg`` (a TrainConfig or
    LabelConfig) gives samples_per_prompt, max_new_tokens, temperature and top_p; ``root``: the
    prepared model that ``lm`` is inside of (under FSDP its own parameters are gathered around
    sampling, :func:`~direct_align.distributed.root_unsharded`).

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


def _crossed(step: int, steps_taken: int, every: int) -> bool:
    """Whether the last ``steps_taken`` steps, ending at ``step``, passed a multiple of ``every``."""
    return step // every > (step - steps_taken) // every


def _judge_failed(error: JudgeError, state: OnlineState, saved_round: int, checkpoint: Any,
                  run: RunDir) -> JudgeError:  # fmt: skip
    """The judge's error, after checkpointing the rounds done since the last checkpoint."""
    if state.round > saved_round:
        checkpoint()
    where = run.last_checkpoint()
    if where is None:
        note = "no round was trained; nothing to checkpoint"
    else:
        note = f"rounds done: {state.round}, checkpoint {where} (fix the judge, then --resume)"
    return JudgeError(f"round {state.round + 1}: {error}; {note}")


def encode_for_sampling(tokenizer: Any, prompts: list[str], cfg: TrainConfig) -> list[list[int]]:
    """Prompt ids as training tokenizes a standard-format prompt (BOS, then the text), cut from
    the left (BOS kept) to ``max_prompt_length`` (default ``max_length // 2``) tokens."""
    keep = max(1, min(cfg.max_prompt_length or cfg.max_length // 2, cfg.max_length - 1))
    return [_left_truncate(ids, keep, tokenizer.bos_token_id)
            for ids in encode_prompts(tokenizer, prompts)]  # fmt: skip
