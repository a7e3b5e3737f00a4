"""`compare --model --dataset`: the comparison on a user's own model and HH-style pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from commands import fail, run_here

from direct_align.compare.owndata import split_pairs
from direct_align.compare.plan import OFFLINE, ONLINE, THUMBS, plan
from direct_align.errors import DataError
from prefdata import text_pairs, write_jsonl


def hh_pairs(n: int, seed: int) -> list[dict]:
    """HH-RLHF-style rows: whole dialogues whose prompt is implicit (up to 'Assistant:')."""
    return [{"chosen": f"\n\nHuman: {p}\n\nAssistant:{c}", "rejected": f"\n\nHuman: {p}\n\nAssistant:{r}"}
            for p, c, r in text_pairs(n, seed)]  # fmt: skip


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hh") / "hh.jsonl", hh_pairs(200, seed=5))


def test_the_split_is_disjoint_fixed_and_keeps_the_rows(hh_file: Path, tmp_path: Path) -> None:
    own = split_pairs("M", str(hh_file), tmp_path / "a", split="train", seed=1, gold_fraction=0.25,
                      judge=None)  # fmt: skip
    assert own.rows == {"eval": 20, "gold": 45, "train": 135}
    read = {name: [json.loads(line) for line in path.open()]
            for name, path in (("train", own.train), ("eval", own.eval), ("gold", own.gold))}  # fmt: skip
    original = [json.loads(line) for line in hh_file.open()]
    seen = [r["chosen"] for rows in read.values() for r in rows]
    assert sorted(seen) == sorted(r["chosen"] for r in original)  # every row once, unchanged
    again = split_pairs("M", str(hh_file), tmp_path / "b", split="train", seed=1,
                        gold_fraction=0.25, judge=None)  # fmt: skip
    assert again.eval.read_text() == own.eval.read_text()
    # a named gold judge: no gold share, all but the held-out rows train
    judged = split_pairs("M", str(hh_file), tmp_path / "c", split="train", seed=1,
                         gold_fraction=0.25, judge=["judge.py:f"])  # fmt: skip
    assert judged.gold is None and judged.rows == {"eval": 20, "gold": 0, "train": 180}
    with pytest.raises(DataError, match="too few to compare"):
        small = write_jsonl(tmp_path / "small.jsonl", hh_pairs(9, seed=1))
        split_pairs("M", str(small), tmp_path / "d", split="train", seed=1, gold_fraction=0.25, judge=None)


def test_own_data_plans_every_method_of_the_builtin_task_but_thumbs() -> None:
    own = ("--model", "M", "--dataset", "train.jsonl", "--eval-prompts-file", "eval.jsonl")
    rm, methods = plan(quick=False, seed=3, own=own)
    assert rm.args[-4:] == own[:4] and "--eval-prompts-file" not in rm.args
    names = {m.method for m in methods}
    assert names == {m[0] for m in OFFLINE} | {m[0] for m in ONLINE} | {"ppo"}
    assert not names & {m[0] for m in THUMBS}
    for method in methods:
        assert method.stages[-1].args[-len(own):] == own  # every run on the same data and prompts
    builtin = plan(quick=False, seed=3)[1]
    assert [m.name for m in builtin if m.method != "kto"] == [m.name for m in methods]


@pytest.mark.slow  # forks a process per stage
def test_compare_quick_on_own_data(hh_file: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--quick", "--model", str(tiny_model_dir), "--dataset", str(hh_file),
            "--output-dir", str(out), "--only", "dpo", "--only", "ppo", "--only", "online-sppo"]  # fmt: skip
    assert run_here(args, tmp_path / "cache") == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["task"] == "own" and result["data"]["rows"] == {"eval": 20, "gold": 45, "train": 135}
    assert "no method sees" in result["judge"]["description"]
    gold = result["judge"]["specs"][0]
    assert Path(gold).is_dir() and gold.startswith(str(out / "gold_reward_model"))
    assert {r["method"] for r in result["rows"]} == {"dpo", "ppo", "online-sppo"}
    for row in result["rows"]:
        # judged by the gold reward model on the held-out prompts, at every evaluation
        assert len(row["curve"]) >= 2 and row["curve"][0]["kl"] == 0.0
        assert 0.0 <= row["win_rate"] <= 1.0
        assert any(f"--eval-judge {gold}" in c for c in row["commands"])
        assert any(f"--dataset {out / 'data' / 'train.jsonl'}" in c for c in row["commands"])
    assert {e["method"] for e in result["headline"]} == {"dpo", "ppo", "online-sppo"}
    for plot in ("frontier.png", "reward_vs_time.png", "memory.png"):
        assert (out / plot).stat().st_size > 0


def test_compare_own_data_refusals(tmp_path: Path, tiny_model_dir: Path,
                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = ["--output-dir", str(tmp_path / "never")]
    assert "needs both --model and --dataset" in fail(capsys, ["compare", "--model", str(tiny_model_dir), *out])
    assert "built-in task" in fail(capsys, ["compare", "--gold-reward", "builtin", *out])
    data = write_jsonl(tmp_path / "d.jsonl", hh_pairs(30, seed=2))
    assert "--task proxy" in fail(capsys, ["compare", "--task", "proxy", "--model", str(tiny_model_dir),
                                           "--dataset", str(data), *out])  # fmt: skip
    assert not (tmp_path / "never").exists()
