"""DeepSpeed ZeRO-2 through accelerate (configs/accelerate/zero2.yaml) on 2 CPU processes trains
what one process trains, also across a checkpoint and --resume; ZeRO-3 is refused in one line.

DeepSpeed is optional (`pip install deepspeed`): without it these tests are skipped, as the GPU
tests are without a GPU."""

from __future__ import annotations

import pytest
import torch
from launch import launch, train, weights

from prefdata import rows, write_jsonl

pytest.importorskip("deepspeed")


def test_zero2_on_two_processes_trains_what_one_process_trains(tmp_path, tiny_model_dir) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", rows("standard", 27, seed=4))
    train(1, tmp_path / "one", tiny_model_dir, data, tmp_path / "cache1")
    split = tmp_path / "zero2"
    train(2, split, tiny_model_dir, data, tmp_path / "cache2", "--max-steps-per-run", "2",
          config="zero2.yaml")  # fmt: skip
    assert (split / "checkpoints" / "step-000002" / "latest").is_file()  # DeepSpeed's own
    train(2, split, tiny_model_dir, data, tmp_path / "cache2", "--resume", config="zero2.yaml")
    one, two = weights(tmp_path / "one"), weights(split)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)


def test_zero3_is_refused_in_one_line(tmp_path, tiny_model_dir) -> None:
    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n"
                     "  zero_stage: 3\n  gradient_accumulation_steps: 1\n")  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", rows("standard", 8, seed=4))
    result = launch(2, ["train", "--model", str(tiny_model_dir), "--dataset", str(data),
                        "--output-dir", str(tmp_path / "out"), "--grad-accum", "2"], {},
                    check=False, config=str(zero3))  # fmt: skip
    assert result.returncode != 0
    assert "error: DeepSpeed ZeRO-3 is not supported yet" in result.stderr
    assert not (tmp_path / "out").exists()
