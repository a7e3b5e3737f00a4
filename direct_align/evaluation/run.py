"""`direct-align evaluate`: a trained model's samples against its reference's, judged.

Every input (model, reference, prompts, judges) is loaded and checked before the output
directory is created or emptied. Both models sample one response per prompt with the same seed;
the judges score them; ``evaluation.json`` (the report of
:class:`~direct_align.evaluation.report.SampleReport`, the win counts, and what was evaluated
how) and ``generations.jsonl`` (every prompt with both samples, rewards, lengths and the policy
sample's KL) are written whole or not at all.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import click
import torch

from direct_align.builtin.build import BuiltinSpec, default_cache_dir, ensure_builtin
from direct_align.data.prompts import Prompts, encode_prompts, load_prompts
from direct_align.engine.outputs import RunDir, write_atomic
from direct_align.engine.tracking import table
from direct_align.errors import ConfigError
from direct_align.evaluation.heldout import prompt_keep
from direct_align.evaluation.report import SampleReport, report_rows
from direct_align.evaluation.settings import EvaluateConfig
from direct_align.evaluation.stats import win_rate
from direct_align.models.loading import check_model_path, load_causal_lm, load_tokenizer
from direct_align.rewards import load_rewards
from direct_align.settings import frozen_dtype

log = logging.getLogger(__name__)


def is_adapter(path: str) -> bool:
    """Whether ``path`` is a LoRA adapter directory (peft's ``adapter_config.json``)."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def base_of(path: str) -> str | None:
    """The model ``path`` was trained from: an adapter's ``base_model_name_or_path``, else the
    ``base_model`` of its model card's front matter (what direct-align writes into final/)."""
    where = Path(path).expanduser()
    if is_adapter(path):
        return json.loads((where / "adapter_config.json").read_text()).get("base_model_name_or_path")
    card = where / "README.md"
    if card.is_file():
        lines = card.read_text().splitlines()
        if lines and lines[0] == "---":
            for line in lines[1:]:
                if line == "---":
                    break
                if line.startswith("base_model:"):
                    return line.split(":", 1)[1].strip() or None
    return None


def load_trained(path: str, base: str, dtype: torch.dtype) -> Any:
    """The causal LM at ``path``; an adapter is loaded onto ``base`` and merged into it."""
    if not is_adapter(path):
        return load_causal_lm(path, dtype=dtype)
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"--model '{path}' is a LoRA adapter: loading it needs peft "
                          "(pip install 'direct-align[lora]')") from None  # fmt: skip
    model = load_causal_lm(base, dtype=dtype, option="--ref-model")
    try:
        return PeftModel.from_pretrained(model, str(Path(path).expanduser())).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--model '{path}': cannot load the adapter onto '{base}': {e}") from None


