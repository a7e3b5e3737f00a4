"""Every way of holding the weights (bf16 with stochastic rounding, 8-bit AdamW states, the step
in backward) checkpoints and resumes to the weights of an uninterrupted run, in every training
command; and final/ loads as a Hugging Face model in the weights' dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from commands import JUDGES_PY, run_here
from safetensors.torch import load_file

from direct_align.builtin.task import sample_prompts
from prefdata import rows, write_jsonl

pytest.importorskip("torchao")
BF16_8BIT_IN_BACKWARD = ["--weights", "bf16", "--optimizer", "adamw-8bit", "--step-in-backward",
                         "--max-grad-norm", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    path = tmp_path_factory.mktemp("memory-resume")
    (path / "judges.py").write_text(JUDGES_PY)
    return {"cache": path / "cache", "judges": path / "judges.py",
            "pairs": write_jsonl(path / "pairs.jsonl", rows("standard", 64, seed=3)),
            "prompts": write_jsonl(path / "prompts.jsonl", [{"prompt": p} for p in sample_prompts(24, seed=5)])}  # fmt: skip


def command(name: str, model: Path, files: dict[str, Path]) -> list[str]:
    return {
        "train": ["train", "--model", str(model), "--dataset", str(files["pairs"]), "--max-steps", "6",
                  "--batch-size", "4", "--learning-rate", "1e-2", "--max-length", "48",
                  "--eval-every", "0", "--save-every", "0"],
        "train --online": ["train", "--online", "--model", str(model), "--dataset", str(files["prompts"]),
                           "--reward", f"{files['judges']}:letter_e", "--rounds", "6",
                           "--prompts-per-round", "4", "--max-new-tokens", "6", "--max-length", "40",
                           "--batch-size", "4", "--learning-rate", "5e-2", "--eval-every", "0",
                           "--save-every", "0"],
        "train-rm": ["train-rm", "--model", str(model), "--dataset", str(files["pairs"]), "--max-steps", "6",
                     "--batch-size", "4", "--learning-rate", "1e-2", "--max-length", "48",
                     "--eval-every", "0", "--save-every", "0"],
        "ppo": ["ppo", "--model", str(model), "--reward-model", str(model), "--dataset", str(files["prompts"]),
                "--rollouts", "6", "--rollout-batch-size", "4", "--mini-batch-size", "4",
                "--ppo-epochs", "1", "--max-new-tokens", "6", "--learning-rate", "1e-3",
                "--eval-every", "0", "--save-every", "0"],
    }[name] + ["--report-to", "none"]  # fmt: skip


@pytest.mark.parametrize(("name", "flags"), [
    ("train", BF16_8BIT_IN_BACKWARD),
    ("train", ["--weights", "bf16"]),
    ("train", ["--optimizer", "adamw-8bit"]),
    ("train --online", ["--weights", "bf16", "--optimizer", "adamw-8bit"]),
    ("train-rm", BF16_8BIT_IN_BACKWARD),
    ("ppo", BF16_8BIT_IN_BACKWARD),
])  # fmt: skip
def test_stopped_and_resumed_it_ends_with_the_weights_of_an_uninterrupted_run(
        name: str, flags: list[str], files: dict[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    args = [*command(name, tiny_model_dir, files), *flags]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_here([*args, "--output-dir", str(straight)], files["cache"]) == 0
    assert run_here([*args, "--output-dir", str(stopped), "--max-steps-per-run", "3"], files["cache"]) == 0
    assert not (stopped / "final").exists()
    assert run_here([*args, "--output-dir", str(stopped), "--resume"], files["cache"]) == 0
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(stopped / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    dtype = torch.bfloat16 if "bf16" in flags else torch.float32
    for key in a:
        assert a[key].dtype == dtype, key  # final/ holds the weights as they were trained
        assert torch.equal(a[key], b[key]), key
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = [k for k in base if k in a and not torch.equal(base[k].to(dtype), a[k])]
    assert moved  # it trained
