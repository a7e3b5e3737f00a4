"""scripts/bench_gpu.py: its FLOP count by hand, and a smoke run of the script on a CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_gpu.py"
_spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
bench = sys.modules["bench_gpu"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench)

# 2 layers, attention width 4, hidden 4, vocab 10, 100 trunk parameters
SHAPE = bench.ModelShape(layers=2, width=4, hidden=4, vocab=10, trunk_params=100)


@pytest.mark.parametrize(
    ("lengths", "layout", "chunked", "expected"),
    [
        # shared row [p=3, c=2, r=1]: 6 tokens, 3 scored; area (3+2)²/2 + 1·3 + 1²/2 = 16;
        # 6·100·6 + 6·4·10·3 + 12·2·4·16 = 3600 + 720 + 1536
        ([(3, 2, 1)], "shared", True, (6, 6, 5856)),
        # packed: 3+2 and 3+1: 9 tokens, all scored without chunking; area 5²/2 + 4²/2 = 20.5;
        # 6·100·9 + 6·4·10·9 + 12·2·4·20.5 = 5400 + 2160 + 1968
        ([(3, 2, 1)], "packed", False, (9, 9, 9528)),
        # padded, 2 pairs: 9 + 7 tokens, 4 rows of the longest 5 = 20 slots; scored 3 + 5;
        # area 20.5 + (2²+5²)/2 = 35; 6·100·16 + 240·8 + 96·35 = 9600 + 1920 + 3360
        ([(3, 2, 1), (1, 1, 4)], "padded", True, (16, 20, 14880)),
    ],
)
def test_step_work_matches_the_hand_count(lengths, layout, chunked, expected):
    assert bench.step_work(SHAPE, lengths, layout, chunked) == expected


def test_model_shape_of_qwen2_5_0_5b():
    """Per layer: q/k/v 896·(896+128+128) + 1152 biases, o 896·896, MLP 3·896·4864, 2 norms
    of 896: 14,912,384; × 24 + the final norm 896 = 357,898,112 (the model card's 0.36B)."""
    shape = bench.ModelShape.of(bench.model_config("qwen2.5-0.5b"))
    assert shape == bench.ModelShape(layers=24, width=896, hidden=896, vocab=151936,
                                     trunk_params=357_898_112)  # fmt: skip


TINY = ["--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--prompt-len", "8",
        "24", "--response-len", "4", "12", "--row-tokens", "96"]  # fmt: skip


def test_smoke_run_on_cpu_writes_the_table_and_json(tmp_path):
    variants = ["all-on", "no-packing"]
    has_trl = importlib.util.find_spec("trl") is not None
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--variants", *variants, "trl", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| variant | attention | pairs/s | tokens/s |" in result.stdout
    if has_trl:
        variants.append("trl")
    else:  # without trl its row is skipped with one line
        skipped = [line for line in result.stdout.splitlines() if "trl row skipped" in line]
        assert len(skipped) == 1 and "| trl |" not in result.stdout
    for variant in variants:
        assert f"| {variant} | " in result.stdout
    report = json.loads(out.read_text())
    assert report["peak_flops"] > 0 and report["non_embedding_params"] > 0
    rows = report["results"]
    assert sorted(rows) == sorted(variants)
    for variant, row in rows.items():
        assert len(row["seconds"]) == 1, variant
        assert row["tokens_per_s"] > 0 and row["pairs_per_s"] > 0, variant
        assert row["peak_memory_gb"] > 0 and 0 < row["mfu"] < 1, variant
    assert rows["all-on"]["padding"] == 0 and rows["no-packing"]["padding"] > 0
    assert rows["all-on"]["attention"] == "direct_align_segments"
    assert rows["no-packing"]["attention"] == "sdpa"
