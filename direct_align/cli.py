"""The `direct-align` command: parse, resolve the settings, call one function, print the result.

Every command's flags are generated from its settings dataclass (each field's declaration gives
the flag, its YAML key and its help), and every command takes ``--config FILE``. Values are
parsed by :mod:`direct_align.config`, so every bad value gets the same one-line ``error: ...``
and exit status 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from direct_align.compare.settings import CompareConfig
from direct_align.config import flag, resolve, setting_of
from direct_align.errors import ConfigError, DataError, DirectAlignError, Interrupted
from direct_align.evaluation.settings import EvaluateConfig
from direct_align.ppo.settings import PPOConfig
from direct_align.preference.label_settings import LabelConfig, SelectConfig
from direct_align.preference.settings import TrainConfig
from direct_align.rm.settings import RewardConfig

_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", list: "TEXT"}


def _in_help_order(config_cls: type) -> list[dataclasses.Field]:
    """The command's own settings first, then the groups it shares (:mod:`direct_align.settings`)."""
    fields = dataclasses.fields(config_cls)
    shared = {f.name for base in config_cls.__mro__[1:] if dataclasses.is_dataclass(base)
              for f in dataclasses.fields(base)}  # fmt: skip
    return [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]


def _options(config_cls: type) -> Callable[..., Any]:
    """A decorator adding ``--config`` and one option per field of ``config_cls``."""

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(_in_help_order(config_cls)):
            setting = setting_of(f)
            text = setting.help
            if setting.default is not None and "default:" not in text:  # computed ones say so
                text += f" [default: {setting.default}]"
            if setting.type is bool:
                option = click.option(f"{flag(f.name)}/--no-{flag(f.name)[2:]}", f.name,
                                      default=None, help=text)  # fmt: skip
            else:
                choices = setting.choices
                metavar = "[" + "|".join(choices) + "]" if choices else _METAVARS[setting.type]
                option = click.option(flag(f.name), f.name, type=str, default=None,
                                      multiple=setting.type is list, metavar=metavar, help=text)  # fmt: skip
            command = option(command)
        return click.option("--config", "config_file", type=str, default=None, metavar="FILE",
                            help="YAML file of settings (keys as the flags, - or _); flags "
                                 "override it.")(command)  # fmt: skip

    return add


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="direct-align")
def cli() -> None:
    """Preference training with direct losses (DPO, IPO, ORPO, SimPO) on Hugging Face models."""


@cli.command()
@_options(TrainConfig)
def train(config_file: str | None, **values: Any) -> None:
    """Train a policy on preference pairs (offline, or --online from its own samples).

    With no --model and no --dataset it trains on the built-in task (a tiny review model and a
    hidden sentiment reward, built once into the cache) and prints the true reward it reached.
    """
    from direct_align.preference.report import print_summary
    from direct_align.preference.run import run_train

    cfg = resolve(TrainConfig, values, config_file)
    summary = run_train(cfg)
    if summary is not None:  # the main process, at the end of training
        print_summary(summary, cfg.output_dir)


@cli.command("train-rm")
@_options(RewardConfig)
def train_rm(config_file: str | None, **values: Any) -> None:
    """Train a Bradley-Terry reward model on preference pairs.

    The model is the causal LM of --model with a fresh scalar head. With no --model and no
    --dataset it trains on the built-in task and reports how well the reward model's scores agree
    with the task's hidden reward on held-out responses.
    """
    from direct_align.rm.report import print_rm_summary
    from direct_align.rm.run import run_train_rm

    cfg = resolve(RewardConfig, values, config_file)
    summary = run_train_rm(cfg)
    if summary is not None:
        print_rm_summary(summary, cfg.output_dir)


@cli.command()
@_options(PPOConfig)
def ppo(config_file: str | None, **values: Any) -> None:
    """Train a policy with PPO against a reward model (the RLHF baseline).

    Holds the policy, a critic (or a value head on the policy), the frozen reference and the
    reward model. With no --model and no --dataset it runs the whole pipeline on the built-in
    task: the base model is the SFT stage, a reward model is trained on its preference pairs,
    then PPO; it prints the true reward it reached.
    """
    from direct_align.ppo.report import print_ppo_summary
    from direct_align.ppo.run import run_ppo

    cfg = resolve(PPOConfig, values, config_file)
    summary = run_ppo(cfg)
    if summary is not None:
        print_ppo_summary(summary, cfg.output_dir)


