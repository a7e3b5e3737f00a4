"""`direct-align train` when things go wrong: stop signals at every stage, diverging weights, and
data edited behind the cache's back. Each run is the real command, in-process, on a tiny model;
a signal is raised from inside the stage it targets."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import direct_align.models.lora as lora
import direct_align.preference.evaluate as evaluate
import direct_align.preference.reference as reference
from direct_align.cli import main
from prefdata import rows, write_jsonl


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", rows("standard", 48, seed=7))


def train(model: Path, data: Path, out: Path, cache: Path, *extra: str) -> int:
    """`direct-align train` in-process; returns its exit status."""
    args = ["train", "--loss", "dpo", "--model", str(model), "--dataset", str(data), "--output-dir",
            str(out), "--batch-size", "8", "--max-length", "64", "--learning-rate", "1e-2",
            "--max-steps", "6", "--eval-every", "0", "--save-every", "0", "--report-to", "none",
            *extra]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIRECT_ALIGN_CACHE", str(cache))
        try:
            main(args)
        except SystemExit as e:
            return int(e.code or 0)
    return 0


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def one_error(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def stop_on_call(monkeypatch: pytest.MonkeyPatch, module: object, name: str, nth: int = 1) -> None:
    """Make the ``nth`` call of ``module.name`` send SIGTERM to this process first."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.fixture()
def uninterrupted(tiny_model_dir: Path, data: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / "whole"
    assert train(tiny_model_dir, data, out, tmp_path / "cache-whole") == 0
    return weights(out)


def test_a_signal_during_the_reference_pass_leaves_a_run_to_resume(
        tiny_model_dir, data, tmp_path, monkeypatch, capsys, uninterrupted) -> None:  # fmt: skip
    out, cache = tmp_path / "run", tmp_path / "cache"
    stop_on_call(monkeypatch, reference, "score_pairs")
    assert train(tiny_model_dir, data, out, cache, "--eval-batch-size", "2") == 143
    assert "during the reference pass, before any training step; continue with --resume" in one_error(capsys)
    assert (out / "config.yaml").is_file() and not (out / "final").exists()
    monkeypatch.undo()
    assert train(tiny_model_dir, data, out, cache, "--eval-batch-size", "2", "--resume") == 0
    assert_same(weights(out), uninterrupted)


def test_a_signal_during_the_final_evaluation_checkpoints_the_last_step(
        tiny_model_dir, data, tmp_path, monkeypatch, capsys, uninterrupted) -> None:  # fmt: skip
    out, cache = tmp_path / "run", tmp_path / "cache"
    stop_on_call(monkeypatch, evaluate, "eval_metrics", nth=2)  # step 0, then the final one
    assert train(tiny_model_dir, data, out, cache) == 143
    assert "at step 6, during the final evaluation; checkpoint saved" in one_error(capsys)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000006"]
    monkeypatch.undo()
    assert train(tiny_model_dir, data, out, cache, "--resume") == 0
    assert_same(weights(out), uninterrupted)
    evals = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "eval/loss" in line]  # fmt: skip
    assert evals == [0, 6]  # the final evaluation logged once


def test_a_signal_while_saving_lets_the_finished_run_complete(
        tiny_model_dir, data, tmp_path, monkeypatch, caplog, uninterrupted) -> None:  # fmt: skip
    out = tmp_path / "run"
    stop_on_call(monkeypatch, lora, "save_final")
    assert train(tiny_model_dir, data, out, tmp_path / "cache") == 0
    assert "received signal 15 while saving; the run had finished" in caplog.text
    assert (out / "summary.json").is_file()
    assert_same(weights(out), uninterrupted)


def test_diverging_weights_are_never_checkpointed_nor_saved(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    status = train(tiny_model_dir, data, out, tmp_path / "cache", "--learning-rate", "10",
                   "--max-steps", "40", "--save-every", "1", "--save-total-limit", "1")  # fmt: skip
    assert status == 1
    message = one_error(capsys)
    assert re.search(r"^error: step \d+: (the loss is non-finite|the gradient norm is (inf|nan)|"
                     r"the weights hold non-finite).*; last checkpoint: ", message), message
    for checkpoint in (out / "checkpoints").glob("step-*"):
        for name, tensor in load_file(str(checkpoint / "model.safetensors")).items():
            assert torch.isfinite(tensor).all(), f"{checkpoint.name}: {name}"
    assert not (out / "final").exists()


def test_a_data_file_edited_in_place_is_read_anew(tiny_model_dir, tmp_path) -> None:
    """The `datasets` cache keys a local file by path and mtime; an edit that keeps the mtime
    must still be seen (and give the reference cache a new key)."""
    data = write_jsonl(tmp_path / "prefs.jsonl", rows("standard", 48, seed=7))
    stat = data.stat()
    cache = tmp_path / "cache"
    assert train(tiny_model_dir, data, tmp_path / "a", cache, "--max-steps", "1") == 0
    write_jsonl(data, rows("standard", 36, seed=8))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert train(tiny_model_dir, data, tmp_path / "b", cache, "--max-steps", "1") == 0
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in "ab"]
    assert [s["train_pairs"] + s["eval_pairs"] for s in summaries] == [48, 36]
    assert summaries[0]["reference_cache"]["train"] != summaries[1]["reference_cache"]["train"]
