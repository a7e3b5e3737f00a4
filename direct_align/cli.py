"""The `direct-align` command: parse, build a config, call one function, print the result.

Options of `train` are generated from :class:`direct_align.config.TrainConfig` and those of
`train-rm` from :class:`direct_align.rm.config.RewardConfig`, so each flag, its YAML key and its
help text have one source. Values are parsed by the config modules, so that every bad value gets
the same one-line ``error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from direct_align.config import TrainConfig, _base_type, resolve
from direct_align.errors import ConfigError, DataError, DirectAlignError
from direct_align.ppo.config import FIELDS as PPO_FIELDS
from direct_align.ppo.config import PPOConfig, resolve_ppo
from direct_align.rm.config import FIELDS as RM_FIELDS
from direct_align.rm.config import RewardConfig, resolve_rm

_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


def _options(config_cls: type, base_type: Callable[[str], type]) -> Callable[..., Any]:
    """A decorator adding one option per field of the dataclass ``config_cls``."""

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(config_cls)):
            flag = "--" + f.name.replace("_", "-")
            tp = base_type(f.name)
            choices = f.metadata.get("choices")
            text = f.metadata["help"]
            if f.default is not None and "default:" not in text:  # computed defaults say so
                text += f" [default: {f.default}]"
            if tp is bool:
                option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=text)
            elif f.default_factory is list:  # a repeatable option
                option = click.option(flag, f.name, type=str, multiple=True, metavar=_METAVARS[tp],
                                      help=text)  # fmt: skip
            else:
                metavar = "[" + "|".join(choices) + "]" if choices else _METAVARS[tp]
                option = click.option(flag, f.name, type=str, default=None, metavar=metavar,
                                      help=text)  # fmt: skip
            command = option(command)
        return command

    return add


_train_options = _options(TrainConfig, _base_type)
_rm_options = _options(RewardConfig, RM_FIELDS.base_type)
_ppo_options = _options(PPOConfig, PPO_FIELDS.base_type)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="direct-align")
def cli() -> None:
    """Preference training with direct losses (DPO, IPO, ORPO, SimPO) on Hugging Face models."""


@cli.command()
@click.option("--config", "config_file", type=str, default=None, metavar="FILE",
              help="YAML file of settings (keys as the flags, with _); flags override it.")  # fmt: skip
@_train_options
def train(config_file: str | None, **values: Any) -> None:
    """Train a policy on preference pairs.

    With no --model and no --dataset it trains on the built-in task (a tiny review model and a
    hidden sentiment reward, built once into the cache) and prints the true reward it reached.
    """
    from direct_align.report import print_summary
    from direct_align.run import run_train

    cfg = resolve(values, config_file)
    summary = run_train(cfg)
    if summary is not None:
        print_summary(summary, cfg.output_dir)


@cli.command("train-rm")
@_rm_options
def train_rm(**values: Any) -> None:
    """Train a Bradley-Terry reward model on preference pairs.

    The model is the causal LM of --model with a fresh scalar head. With no --model and no
    --dataset it trains on the built-in task and reports how well the reward model's scores agree
    with the task's hidden reward on held-out responses.
    """
    from direct_align.rm.report import print_rm_summary
    from direct_align.rm.run import run_train_rm

    cfg = resolve_rm(values)
    summary = run_train_rm(cfg)
    if summary is not None:  # the main process
        print_rm_summary(summary, cfg.output_dir)


@cli.command()
@_ppo_options
def ppo(**values: Any) -> None:
    """Train a policy with PPO against a reward model (the RLHF baseline).

    Holds the policy, a critic (or a value head on the policy), the frozen reference and the
    reward model. With no --model and no --dataset it runs the whole pipeline on the built-in
    task: the base model is the SFT stage, a reward model is trained on its preference pairs,
    then PPO; it prints the true reward it reached.
    """
    from direct_align.ppo.report import print_ppo_summary
    from direct_align.ppo.run import run_ppo

    cfg = resolve_ppo(values)
    summary = run_ppo(cfg)
    if summary is not None:  # the main process
        print_ppo_summary(summary, cfg.output_dir)


@cli.command()
@click.option("--quick", is_flag=True, help="One strength per method and short runs (a few "
              "minutes; what the tests run).")  # fmt: skip
@click.option("--output-dir", default=None, metavar="DIR",
              help="Where the table, plots and every run go (default: runs/compare-TIMESTAMP).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--seed", default=42, type=int, show_default=True, help="Seed of every run.")
@click.option("--cache-dir", default=None, metavar="DIR", help="Cache of the built-in task.")
@click.option("--only", multiple=True, metavar="METHOD",
              type=click.Choice(["dpo", "ipo", "orpo", "simpo", "ppo", "online-dpo"]),
              help="Run only this method (repeatable).")  # fmt: skip
@click.option("--plots-only", is_flag=True,
              help="Redraw the plots and table of --output-dir from its comparison.json.")
def compare(quick: bool, output_dir: str | None, overwrite: bool, seed: int,
            cache_dir: str | None, only: tuple[str, ...], plots_only: bool) -> None:  # fmt: skip
    """Compare PPO (SFT → reward model → PPO) with DPO, IPO, ORPO, SimPO and online DPO.

    On the built-in task, every method starts from the same base model and preference pairs
    (online DPO and PPO through a reward model trained on them) and runs at a few strengths, each stage in its own process; it records the hidden true reward and KL of
    samples, wall time per stage, peak memory, models in memory and tokens generated, and
    writes comparison.json and plots. The full comparison takes about 20 minutes on 2 CPU cores.
    """
    import time

    from direct_align.compare.report import markdown_table
    from direct_align.compare.run import replot, run_compare

    if plots_only:
        if output_dir is None:
            raise click.UsageError("--plots-only needs the --output-dir of a comparison")
        result = replot(output_dir)
    else:
        output_dir = output_dir or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
        result = run_compare(output_dir, quick=quick, seed=seed, overwrite=overwrite,
                             cache_dir=cache_dir, only=only)  # fmt: skip
    click.echo("\n" + markdown_table(result))
    click.echo(f"table and plots: {output_dir}/comparison.json, " + ", ".join(result["plots"]))


# --- iterative DPO: label and select (direct_align/label.py, docs/online.md) -------------------
from direct_align.label_config import LabelConfig, SelectConfig, resolve_command  # noqa: E402
from direct_align.label_config import base_type as label_base_type  # noqa: E402


@cli.command()
@_options(LabelConfig, label_base_type)
def label(**values: Any) -> None:
    """Write a scored preference dataset: a policy samples, a judge scores, pairs are kept.

    Each prompt gets --samples-per-prompt responses; the best is paired against the worst (or
    every two past --pair-margin). The rows (prompt, chosen, rejected, score_chosen,
    score_rejected) train with `direct-align train --dataset FILE`.
    """
    from direct_align.label import run_label

    result = run_label(resolve_command(LabelConfig, values))
    if result is not None:  # the main process
        click.echo(f"{result['pairs']} pairs from {result['prompts']} prompts "
                   f"({result['judge_calls']} judge calls, mean reward "
                   f"{result['reward/total']:.3f}) → {result['output']}")  # fmt: skip


@cli.command()
@_options(SelectConfig, label_base_type)
def select(**values: Any) -> None:
    """Rank unlabelled candidate pairs by the policy's uncertainty, most uncertain first.

    Candidates are rows with prompt, a and b; uncertainty is a small |implicit-reward margin|
    of --loss between a and b. The rows are written with their margin and rank.
    """
    from direct_align.label import run_select

    result = run_select(resolve_command(SelectConfig, values))
    if result is not None:  # the main process
        click.echo(f"{result['written']} of {result['candidates']} candidates ranked (mean "
                   f"|margin| {result['selected_mean_abs_margin']:.4f} written, "
                   f"{result['mean_abs_margin']:.4f} all) → {result['output']}")  # fmt: skip


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from direct_align.distributed import is_main_rank

    # with several processes, only the main one reports progress
    logging.getLogger("direct_align").setLevel(logging.INFO if is_main_rank() else logging.WARNING)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars of every load
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; turns every expected failure into one line."""
    _setup_logging()
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
    except DirectAlignError as e:
        from direct_align.trainer import Interrupted

        click.echo(f"error: {e}" if not isinstance(e, Interrupted) else str(e), err=True)
        sys.exit(143 if isinstance(e, Interrupted) else 1)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under a multi-process launcher, shut this process's side of the group down before the
    interpreter exits: left to interpreter shutdown, gloo's threads can abort the process
    ("terminate called without an active exception") while the others still run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
