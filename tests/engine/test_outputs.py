"""Checkpoints that prove themselves intact: the manifest, damage found on resume, the fall back
to an intact checkpoint, planted files refused, and runs moved to another directory."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy import ToyConfig, run_toy

from direct_align.engine.outputs import MANIFEST, RunDir, damage, write_manifest
from direct_align.errors import ConfigError


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def stopped_run(tmp_path: Path, *, save_every: int = 2, stop_at: int = 6) -> Path:
    """A toy run of 10 steps stopped at ``stop_at`` with checkpoints every ``save_every``."""
    out = tmp_path / "run"
    run_toy(ToyConfig(steps=10, save_every=save_every, save_total_limit=5,
                      max_steps_per_run=stop_at, output_dir=str(out)))  # fmt: skip
    return out


def test_a_checkpoint_lists_every_file_it_holds_and_detects_changes(tmp_path: Path) -> None:
    out = stopped_run(tmp_path)
    checkpoint = RunDir(out).last_checkpoint()
    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(listed)
    assert not any(name.startswith("custom_checkpoint") for name in listed)  # no pickled schedule
    assert damage(checkpoint) is None
    model = checkpoint / "model.safetensors"
    weights = load_file(str(model))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(model),
              metadata={"format": "pt"})  # the same size
    assert damage(checkpoint) == "model.safetensors does not match its checksum"
    (checkpoint / "optimizer.bin").write_bytes((checkpoint / "optimizer.bin").read_bytes()[:100])
    write_manifest(checkpoint)  # a manifest that agrees with the files again
    assert damage(checkpoint) is None


@pytest.mark.parametrize("harm", ["truncate the weights", "zero the weights", "delete the RNG state",
                                  "delete the optimizer", "drop the manifest"])  # fmt: skip
def test_resume_passes_over_a_damaged_checkpoint_to_the_newest_intact_one(
        tmp_path: Path, harm: str, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    whole, _, _ = run_toy(ToyConfig(steps=10, output_dir=str(tmp_path / "whole")))
    out = stopped_run(tmp_path)
    newest = RunDir(out).last_checkpoint()
    assert newest.name == "step-000006"
    if harm == "truncate the weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif harm == "zero the weights":
        weights = load_file(str(newest / "model.safetensors"))
        save_file({k: torch.zeros_like(v) for k, v in weights.items()},
                  str(newest / "model.safetensors"), metadata={"format": "pt"})  # the same size
    elif harm == "delete the RNG state":
        (newest / "random_states_0.pkl").unlink()
    elif harm == "delete the optimizer":
        (newest / "optimizer.bin").unlink()
    else:  # an interrupted save: the manifest is written last
        (newest / MANIFEST).unlink()
    with caplog.at_level("WARNING"):
        resumed, _, finished = run_toy(ToyConfig(steps=10, resume=True, output_dir=str(out)))
    assert finished
    if harm != "drop the manifest":  # an incomplete checkpoint is not even a candidate
        assert "step-000006 is damaged" in caplog.text and "resuming from step-000004" in caplog.text
    assert_same_weights(resumed, whole)


def test_resume_refuses_when_no_checkpoint_is_intact(tmp_path: Path) -> None:
    out = stopped_run(tmp_path, save_every=3, stop_at=3)  # one checkpoint, at step 3
    (out / "checkpoints" / "step-000003" / "optimizer.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"^--resume: no intact checkpoint in .*checkpoints' "
                                          r"\(step-000003 is damaged \(optimizer.bin has 1 bytes"):  # fmt: skip
        run_toy(ToyConfig(steps=10, resume=True, output_dir=str(out)))


class _Planted:
    """Unpickling it writes a file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran"))


def test_resume_refuses_a_pickle_it_did_not_write_and_runs_none(tmp_path: Path) -> None:
    out = stopped_run(tmp_path)
    marker = tmp_path / "pwned"
    newest = RunDir(out).last_checkpoint()
    (newest / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ConfigError, match=r"holds custom_checkpoint_0.pkl, which direct-align did "
                                          r"not write; refusing to load it"):  # fmt: skip
        run_toy(ToyConfig(steps=10, resume=True, output_dir=str(out)))
    assert not marker.exists()
    # a planted RNG state with a manifest forged to match is not unpickled either
    (newest / "custom_checkpoint_0.pkl").unlink()
    torch.save({"x": _Planted(marker)}, newest / "random_states_0.pkl")
    write_manifest(newest)
    with pytest.raises(ConfigError, match=r"^--resume: cannot load .*step-000006: "):
        run_toy(ToyConfig(steps=10, resume=True, output_dir=str(out)))
    assert not marker.exists()


def test_a_run_moved_to_another_directory_resumes(tmp_path: Path) -> None:
    whole, _, _ = run_toy(ToyConfig(steps=10, output_dir=str(tmp_path / "whole")))
    out = stopped_run(tmp_path)
    moved = tmp_path / "bigger-disk" / "run"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    resumed, _, finished = run_toy(ToyConfig(steps=10, resume=True, output_dir=str(moved)))
    assert finished
    assert_same_weights(resumed, whole)