@cli.command()
@_options(CompareConfig)
def compare(config_file: str | None, **values: Any) -> None:
    """Compare PPO (SFT → reward model → PPO) with DPO, IPO, ORPO, SimPO and online DPO.

    On the built-in task, every method starts from the same base model and preference pairs
    (online DPO and PPO through a reward model trained on them) and runs at a few strengths,
    each stage in its own process, over --seeds seeds; it records the hidden true reward and KL
    of samples along training, each method's true reward at matched KL, wall time per stage,
    peak memory, models in memory and tokens generated, and writes comparison.json and plots.
    The full comparison takes about 20 minutes per seed on 2 CPU cores; --task proxy learns
    the reward model from a few noisy pairs, to show over-optimisation.
    """
    from direct_align.compare.report import markdown_table
    from direct_align.compare.run import replot, run_compare

    cfg = resolve(CompareConfig, values, config_file)
    result = replot(cfg.output_dir) if cfg.plots_only else run_compare(cfg)
    click.echo("\n" + markdown_table(result))
    click.echo(f"table and plots: {cfg.output_dir}/comparison.json, " + ", ".join(result["plots"]))


@cli.command()
@_options(EvaluateConfig)
def evaluate(config_file: str | None, **values: Any) -> None:
    """Judge a trained model's samples against its reference's on held-out prompts.

    Both sample one response per prompt (same seed); a judge (--reward or --reward-model)
    scores them. Prints and writes evaluation.json: mean reward of each, the policy's win rate
    over the reference with a 95% interval, KL(policy‖reference) in nats, response lengths and
    length-controlled readings; generations.jsonl holds every sample. With no --prompts it uses
    the built-in task's held-out prompts and hidden reward, as `train` reports them.
    """
    from direct_align.evaluation.run import print_evaluation, run_evaluate

    cfg = resolve(EvaluateConfig, values, config_file)
    print_evaluation(run_evaluate(cfg), str(cfg.output_dir))


@cli.command()
@_options(LabelConfig)
def label(config_file: str | None, **values: Any) -> None:
    """Write a scored preference dataset: a policy samples, a judge scores, pairs are kept.

    Each prompt gets --samples-per-prompt responses; the best is paired against the worst (or
    every two past --pair-margin). The rows (prompt, chosen, rejected, score_chosen,
    score_rejected) train with `direct-align train --dataset FILE`.
    """
    from direct_align.preference.label import run_label

    result = run_label(resolve(LabelConfig, values, config_file))
    if result is not None:  # the main process
        click.echo(f"{result['pairs']} pairs from {result['prompts']} prompts "
                   f"({result['judge_calls']} judge calls, mean reward "
                   f"{result['reward/total']:.3f}) → {result['output']}")  # fmt: skip


@cli.command()
@_options(SelectConfig)
def select(config_file: str | None, **values: Any) -> None:
    """Rank unlabelled candidate pairs by the policy's uncertainty, most uncertain first.

    Candidates are rows with prompt, a and b; uncertainty is a small |implicit-reward margin|
    of --loss between a and b. The rows are written with their margin and rank.
    """
    from direct_align.preference.label import run_select

    result = run_select(resolve(SelectConfig, values, config_file))
    if result is not None:  # the main process
        click.echo(f"{result['written']} of {result['candidates']} candidates ranked (mean "
                   f"|margin| {result['selected_mean_abs_margin']:.4f} written, "
                   f"{result['mean_abs_margin']:.4f} all) → {result['output']}")  # fmt: skip


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from direct_align.engine.distributed import is_main_rank

    # with several processes, only the main one reports progress
    logging.getLogger("direct_align").setLevel(logging.INFO if is_main_rank() else logging.WARNING)
    import datasets
    import transformers

    # what torchao and bitsandbytes say on import about kernels this machine lacks (CUDA-only
    # libraries, a hub kernel) is not the user's to act on
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars of every load
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; turns every expected failure into one line."""
    from direct_align import engine

    _setup_logging()
    engine.invocation = list(argv) if argv is not None else sys.argv[1:]
    try:
        cli.main(args=argv, prog_name="direct-align", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except (ConfigError, DataError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(143)
    except DirectAlignError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under a multi-process launcher, shut this process's side of the group down before the
    interpreter exits: left to interpreter shutdown, gloo's threads can abort the process
    ("terminate called without an active exception") while the others still run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
