"""`direct-align train` on a tiny local Llama and local files, every format and loss, in-process
(the subprocess runs, with their exit codes and signals, are in tests/integration/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from commands import TINY_RUN, train_here
from transformers import AutoModelForCausalLM

from prefdata import rows, write_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prefs")
    for fmt in ("standard", "implicit", "conversational", "ultrafeedback"):
        write_jsonl(path / f"{fmt}.jsonl", rows(fmt, 400, seed=1))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("fmt", ["standard", "implicit", "conversational", "ultrafeedback"])
def test_each_format_trains_and_saves_a_loadable_model(fmt, data_dir, cache, tiny_model_dir, tmp_path,
                                                       caplog):  # fmt: skip
    out = tmp_path / "run"
    log = train_here(["--loss", "dpo", "--model", str(tiny_model_dir), "--dataset",
                 str(data_dir / f"{fmt}.jsonl"), "--output-dir", str(out), *TINY_RUN], cache, caplog)  # fmt: skip
    expected = "conversational" if fmt == "ultrafeedback" else fmt
    assert f"{expected} format, kept 400 of 400 pairs" in log
    summary = summary_of(out)
    assert summary["eval_pairs"] == 60 and summary["train_pairs"] == 340
    # DPO's implicit reward margin is exactly 0 at the start (policy == reference): accuracy 0
    assert summary["initial"]["eval/rewards/accuracies"] == 0.0
    assert summary["final"]["eval/rewards/accuracies"] >= 0.8
    assert summary["final"]["eval/loss"] < summary["initial"]["eval/loss"] - 0.2

    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert all(moved)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/tokenizer_config.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == list(range(1, summary["steps"] + 1))
    assert all(r["perf/tokens_per_s"] > 0 and r["perf/peak_mem_gb"] > 0 for r in records
               if "train/loss" in r)  # fmt: skip


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "orpo", "simpo"])
def test_each_loss_raises_held_out_accuracy(loss, data_dir, cache, tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "run"
    extra = ["--label-smoothing", "0.1"] if loss == "robust" else []
    log = train_here(["--loss", loss, "--model", str(tiny_model_dir), "--dataset",
                 str(data_dir / "standard.jsonl"), "--output-dir", str(out), *TINY_RUN, *extra],
                cache, caplog)  # fmt: skip
    summary = summary_of(out)
    assert summary["final"]["eval/rewards/accuracies"] >= 0.8
    assert summary["final"]["eval/rewards/accuracies"] > summary["initial"]["eval/rewards/accuracies"]
    reference_free = loss in ("orpo", "simpo")
    assert ("reference log-probs" in log) is not reference_free
    assert (summary["reference_cache"] == {}) is reference_free


def test_reference_cache_is_reused_and_recomputed_on_change(data_dir, tiny_model_dir, tmp_path,
                                                            caplog):  # fmt: skip
    cache = tmp_path / "cache"
    base = ["--loss", "dpo", "--model", str(tiny_model_dir), "--dataset",
            str(data_dir / "standard.jsonl"), "--max-steps", "2", "--eval-fraction", "0.15",
            "--max-length", "64"]  # fmt: skip
    first = train_here([*base, "--output-dir", str(tmp_path / "a")], cache, caplog)
    assert first.count("scoring") == 2 and "reusing" not in first
    second = train_here([*base, "--output-dir", str(tmp_path / "b")], cache, caplog)
    assert second.count("reusing cache") == 2 and "scoring" not in second
    assert summary_of(tmp_path / "b")["reference_cache"]["train"].startswith("reused")
    # same weights and data, other truncation: the tokens of both splits change, so both are
    # scored again (a split whose tokens did not change would rightly reuse its entry)
    third = train_here([*base[:-1], "20", "--output-dir", str(tmp_path / "c")], cache, caplog)
    assert "reference log-probs (train): scoring" in third
    assert "reference log-probs (eval): scoring" in third
    assert len(list((cache / "reference").glob("*.safetensors"))) == 4
