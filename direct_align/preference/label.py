"""Iterative DPO on disk: `direct-align label` and `direct-align select`.

`label` does one round of online DPO's data step and writes it out: a policy samples k responses
per prompt, a judge scores them, and the best-versus-worst pairs (or every pair past
``--pair-margin``) go to a standard-format JSONL file with their scores, to inspect and to train
on with `direct-align train --dataset FILE`. Label, train, label with the new policy, train: that
is iterative DPO.

`select` ranks unlabelled candidate pairs (rows with ``prompt``, ``a`` and ``b``) by how unsure
the policy is about them: the absolute implicit-reward margin of the loss (for DPO
``|β·[(log π(a) − log π_ref(a)) − (log π(b) − log π_ref(b))]|``), smallest first, so that the
pairs the policy cannot yet tell apart are labelled first.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from direct_align.builtin.inputs import resolve_inputs
from direct_align.config import to_dict
from direct_align.data import PairDataset, load_source
from direct_align.data.prompts import load_prompts
from direct_align.engine.distributed import make_accelerator, quiet_unless_main
from direct_align.engine.outputs import write_atomic
from direct_align.engine.tracking import Tracker
from direct_align.errors import ConfigError, DataError
from direct_align.generation import sample_and_judge
from direct_align.losses import LOSSES
from direct_align.models.loading import load_causal_lm, load_tokenizer
from direct_align.models.logprobs import PreferenceModel
from direct_align.preference.label_settings import LabelConfig, SelectConfig
from direct_align.preference.reference import score_shared
from direct_align.preference.round_work import make_pairs
from direct_align.rewards import load_rewards
from direct_align.rm.model import encode_responses

log = logging.getLogger(__name__)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


def run_label(cfg: LabelConfig) -> dict[str, Any] | None:
    """Sample, judge and pair; writes the pairs and returns counts and the judges' means (None
    in the processes other than the main one: with several, each samples and judges its share
    of the prompts)."""
    inputs = resolve_inputs(cfg)
    model_path, source = inputs.model_path, inputs.source
    tokenizer = load_tokenizer(model_path)
    keep = max(1, min(cfg.max_prompt_length or cfg.max_length // 2, cfg.max_length - 1))
    loaded = load_prompts(source, tokenizer, split=cfg.split if cfg.dataset else None, keep=keep)
    prompts, prompt_ids = loaded.texts[: cfg.max_prompts], loaded.ids[: cfg.max_prompts]
    accelerator = make_accelerator("no")
    quiet_unless_main(accelerator)
    if len(prompts) < accelerator.num_processes:
        raise ConfigError(f"{len(prompts)} prompts are fewer than the {accelerator.num_processes} "
                          "processes (each samples a share of them)")  # fmt: skip
    rewards = load_rewards(cfg.reward or ["builtin"], length_penalty=cfg.length_penalty,
                           eos_penalty=cfg.eos_penalty, max_length=cfg.max_length,
                           device=accelerator.device)  # fmt: skip
    policy = load_causal_lm(model_path).to(accelerator.device)
    k = cfg.samples_per_prompt
    responses, scores, metrics = sample_and_judge(
        policy, rewards, prompts, prompt_ids,
        tokenizer=tokenizer, cfg=cfg, accelerator=accelerator, batch_size=cfg.batch_size,
        seed=cfg.seed)  # fmt: skip
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rows = []
    for p, c, r in make_pairs(scores.view(len(prompts), k), cfg.pair_margin):
        chosen, rejected = texts[p * k + c], texts[p * k + r]
        if chosen != rejected:
            rows.append({"prompt": prompts[p], "chosen": chosen, "rejected": rejected,
                         "score_chosen": scores[p * k + c].item(),
                         "score_rejected": scores[p * k + r].item()})  # fmt: skip
    if not rows:
        raise DataError(f"{source}: no pair to write: every prompt's {k} responses tied")
    if not accelerator.is_main_process:
        return None
    _write_jsonl(cfg.output, rows)
    result = {"prompts": len(prompts), "judge_calls": len(responses), "pairs": len(rows),
              "output": cfg.output, **metrics}  # fmt: skip
    report(cfg, result, "pairs", rows, {"model": model_path, "prompts": source,
                                        "judges": {j.name: j.weight for j in rewards.judges}})  # fmt: skip
    return result


def read_candidates(source: str, split: str | None) -> list[dict]:
    """Rows with text ``prompt``, ``a`` and ``b`` (other columns are kept as they are)."""
    ds = load_source(source, split=split)
    missing = [c for c in ("prompt", "a", "b") if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: candidate pairs need columns prompt, a and b (missing: "
                        f"{', '.join(missing)}; columns: {', '.join(ds.column_names)})")  # fmt: skip
    rows = ds.to_list()
    for i, row in enumerate(rows):
        bad = [c for c in ("prompt", "a", "b") if not isinstance(row[c], str)]
        if bad:
            raise DataError(f"{source}: row {i}: '{bad[0]}' must be text, got {row[bad[0]]!r}")
    return rows


def implicit_margins(data: PairDataset, *, loss: str, beta: float,
                     models: tuple[PreferenceModel, PreferenceModel | None], batch_size: int,
                     pad_token_id: int, accelerator: Accelerator) -> torch.Tensor:  # fmt: skip
    """Implicit-reward margins ``[N]``, reward(a) − reward(b), of the loss for pairs (a, b)
    (scored in shares when ``accelerator`` has several processes)."""
    model, reference = models
    kw = {"batch_size": batch_size, "layout": "padded", "pad_token_id": pad_token_id,
          "device": accelerator.device, "accelerator": accelerator}  # fmt: skip
    pi = score_shared(model, data, **kw)
    ref = score_shared(reference, data, **kw) if reference is not None else None
    args = {"chosen_logps": pi.chosen, "rejected_logps": pi.rejected, "beta": beta,
            "ref_chosen_logps": ref.chosen if ref else torch.zeros_like(pi.chosen),
            "ref_rejected_logps": ref.rejected if ref else torch.zeros_like(pi.chosen),
            "chosen_lengths": torch.tensor([len(x) for x in data.chosen_ids], dtype=torch.float32),
            "rejected_lengths": torch.tensor([len(x) for x in data.rejected_ids], dtype=torch.float32)}  # fmt: skip
    fn = LOSSES[loss].fn
    params = inspect.signature(fn).parameters
    _, reward_a, reward_b, _ = fn(**{k: v for k, v in args.items() if k in params})
    return reward_a - reward_b


def run_select(cfg: SelectConfig) -> dict[str, Any] | None:
    """Rank the candidates by |implicit-reward margin|, smallest first; write them. Returns
    counts and means (None in the processes other than the main one)."""
    inputs = resolve_inputs(cfg)
    model_path, source, assets = inputs.model_path, inputs.source, inputs.assets
    if cfg.dataset is None:
        source = str(assets.root / "candidates.jsonl")
    reference_free = LOSSES[cfg.loss].reference_free
    ref_path = cfg.ref_model or (str(assets.model_dir) if cfg.dataset is None else None)
    if ref_path is None and not reference_free:
        raise ConfigError(f"--ref-model is needed: {cfg.loss}'s implicit reward is relative to "
                          "the reference the policy was trained from")  # fmt: skip
    tokenizer = load_tokenizer(model_path)
    rows = read_candidates(source, cfg.split if cfg.dataset else None)
    kept = [i for i, row in enumerate(rows) if row["a"] != row["b"]]
    prompts = [rows[i]["prompt"] for i in kept]
    try:
        prompt_ids, a_ids = encode_responses(tokenizer, prompts, [rows[i]["a"] for i in kept],
                                             max_length=cfg.max_length,
                                             max_prompt_length=cfg.max_prompt_length)  # fmt: skip
        _, b_ids = encode_responses(tokenizer, prompts, [rows[i]["b"] for i in kept],
                                    max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)  # fmt: skip
    except ValueError as e:
        raise DataError(f"{source}: {e}") from None
    data = PairDataset(prompt_ids, a_ids, b_ids)

    accelerator = make_accelerator("no")
    quiet_unless_main(accelerator)

    def load(path: str, option: str) -> PreferenceModel:
        lm = load_causal_lm(path, option=option).to(accelerator.device)
        return PreferenceModel(lm, chunked=False, attention="mask")

    models = (load(model_path, "--model"),
              None if reference_free else load(ref_path, "--ref-model"))  # fmt: skip
    margins = implicit_margins(data, loss=cfg.loss, beta=cfg.beta, models=models,
                               batch_size=cfg.batch_size, pad_token_id=tokenizer.pad_token_id,
                               accelerator=accelerator)  # fmt: skip
    if not accelerator.is_main_process:
        return None
    order = torch.argsort(margins.abs(), stable=True).tolist()[: cfg.top]
    ranked = [{**rows[kept[j]], "margin": margins[j].item(), "rank": n} for n, j in enumerate(order)]
    _write_jsonl(cfg.output, ranked)
    result = {"candidates": len(rows), "identical": len(rows) - len(kept), "written": len(ranked),
              "output": cfg.output, "mean_abs_margin": margins.abs().mean().item(),
              "selected_mean_abs_margin": margins[order].abs().mean().item() if order else 0.0}  # fmt: skip
    report(cfg, result, "ranked", ranked, {"model": model_path, "reference": ref_path,
                                           "candidates": source})  # fmt: skip
    return result


def report(cfg: Any, result: dict[str, Any], key: str, rows: list[dict[str, Any]],
           inputs: dict[str, Any]) -> None:
    """With ``--report-to wandb``: a W&B run (beside the output file) with the settings and
    inputs as config, the counts and means, and a table of the first rows written."""
    if cfg.report_to != "wandb":
        return
    out = Path(cfg.output)
    tracker = Tracker(out.parent, cfg, config={**to_dict(cfg), "inputs": inputs},
                      name=cfg.run_name or out.stem, jsonl=False)  # fmt: skip
    try:
        tracker.log({k: v for k, v in result.items() if isinstance(v, int | float)}, 0)
        tracker.log_table(key, [{k: v for k, v in row.items() if isinstance(v, str | int | float)}
                                for row in rows[:16]], 0)  # fmt: skip
        tracker.summary(result)
    finally:
        tracker.close()
