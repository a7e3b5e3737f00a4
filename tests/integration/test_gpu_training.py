"""DPO on a CUDA device in bf16 with the default fast path (shared-prompt rows, chunked log-probs,
attention ``auto``: a varlen kernel): it learns, its gradients are finite, and its log-prob sums under bf16
autocast match the plain fp32 computation. Skipped without CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny_model
from direct_align.data.packing import LAYOUTS, build_batch
from direct_align.losses import preference_loss
from direct_align.models.loading import preference_model
from direct_align.preference.settings import TrainConfig
from fastpath import INDEX, PAD, SHAPES, random_pairs, sharpen
from prefdata import rows, write_jsonl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]  # fmt: skip

DEVICE = "cuda"
# Allowed |bf16 sum - fp32 sum| per response token, in nats. With CPU bf16 autocast these tiny
# sharpened models are off by at most 1.1e-3 per token (0.027 over 25 tokens); a misplaced token
# or a wrong target moves a sum by nats.
TOKEN_TOL = 0.02


def bf16() -> torch.autocast:
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def test_cli_trains_in_bf16_and_accuracy_rises(tiny_model_dir: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "prefs.jsonl", rows("standard", 400, seed=1))
    out = tmp_path / "run"
    env = {**os.environ, "DIRECT_ALIGN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "direct_align", "train", "--loss", "dpo", "--model",
         str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out), "--precision",
         "bf16", "--learning-rate", "1e-2", "--batch-size", "16", "--epochs", "2",
         "--max-length", "64", "--eval-fraction", "0.15", "--eval-every", "0", "--save-every", "0"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["precision"], config["layout"], config["attn"]) == ("bf16", "shared", "auto")
    summary = json.loads((out / "summary.json").read_text())
    initial, final = summary["initial"], summary["final"]
    assert final["eval/rewards/accuracies"] >= 0.8
    assert final["eval/rewards/accuracies"] >= initial["eval/rewards/accuracies"] + 0.3
    assert final["eval/loss"] < initial["eval/loss"] - 0.2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert len(steps) == summary["steps"] > 0
    assert all(
        math.isfinite(r["train/loss"]) and 0 < r["train/grad_norm"] < math.inf for r in steps
    )
    # On a GPU this is torch.cuda.max_memory_allocated: megabytes for this model, where a CPU
    # run would report the process's resident memory (hundreds of megabytes).
    assert all(0 < r["perf/peak_mem_gb"] < 0.1 for r in steps)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_autocast_sums_match_the_fp32_plain_computation(layout: str, tiny_tokenizer):
    data = random_pairs(SHAPES, seed=0)
    plain = TrainConfig(layout="padded", attn="sdpa", chunked_logprobs=False)
    reference = preference_model(sharpen(make_tiny_model(tiny_tokenizer)), plain,
                                 bf16=True).to(DEVICE)
    fast = preference_model(sharpen(make_tiny_model(tiny_tokenizer)), TrainConfig(layout=layout),
                            bf16=True, device=DEVICE).to(DEVICE)  # fmt: skip
    with torch.no_grad():
        want = reference(build_batch(data, INDEX, "padded", PAD).to(DEVICE))
        with bf16():
            got = fast(build_batch(data, INDEX, layout, PAD).to(DEVICE))
    for side in ("chosen", "rejected"):
        g, w = getattr(got, side), getattr(want, side)
        lengths = getattr(want, f"{side}_lengths")
        assert torch.equal(getattr(got, f"{side}_lengths"), lengths), side
        assert g.dtype == torch.float32, side
        assert ((g - w).abs() <= TOKEN_TOL * lengths).all(), (side, g, w)
    # the sums are bf16's: autocast did reach the model
    assert not torch.equal(
        torch.cat([got.chosen, got.rejected]), torch.cat([want.chosen, want.rejected])
    )


def test_bf16_steps_have_finite_fp32_gradients_and_lower_the_loss(tiny_tokenizer):
    model = preference_model(make_tiny_model(tiny_tokenizer), TrainConfig(), bf16=True,
                             device=DEVICE)
    model.to(DEVICE).train()
    batch = build_batch(random_pairs(SHAPES, seed=0), INDEX, "shared", PAD).to(DEVICE)
    with torch.no_grad(), bf16():
        ref = model(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        with bf16():
            out = model(batch)
            loss, _ = preference_loss("dpo", chosen_logps=out.chosen, rejected_logps=out.rejected,
                                      ref_chosen_logps=ref.chosen, ref_rejected_logps=ref.rejected,
                                      chosen_lengths=out.chosen_lengths,
                                      rejected_lengths=out.rejected_lengths, beta=0.1)  # fmt: skip
        loss.backward()
        for name, p in model.named_parameters():
            assert p.dtype == p.grad.dtype == torch.float32, name  # fp32 master weights
            assert torch.isfinite(p.grad).all(), name
        assert any(p.grad.abs().sum() > 0 for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-2)  # policy == reference at step 0
    assert losses[-1] < losses[0] - 0.1
