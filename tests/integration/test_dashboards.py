"""W&B dashboards, read back from the offline run files each command wrote (``WANDB_MODE=offline``,
set by conftest; :mod:`wandb_run` parses the run file with wandb's own record definitions).
`compare --report-to wandb` is checked in tests/compare/test_compare.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from commands import JUDGES_PY, run_here

from direct_align.builtin.task import sample_prompts
from prefdata import rows, write_jsonl
from scripts.wandb_offline import read_runs

WANDB = ["--report-to", "wandb", "--wandb-group", "g1", "--wandb-tags", "a", "--wandb-tags", "b",
         "--wandb-notes", "what this run tries", "--wandb-config", "arm=2"]  # fmt: skip


@pytest.fixture(scope="module")
def builtin_cache(default_run) -> Path:
    cache, _, first = default_run
    assert first.returncode == 0, first.stderr[-2000:]
    return cache


def test_an_offline_run_has_its_inputs_curves_generations_and_model(builtin_cache, tmp_path):
    out = tmp_path / "dpo-run"
    assert run_here(["train", "--loss", "dpo", "--max-steps", "20", "--eval-every", "10",
                          "--log-generations", "3", "--output-dir", str(out), "--wandb-log-model",
                          *WANDB], builtin_cache, WANDB_PROJECT="from-the-environment") == 0  # fmt: skip
    [run] = read_runs(out)
    assert (run.name, run.group, run.tags, run.notes) == ("dpo-run", "g1", ["a", "b"], "what this run tries")
    assert run.project == "from-the-environment"  # $WANDB_PROJECT, as wandb users expect
    # the settings, and what identifies the inputs (on the built-in task too)
    assert run.config["loss"] == "dpo" and run.config["arm"] == 2
    inputs = run.config["inputs"]
    assert inputs["model"]["architecture"] == "LlamaForCausalLM"
    assert inputs["model"]["parameters"] == inputs["model"]["trainable_parameters"] > 1_000_000
    assert inputs["data"]["source"].endswith(".jsonl") and inputs["data"]["train_rows"] == 2000
    assert inputs["reference"]["cache"]["train"].endswith(".safetensors")
    assert {"torch", "transformers", "direct-align"} <= set(inputs["versions"])
    # reward-vs-KL over the run: true reward and KL of samples at every evaluation
    assert [s for s, _ in run.curve("eval/policy/true_reward")] == [10, 20]
    assert [s for s, _ in run.curve("eval/policy/kl")] == [10, 20]
    assert [s for s, _ in run.curve("train/loss")] == list(range(1, 21))
    assert [s for s, n in run.curve("eval/generations/nrows") if n == 3] == [10, 20]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 6 and {"prompt", "reference", "policy", "policy_reward",
                                      "policy_kl"} <= set(generations[0])  # fmt: skip
    assert "model-dpo-run" in run.artifacts
    card = (out / "final" / "README.md").read_text()
    assert "base_model:" in card and "## Held-out metrics" in card and "direct-align train" in card


def test_an_online_run_logs_its_rounds_pairs_and_curves(builtin_cache, tmp_path):
    out = tmp_path / "online"
    assert run_here(["train", "--online", "--rounds", "4", "--prompts-per-round", "16",
                       "--eval-every", "2", "--eval-prompts", "16", "--log-generations", "2",
                       "--output-dir", str(out), *WANDB], builtin_cache) == 0  # fmt: skip
    [run] = read_runs(out)
    assert len(run.curve("online/reward/total")) == 4  # one record a round
    assert run.curve("online/pairs/nrows") and run.curve("eval/policy/true_reward")
    assert run.config["inputs"]["judges"] == {"builtin": 1.0}


def test_a_ppo_run_logs_samples_at_each_evaluation(builtin_cache, tmp_path):
    out = tmp_path / "ppo"
    rm = tmp_path / "rm"
    assert run_here(["train-rm", "--max-steps", "5", "--output-dir", str(rm)], builtin_cache) == 0
    assert run_here(["ppo", "--reward-model", str(rm / "final"), "--rollouts", "4",
                       "--rollout-batch-size", "8", "--mini-batch-size", "4", "--eval-every", "2",
                       "--eval-prompts", "8", "--log-generations", "2", "--output-dir", str(out),
                       *WANDB], builtin_cache) == 0  # fmt: skip
    [run] = read_runs(out)
    assert [s for s, _ in run.curve("eval/policy/true_reward")] == [0, 2, 4]
    assert [s for s, _ in run.curve("objective/kl")] == [1, 2, 3, 4]
    assert [s for s, _ in run.curve("eval/generations/nrows")] == [0, 2, 4]
    assert run.config["inputs"]["reward_model"] == str(rm / "final")


def test_resume_continues_the_w_and_b_run_without_counting_a_step_twice(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", rows("standard", 80, seed=4))
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--max-steps", "8",
            "--batch-size", "8", "--max-length", "64", "--eval-every", "0", "--output-dir",
            str(out), "--report-to", "wandb"]  # fmt: skip
    assert run_here([*args, "--max-steps-per-run", "4"], cache) == 0
    assert run_here([*args, "--resume", "--max-steps-per-run", "2"], cache) == 0  # stops at 6
    with (out / "metrics.jsonl").open("a") as f:  # what a kill after step 7 leaves behind
        f.write(json.dumps({"step": 7, "train/loss": 0.5}) + "\n")
    assert run_here([*args, "--resume"], cache) == 0
    first, again, after_kill = read_runs(out)  # one offline run directory per invocation
    # stopped cleanly at its checkpoint: the same W&B run went on
    assert again.id == first.id
    assert [s for r in (first, again) for s, _ in r.curve("train/loss")] == list(range(1, 7))
    # killed past its checkpoint: W&B cannot rewind, so the history goes on in a new run
    assert after_kill.id != first.id and after_kill.name == "run-resumed-6"
    assert after_kill.config["resumed_from"] == {"wandb_run": first.id, "step": 6}
    assert [s for s, _ in after_kill.curve("train/loss")] == [7, 8]


def test_label_and_select_report_their_rows(builtin_cache, tmp_path):
    labelled = tmp_path / "labels" / "pairs.jsonl"
    assert run_here(["label", "--max-prompts", "16", "--output", str(labelled), *WANDB],
                      builtin_cache) == 0  # fmt: skip
    [run] = read_runs(labelled.parent)
    assert run.name == "pairs" and run.curve("pairs/nrows") and run.summary["pairs"] > 0
    assert not (labelled.parent / "metrics.jsonl").exists()  # nothing beside the user's file
    ranked = tmp_path / "ranked" / "ranked.jsonl"
    assert run_here(["select", "--output", str(ranked), "--top", "5", *WANDB], builtin_cache) == 0
    [run] = read_runs(ranked.parent)
    assert run.summary["written"] == 5 and run.curve("ranked/nrows")


def test_online_reads_conversational_prompt_only_rows(tiny_model_dir, tmp_path):
    """TRL's prompt-only conversational format, with content as text parts, for online DPO."""
    (tmp_path / "judges.py").write_text(JUDGES_PY)
    prompts = [{"prompt": [{"role": "user", "content": [{"type": "text", "text": f"review: {p}"}]}]}
               for p in sample_prompts(16, seed=3)]  # fmt: skip
    data = write_jsonl(tmp_path / "chat.jsonl", prompts)
    out = tmp_path / "run"
    assert run_here(["train", "--online", "--model", str(tiny_model_dir), "--dataset", str(data),
                       "--reward", f"{tmp_path / 'judges.py'}:letter_e", "--rounds", "2",
                       "--prompts-per-round", "8", "--max-new-tokens", "8", "--max-length", "64",
                       "--batch-size", "4", "--output-dir", str(out)], tmp_path / "cache") == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge_calls"] == 32 and summary["steps"] > 0
