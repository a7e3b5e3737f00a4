"""Settings: defaults < built-in preset < YAML < flags, and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from direct_align.config import BUILTIN_PRESET, TrainConfig, load_yaml, resolve, uses_reference
from direct_align.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss: ipo\nbeta: 0.3\nlearning-rate: 5e-7\nseed: 7\n")
    cfg = resolve({"beta": "0.05", "model": "m", "dataset": "d.jsonl"}, str(path))
    assert (cfg.loss, cfg.beta, cfg.seed) == ("ipo", 0.05, 7)
    # PyYAML reads 5e-7 as a string (YAML 1.1 floats need a dot); it is still a float here
    assert cfg.learning_rate == 5e-7 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == TrainConfig().batch_size


def test_builtin_preset_only_without_model_and_dataset() -> None:
    builtin = resolve({})
    assert builtin.learning_rate == BUILTIN_PRESET["learning_rate"] != TrainConfig().learning_rate
    own = resolve({"model": "some/model", "dataset": "d.jsonl"})
    assert own.learning_rate == TrainConfig().learning_rate
    flagged = resolve({"learning_rate": "3e-4"})
    assert flagged.learning_rate == 3e-4 and flagged.batch_size == BUILTIN_PRESET["batch_size"]


def test_beta_defaults_to_the_loss_default() -> None:
    assert resolve({"loss": "simpo"}).beta == 2.0
    assert resolve({"loss": "dpo"}).beta == 0.1


def test_default_output_dir_is_new_per_run_and_resume_needs_one() -> None:
    assert resolve({"loss": "orpo"}).output_dir.startswith("runs/orpo-")
    with pytest.raises(ConfigError, match="--resume needs the --output-dir"):
        resolve({"resume": True})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    values = load_yaml(str(path))
    assert values["loss"] == path.stem
    cfg = resolve({"model": "m", "dataset": "d.jsonl"}, str(path))
    assert cfg.loss == path.stem and cfg.beta > 0


def test_every_loss_has_a_shipped_config() -> None:
    from direct_align.losses import LOSSES

    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(LOSSES)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"beta": "-1"}, "--beta must be > 0"),
        ({"epochs": "0"}, "--epochs must be at least 1"),
        ({"max_length": "1"}, "--max-length must be at least 2"),
        ({"eval_fraction": "1.0"}, "--eval-fraction must be in (0, 1)"),
        ({"resume": True, "overwrite": True, "output_dir": "x"}, "exclude each other"),
        ({"reference_free": True, "ref_model": "r"}, "exclude each other"),
        ({"epochs": "1.5"}, "'epochs' must be int, got '1.5'"),
        ({"precision": "fp8"}, "unknown precision 'fp8' (choose from auto, fp32, bf16)"),
    ],
)  # fmt: skip
def test_invalid_settings(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(values)
    assert message in str(info.value)


def test_yaml_type_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError, match=f"^{path}: 'batch_size' must be int, got 'lots'$"):
        load_yaml(str(path))
    path.write_text("- loss\n- dpo\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(str(path))


def test_uses_reference() -> None:
    assert uses_reference(resolve({"loss": "dpo"}))
    assert not uses_reference(resolve({"loss": "dpo", "reference_free": True}))
    assert not uses_reference(resolve({"loss": "orpo"}))
