"""`direct-align compare`: its plan, its table, and `--quick` end to end on the built-in task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from direct_align.cli import main
from direct_align.compare.plan import plan
from direct_align.compare.report import markdown_table
from scripts.wandb_offline import read_runs, read_table


def test_plan_runs_every_method_and_ppo_shares_one_reward_model() -> None:
    for quick, per_method in ((True, 1), (False, 3)):
        shared_rm, methods = plan(quick, seed=7)
        names = ("dpo", "ipo", "orpo", "simpo", "ppo", "online-dpo")
        counts = {m: sum(x.method == m for x in methods) for m in names}
        assert min(counts.values()) == (1 if quick else 2) and counts["dpo"] >= per_method
        assert len({m.name for m in methods}) == len(methods)  # run names are unique
        for m in methods:
            second = {"ppo": "ppo", "online-dpo": "online"}.get(m.method)
            assert [s.name for s in m.stages] == (["reward_model", second] if second
                                                  else ["train"])  # fmt: skip
            if second:
                assert m.stages[0] is shared_rm
            assert all("--seed" in s.args and "7" in s.args for s in m.stages)
            assert ("--max-steps" in m.stages[-1].args) == (quick and second is None)


def test_compare_refuses_a_non_empty_output_dir_and_keeps_it(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--quick", "--output-dir", str(out), "--cache-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_quick_comparison_measures_every_method_and_ppo_learns(default_run, tmp_path) -> None:
    """The real pipeline on the built-in task (built by the default run's fixture): PPO must
    clearly beat the reference, or the comparison would be against a straw man."""
    cache, _, first = default_run
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "cmp"
    env = {**os.environ, "DIRECT_ALIGN_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "scripts/compare_ppo.py", "--quick",
                             "--output-dir", str(out), "--report-to", "wandb"], env=env,
                            capture_output=True, text=True, timeout=900,
                            cwd=Path(__file__).parents[2])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"dpo", "ipo", "orpo", "simpo", "ppo", "online-dpo"}
    reference = rows["ppo"]["reference_true_reward"]
    assert rows["ppo"]["true_reward"] > reference + 0.15
    for r in rows.values():
        assert r["reference_true_reward"] == reference  # one evaluation protocol for all
        assert r["true_reward"] > reference and r["kl"] > 0
        assert set(r["peak_rss_mb"]) == set(r["wall_s"]) == set(r["peak_above_start_mb"])
        assert all(r["peak_rss_mb"][s] > r["peak_above_start_mb"][s] > 0 for s in r["wall_s"])
        assert r["total_wall_s"] == pytest.approx(sum(r["wall_s"].values()), abs=0.2)
    assert rows["ppo"]["models_in_memory"] == 4 and rows["dpo"]["models_in_memory"] == 1
    assert rows["online-dpo"]["models_in_memory"] == 3  # policy, reference, reward-model judge
    assert set(rows["ppo"]["wall_s"]) == {"reward_model", "ppo"}
    assert rows["online-dpo"]["wall_s"]["reward_model"] == rows["ppo"]["wall_s"]["reward_model"]
    assert table["reward_model"]["wall_s"] == rows["ppo"]["wall_s"]["reward_model"]
    assert rows["ppo"]["tokens_generated"] > 0 == rows["dpo"]["tokens_generated"]
    assert rows["online-dpo"]["tokens_generated"] > 0
    for name in ("frontier.png", "reward_vs_time.png", "memory.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert markdown_table(table) in result.stdout
    assert all(r["commands"][-1].startswith("direct-align ") for r in table["rows"])

    # W&B (offline): every run of the comparison in one group, with the keys to group by, and a
    # summary run with the table and the plots
    runs = {r.name: r for d in (out / "runs").iterdir() if d.is_dir() for r in read_runs(d)}
    assert set(runs) == {"reward-model", *(r["run"] for r in table["rows"])}
    assert {r.group for r in runs.values()} == {"cmp"}
    for row in table["rows"]:
        run = runs[row["run"]]
        assert (run.config["method"], run.config["strength"]) == (row["method"], row["strength"])
        assert run.config["value"] == row["value"] and run.config["seed"] == 42
        assert run.summary["policy/true_reward"] == pytest.approx(row["true_reward"])
    [summary] = read_runs(out)
    assert summary.group == "cmp" and summary.name == "cmp-summary"
    assert read_table(summary.path, summary, "comparison")[0]["run"] == table["rows"][0]["run"]
    assert {"frontier", "reward_vs_time", "memory"} <= {k.split("/")[0] for k in summary.summary}