def _tokenizer(cfg: EvaluateConfig, reference: str) -> Any:
    """The trained model's tokenizer (final/ holds it); an adapter without one: its base's."""
    model_dir = Path(cfg.model).expanduser()
    if is_adapter(cfg.model) and not (model_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(reference, option="--ref-model")
    if is_adapter(cfg.model):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return load_tokenizer(cfg.model)


def _prompts(cfg: EvaluateConfig, tokenizer: Any) -> tuple[Prompts, str]:
    """The prompts (the first --max-prompts distinct ones) and where they come from."""
    if cfg.prompts is None:
        cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        assets = ensure_builtin(cache, BuiltinSpec())
        texts = assets.held_out_prompts(cfg.max_prompts)
        return Prompts(texts, encode_prompts(tokenizer, texts)), "built-in task's held-out prompts"
    prompts = load_prompts(cfg.prompts, tokenizer, split=cfg.split, keep=prompt_keep(cfg),
                           fmt=cfg.format, unique=True)  # fmt: skip
    n = cfg.max_prompts or len(prompts)
    return Prompts(prompts.texts[:n], prompts.ids[:n]), cfg.prompts


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate as configured; returns what ``evaluation.json`` holds."""
    started = time.time()
    assert cfg.model is not None and cfg.output_dir is not None  # checked
    run = RunDir(cfg.output_dir)
    run.check(resume=False, overwrite=cfg.overwrite, resumable=False)
    # 1. inputs: model, reference, tokenizer, prompts, judges
    if not Path(cfg.model).expanduser().exists() or not is_adapter(cfg.model):
        check_model_path(cfg.model)
    reference = cfg.ref_model or base_of(cfg.model)
    if reference is None:
        raise ConfigError(f"--model '{cfg.model}': cannot tell what it was trained from (no "
                          "adapter_config.json and no base_model in README.md); pass --ref-model")  # fmt: skip
    check_model_path(reference, "--ref-model")
    tokenizer = _tokenizer(cfg, reference)
    prompts, source = _prompts(cfg, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judges = load_rewards(cfg.reward, max_length=cfg.max_length, device=device)
    dtype = frozen_dtype(cfg)
    policy = load_trained(cfg.model, reference, dtype).to(device)
    reference_lm = load_causal_lm(reference, dtype=dtype, option="--ref-model").to(device)
    log.info("evaluate: %s against %s on %d prompts from %s, judged by %s", cfg.model, reference,
             len(prompts), source, " + ".join(f"{j.weight:g}·{j.name}" for j in judges.judges))  # fmt: skip

    # 2. outputs: only now is the output directory created or (with --overwrite) emptied
    run.prepare(overwrite=cfg.overwrite, checkpoints=False)
    key = "true_reward" if cfg.reward == ["builtin"] else "reward"
    report = SampleReport(reference_lm, tokenizer, prompts, judges, key=key,
                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                          batch_size=cfg.batch_size, temperature=cfg.temperature, top_p=cfg.top_p)  # fmt: skip
    metrics, _ = report(policy)
    rows = report.generations
    wins = win_rate([r["policy_reward"] for r in rows], [r["reference_reward"] for r in rows])
    result: dict[str, Any] = {
        "model": cfg.model, "reference": reference, "prompts": {"source": source, "count": len(prompts)},
        "judges": {j.name: j.weight for j in judges.judges},
        "sampling": {"seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
                     "temperature": cfg.temperature, "top_p": cfg.top_p, "batch_size": cfg.batch_size},
        "report": metrics, "wins": {"wins": wins.wins, "ties": wins.ties, "losses": wins.losses},
        "runtime_s": round(time.time() - started, 1),
    }  # fmt: skip
    write_atomic(run.path / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    run.write_json("evaluation.json", result)
    if cfg.report_to == "wandb":
        _report(cfg, run.path, result, rows)
    return result


def _report(cfg: EvaluateConfig, output_dir: Path, result: dict[str, Any],
            rows: list[dict[str, Any]]) -> None:  # fmt: skip
    """The evaluation as a W&B run: its numbers, and the generations as a table."""
    from direct_align.engine.tracking import Tracker

    tracker = Tracker(output_dir, cfg, config={k: result[k] for k in ("model", "reference", "prompts",
                                                                      "judges", "sampling")},
                      jsonl=False)  # fmt: skip
    try:
        tracker.log({f"eval/{k}": v for k, v in result["report"].items()}, 0)
        tracker.log_table("eval/generations", rows, 0)
        tracker.summary(result["report"])
    finally:
        tracker.close()


def print_evaluation(result: dict[str, Any], output_dir: str) -> None:
    """The table `direct-align evaluate` prints."""
    report = result["report"]
    key = "true_reward" if "policy/true_reward" in report else "reward"
    w = result["wins"]
    click.echo("\n" + table(["", "reference", "policy"], report_rows(report, key)))
    click.echo(f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses on "
               f"{result['prompts']['count']} prompts; length-controlled reward gain "
               f"{report['policy/lc_reward_gain']:.3f} ({report['policy/reward_per_token']:.4f} "
               f"per token) → {output_dir}/evaluation.json")  # fmt: skip
