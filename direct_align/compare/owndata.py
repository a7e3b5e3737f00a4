"""`compare --model M --dataset D`: the comparison on a user's own model and preference pairs.

There is no hidden reward on own data, so the pairs are split once (the same split for every
seed and method) into:

- ``train.jsonl``: what every method learns from (the offline losses directly; PPO and the online
  methods through a reward model trained on it, as on the built-in task);
- ``eval.jsonl``: held-out rows whose distinct prompts every run samples at each evaluation;
- ``gold.jsonl`` (only when no gold judge is named): a share of the pairs that no method sees, on
  which a gold reward model is trained to judge every run. It is a learnt judge, not a ground
  truth, and the report says so.

With ``--gold-reward-model DIR`` or ``--gold-reward SPEC`` the user's judge scores every run
instead, and all pairs but the held-out ones train. Rows are copied as they are (any format
`train` reads), so the split files read exactly as the original does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from direct_align.data.loading import load_source
from direct_align.errors import DataError

EVAL_SHARE, EVAL_MOST = 0.1, 512  # held-out rows for the sampled evaluation: 10%, at most 512
MIN_TRAIN = 8


@dataclass(frozen=True)
class OwnData:
    """The files of one own-data comparison, and the gold judge (None: trained on ``gold``)."""

    model: str
    train: Path
    eval: Path
    gold: Path | None  # pairs for the gold reward model, when no judge is named
    judge: list[str] | None  # the user's gold judge specs
    rows: dict[str, int]


def split_pairs(model: str, source: str, out: Path, *, split: str, seed: int,
                gold_fraction: float, judge: list[str] | None) -> OwnData:  # fmt: skip
    """Split ``source`` into ``out/{train,eval,gold}.jsonl`` (see the module docstring)."""
    ds = load_source(source, split=split)
    n = len(ds)
    order = list(range(n))
    random.Random(f"compare-split-{seed}").shuffle(order)
    n_eval = max(1, min(EVAL_MOST, round(EVAL_SHARE * n)))
    n_gold = 0 if judge else max(1, round(gold_fraction * (n - n_eval)))
    n_train = n - n_eval - n_gold
    if n_train < MIN_TRAIN:
        raise DataError(f"{source}: {n} rows are too few to compare on: {n_eval} held out for "
                        f"evaluation{f' and {n_gold} for the gold reward model' if n_gold else ''} "
                        f"leave {n_train} to train on (at least {MIN_TRAIN})")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    parts = {"eval": order[:n_eval], "gold": order[n_eval : n_eval + n_gold],
             "train": order[n_eval + n_gold :]}  # fmt: skip
    paths: dict[str, Path] = {}
    for name, rows in parts.items():
        if rows:
            paths[name] = out / f"{name}.jsonl"
            ds.select(sorted(rows)).to_json(str(paths[name]), lines=True, force_ascii=False)
    return OwnData(model, paths["train"], paths["eval"], paths.get("gold"), judge,
                   {name: len(rows) for name, rows in parts.items()})  # fmt: skip
