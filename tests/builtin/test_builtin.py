"""The built-in task: its hidden reward, its tokenizer, and the default command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from commands import run_here
from transformers import AutoModelForCausalLM, AutoTokenizer

from direct_align.builtin.build import (
    BuiltinAssets,
    BuiltinSpec,
    build_base_model,
    build_pairs,
    remove_abandoned_builds,
)
from direct_align.builtin.task import sample_corpus, sample_prompts, true_reward


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        (" was great. i loved it.", 1.0),  # two positive words
        (" was awful and boring.", 0.0),  # two negative words
        (" was great but the plot was dull. i would skip it.", 1 / 3),  # 1 positive, 2 negative
        (" was long.", 0.5),  # no sentiment word
        ("GREAT, Superb!", 1.0),  # case and punctuation do not matter
        (" was greatness.", 0.5),  # whole words only
    ],
)
def test_true_reward_hand_values(text: str, reward: float) -> None:
    assert true_reward(text) == pytest.approx(reward)


def test_corpus_and_prompts_are_deterministic_and_prompts_are_neutral() -> None:
    assert sample_corpus(20, seed=5) == sample_corpus(20, seed=5) != sample_corpus(20, seed=6)
    prompts = sample_prompts(200, seed=9)
    assert all(true_reward(p) == 0.5 and not p.endswith(".") for p in prompts)
    assert len(set(prompts)) > 20


def test_tokenizer_round_trips_and_has_a_chat_template(tiny_tokenizer) -> None:
    text = "the film was superb. i would recommend it."
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # BPE merged the domain's words
    odd = "naïve café 🙂"  # byte level: text outside the corpus still round-trips
    assert tiny_tokenizer.decode(tiny_tokenizer(odd, add_special_tokens=False).input_ids) == odd
    rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                  tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert rendered == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_default_command_raises_the_hidden_reward(default_run) -> None:
    """`direct-align train --loss dpo` with nothing else: builds the task, trains, reports."""
    _, tmp_path, result = default_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built-in task: building it once" in result.stderr
    assert "true reward of samples (hidden, ↑)" in result.stdout
    run = next((tmp_path / "runs").glob("dpo-*"))
    builtin = json.loads((run / "summary.json").read_text())["builtin"]
    assert builtin["policy/true_reward"] > builtin["reference/true_reward"] + 0.2
    assert builtin["policy/kl"] > 0
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert 1_000_000 < model.num_parameters() < 10_000_000
    assert AutoTokenizer.from_pretrained(run / "final").chat_template is not None


@pytest.mark.parametrize("threads", [1, 2])
def test_pairs_never_hold_a_blank_response_whatever_the_thread_count(threads: int) -> None:
    """Which samples decode to blank text depends on the floating-point path; with this small
    recipe the base model samples one blank continuation in 320 at either thread count, and a
    pair holding it would be refused by training (`field 'rejected' is empty`)."""
    spec = BuiltinSpec(corpus_size=2000, vocab_size=384, hidden_size=32, num_layers=2,
                       num_heads=2, intermediate_size=64, sft_steps=20, sft_batch_size=16,
                       train_pairs=300, eval_pairs=20)  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer, model = build_base_model(spec)
        train, evals = build_pairs(model, tokenizer, spec)  # checks its rows as training reads them
    finally:
        torch.set_num_threads(before)
    assert len(train) == 300 and len(evals) == 20
    assert all(row["a"].strip() and row["b"].strip() for row in train)
    assert all(row["chosen"].strip() and row["rejected"].strip() for row in evals)


def test_an_interrupted_build_leaves_no_folder_behind(tmp_path) -> None:
    """A build killed mid-way leaves ``v<version>-<key>.tmp<pid>``; the next build removes the
    folders of processes that are gone and keeps one that is still building."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    abandoned = tmp_path / f"v2-0123456789abcdef.tmp{dead}"
    running = tmp_path / f"v2-0123456789abcdef.tmp{os.getpid()}"
    for folder in (abandoned, running):
        (folder / "base").mkdir(parents=True)
    remove_abandoned_builds(tmp_path)
    assert not abandoned.exists() and running.is_dir()


