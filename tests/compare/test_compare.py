"""`direct-align compare`: its plan, its table, and `--quick` end to end on the built-in task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from direct_align.cli import main
from direct_align.compare.frontier import headline
from direct_align.compare.plan import PROXY_NOISE, PROXY_PAIRS, plan
from direct_align.compare.plots import write_plots
from direct_align.compare.report import markdown_table
from scripts.wandb_offline import read_runs, read_table


def test_plan_runs_every_method_and_ppo_shares_one_reward_model() -> None:
    for quick, per_method in ((True, 1), (False, 3)):
        shared_rm, methods = plan(quick, seed=7)
        names = ("dpo", "ipo", "orpo", "simpo", "kto", "ppo", "rloo", "online-dpo",
                 "online-rebel", "online-sppo", "online-lipo", "online-kto")
        counts = {m: sum(x.method == m for x in methods) for m in names}
        assert min(counts.values()) == 1 and counts["dpo"] >= per_method
        assert len({m.name for m in methods}) == len(methods)  # run names are unique
        for m in methods:
            second = "ppo" if m.method == "ppo" else "online" if "--online" in m.stages[-1].args else None
            assert [s.name for s in m.stages] == (["reward_model", second] if second
                                                  else ["train"])  # fmt: skip
            if second:
                assert m.stages[0] is shared_rm
            assert all("--seed" in s.args and "7" in s.args for s in m.stages)
            assert ("--max-steps" in m.stages[-1].args) == (quick and second is None)
            assert ("--rpo-alpha" in m.stages[-1].args) == (m.method == "online-rpo")
            if second == "online":  # the loss named by the method (online DPO and RPO: dpo)
                loss = m.stages[-1].args[m.stages[-1].args.index("--loss") + 1]
                assert loss == {"online-rpo": "dpo"}.get(m.method, m.method.removeprefix("online-"))
            evaluate_every = m.stages[-1].args[m.stages[-1].args.index("--eval-every") + 1]
            assert int(evaluate_every) > 0  # every run is evaluated along training


def test_every_online_method_is_evaluated_every_two_rounds_whatever_its_steps() -> None:
    """A round of 64 prompts × 4 samples, 4 epochs: online DPO's 64 pairs in steps of 32 are 8
    steps; online KTO's 256 thumbs 32; REBEL's 64 groups in steps of 4 prompts 64."""
    _, methods = plan(False, seed=1)
    every = {m.method: int(m.stages[-1].args[m.stages[-1].args.index("--eval-every") + 1])
             for m in methods if "--online" in m.stages[-1].args}  # fmt: skip
    assert every == {"online-dpo": 16, "online-rpo": 16, "online-lipo": 16, "online-kto": 64,
                     "online-rebel": 128, "online-sppo": 128, "rloo": 128}


def test_the_proxy_task_gives_the_reward_model_and_offline_losses_a_noisy_subset() -> None:
    shared_rm, methods = plan(False, seed=1, task="proxy")
    noisy = ("--train-pairs", str(PROXY_PAIRS), "--label-noise", str(PROXY_NOISE))
    learn_from_rm = ("ppo", "rloo", "online-dpo", "online-rpo", "online-rebel", "online-sppo",
                     "online-lipo", "online-kto")
    for stage in (shared_rm, *(m.stages[-1] for m in methods if m.method not in learn_from_rm)):
        assert " ".join(noisy) in " ".join(stage.args)
    for m in methods:
        if m.method in learn_from_rm:  # they learn from the reward model only
            assert "--train-pairs" not in m.stages[-1].args
    builtin_rm, builtin = plan(False, seed=1)
    assert "--train-pairs" not in builtin_rm.args
    aware = {m.method for m in methods} - {m.method for m in builtin}
    assert aware == {"robust", "cdpo"}  # told the noise rate
    # KTO reads the built-in task's thumbs, labelled by the gold reward: not on the proxy task
    assert "kto" in {m.method for m in builtin} and "kto" not in {m.method for m in methods}
    assert all(f"--label-smoothing {PROXY_NOISE}" in " ".join(m.stages[-1].args)
               for m in methods if m.method in aware)  # fmt: skip


def _fake_row(method: str, value: float, seed: int, reward: float, kl: float) -> dict:
    """A row as compare writes it, for drawing and tabulating (numbers invented)."""
    return {"run": f"{method}-{value:g}", "method": method, "strength": "β", "value": value,
            "seed": seed, "true_reward": reward, "reference_true_reward": 0.4, "kl": kl,
            "proxy_reward": reward + 1, "reference_proxy_reward": 0.1,
            "response_tokens": 20.0, "wall_s": {"train": 10.0 + seed},
            "total_wall_s": 12.0 + seed, "eval_s": 2.0, "cost_wall_s": 10.0 + seed,
            "peak_rss_mb": {"train": 700.0},
            "peak_above_start_mb": {"train": 250.0}, "models_in_memory": 1,
            "tokens_generated": 0, "commands": ["direct-align train"],
            "curve": [{"step": 0, "kl": 0.0, "true_reward": 0.4, "proxy_reward": 0.1},
                      {"step": 5, "kl": kl / 2, "true_reward": reward + 0.05,
                       "proxy_reward": reward + 0.5}]}  # fmt: skip


def test_several_seeds_give_mean_and_spread_tables_and_every_plot(tmp_path) -> None:
    rows = [_fake_row(m, v, seed, r + 0.01 * seed, kl) for seed in (1, 2, 3)
            for m, v, r, kl in (("dpo", 0.1, 0.8, 2.0), ("dpo", 1.0, 0.7, 1.0),
                                ("ppo", 0.05, 0.9, 2.5))]  # fmt: skip
    result = {"seeds": [1, 2, 3], "rows": rows, "runtime_s": 1.0, "reward_model": None}
    table = markdown_table(result)
    # the proxy column is the gain over the reference (each seed has its own reward model)
    assert "| dpo β=0.1 | 0.820 ± 0.010 | 1.720 ± 0.010 | 2.00 ± 0.00 | 0.870 ± 0.010 |" in table
    # headline: dpo's frontier, seed 1: (0, 0.4), (0.5, 0.76) (β=1 along training), (1, 0.86)
    # (β=0.1 along training) — at 0.75 nats between the last two (0.81), at 1.5 the best; seeds +0.01
    assert "| dpo | 0.870 ± 0.010 | 0.870 ± 0.010 |" in table
    assert headline(rows, budgets=(0.75,))[0]["reward_at_0.75"][0] == pytest.approx(0.82)
    # ppo's frontier: (0, 0.4), (1.25, 0.95 + 0.01·seed) along training (its end at 2.5 nats is
    # lower), so 0.97 on average at 1.5 nats: the best direct method is 0.1 behind the RL one
    assert ("at KL 1.5: best direct method dpo 0.870, best RL baseline ppo 0.970 "
            "(direct − RL: -0.100)") in table
    paths = write_plots(result, tmp_path)
    assert [p.name for p in paths] == ["frontier.png", "reward_vs_time.png",
                                       "overoptimisation.png", "memory.png"]  # fmt: skip
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


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
    assert set(rows) == {"dpo", "ipo", "orpo", "simpo", "kto", "ppo", "rloo", "online-dpo",
                         "online-rebel", "online-sppo", "online-lipo", "online-kto"}
    reference = rows["ppo"]["reference_true_reward"]
    assert rows["ppo"]["true_reward"] > reference + 0.15
    for r in rows.values():
        assert r["reference_true_reward"] == reference  # one evaluation protocol for all
        assert r["true_reward"] > reference and r["kl"] > 0
        assert set(r["peak_rss_mb"]) == set(r["wall_s"]) == set(r["peak_above_start_mb"])
        assert all(r["peak_rss_mb"][s] > r["peak_above_start_mb"][s] > 0 for s in r["wall_s"])
        assert r["total_wall_s"] == pytest.approx(sum(r["wall_s"].values()), abs=0.2)
        assert 0 < r["eval_s"] < r["total_wall_s"]
        assert r["cost_wall_s"] == pytest.approx(r["total_wall_s"] - r["eval_s"], abs=0.2)
    assert rows["ppo"]["models_in_memory"] == 4 and rows["dpo"]["models_in_memory"] == 1
    for name in ("online-dpo", "online-rebel", "online-lipo", "online-kto", "rloo"):
        assert rows[name]["models_in_memory"] == 3  # policy, reference, reward-model judge
    assert rows["online-sppo"]["models_in_memory"] == 2  # no reference
    assert set(rows["ppo"]["wall_s"]) == {"reward_model", "ppo"}
    assert rows["online-dpo"]["wall_s"]["reward_model"] == rows["ppo"]["wall_s"]["reward_model"]
    assert table["reward_model"]["wall_s"] == rows["ppo"]["wall_s"]["reward_model"]
    assert rows["ppo"]["tokens_generated"] > 0 == rows["dpo"]["tokens_generated"]
    assert rows["online-dpo"]["tokens_generated"] > 0
    for name in ("frontier.png", "reward_vs_time.png", "memory.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert markdown_table(table) in result.stdout
    for r in table["rows"]:  # evaluated along training, from the reference at step 0
        curve = r["curve"]
        assert curve[0]["step"] == 0 and curve[0]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert curve[0]["true_reward"] == pytest.approx(reference)
        assert len(curve) >= 3 and [c["step"] for c in curve] == sorted(c["step"] for c in curve)
        assert curve[-1]["true_reward"] == pytest.approx(r["true_reward"])
    assert {h["method"] for h in table["headline"]} == set(rows)
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