@pytest.mark.slow
def test_kto_runs_on_the_task_as_thumbs_up_or_down(default_run, tmp_path, capsys) -> None:
    """`train --loss kto` on the built-in task: its samples labelled by the hidden reward."""
    cache, _, first = default_run
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "kto"
    assert run_here(["train", "--loss", "kto", "--max-steps", "30", "--eval-every", "0",
                     "--eval-prompts", "48", "--label-noise", "0.1", "--output-dir", str(out)],
                    cache) == 0  # fmt: skip
    assert "true reward of samples (hidden, ↑)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_pairs"] == 4000  # every sample of the task's 2,000 candidate pairs
    assert summary["builtin"]["policy/true_reward"] > summary["builtin"]["reference/true_reward"] + 0.1
    assert summary["final"]["eval/loss"] < summary["initial"]["eval/loss"]

    task = next((cache / "builtin").glob("v*"))
    candidates = [json.loads(line) for line in (task / "candidates.jsonl").open()]
    labels = [json.loads(line)["label"] for line in (task / "thumbs-t0.500-noise0.100.jsonl").open()]
    truth = [reward > 0.5 for row in candidates for reward in (row["reward_a"], row["reward_b"])]
    flipped = sum(a != b for a, b in zip(labels, truth)) / len(truth)
    assert len(labels) == len(truth) and 0.08 < flipped < 0.12


@pytest.mark.slow
def test_a_wrong_reward_model_scores_every_evaluation_beside_the_hidden_reward(
    default_run, tmp_path
) -> None:
    """The proxy task's parts: a reward model from a few noisy pairs (--train-pairs,
    --label-noise), and a run on the same pairs scored by it along training
    (--eval-reward-model) as well as by the hidden reward."""
    cache, _, first = default_run
    assert first.returncode == 0, first.stderr[-3000:]
    noisy = ["--train-pairs", "96", "--label-noise", "0.25"]
    rm = tmp_path / "rm"
    assert run_here(["train-rm", *noisy, "--max-steps", "6", "--eval-every", "0",
                     "--output-dir", str(rm)], cache) == 0  # fmt: skip
    assert json.loads((rm / "summary.json").read_text())["train_pairs"] == 96
    out = tmp_path / "dpo"
    assert run_here(["train", *noisy, "--max-steps", "4", "--eval-every", "2", "--eval-prompts", "16",
                     "--eval-reward-model", str(rm / "final"), "--output-dir", str(out)], cache) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_pairs"] == 96
    builtin = summary["builtin"]
    assert {"policy/proxy_reward", "reference/proxy_reward"} <= set(builtin)
    assert builtin["policy/proxy_reward"] != builtin["reference/proxy_reward"]
    evaluations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in evaluations if "eval/policy/proxy_reward" in r]
    assert steps == [2, 4]  # along training and at the end
    assert 0 < summary["builtin_eval_s"] < summary["runtime_s"]


def test_train_pairs_are_a_fixed_random_subset_of_the_same_noisy_pairs(tmp_path) -> None:
    rows = [{"prompt": f"p{i}", "a": f"a{i}", "b": f"b{i}", "reward_a": i % 3, "reward_b": 1.5}
            for i in range(50)]  # fmt: skip
    (tmp_path / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assets = BuiltinAssets(tmp_path, tmp_path, tmp_path / "eval.jsonl", tmp_path / "p.jsonl")
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    full = read(assets.train_file(0.25))
    subset = read(assets.train_file(0.25, pairs=12))
    assert len(full) == 50 and len(subset) == 12
    assert all(row in full for row in subset)  # the same labels, flipped or not, as in full
    assert len({r["prompt"] for r in subset}) == 12
    flipped = [r["chosen"].startswith("b") != (int(r["prompt"][1:]) % 3 < 1.5) for r in full]
    assert 0 < sum(flipped) < 25  # b wins when reward_a < 1.5, unless its label was flipped
    assets.train_file(0.25, pairs=12).unlink()
    assert read(assets.train_file(0.25, pairs=12)) == subset  # the same subset when rebuilt
