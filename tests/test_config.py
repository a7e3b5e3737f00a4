"""The settings system: precedence, one coercer, one rule table, YAML with file:line errors, and
every command's settings built from it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from conftest import train_settings
from direct_align.compare.settings import CompareConfig
from direct_align.config import load_yaml, resolve, setting_of, settings_of
from direct_align.errors import ConfigError
from direct_align.ppo.settings import PPOConfig
from direct_align.preference.label_settings import LabelConfig, SelectConfig
from direct_align.preference.settings import TrainConfig, uses_reference
from direct_align.rm.settings import RewardConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMANDS = [TrainConfig, RewardConfig, PPOConfig, LabelConfig, SelectConfig, CompareConfig]


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss: ipo\nbeta: 0.3\nlearning-rate: 5e-7\nseed: 7\n")
    cfg = train_settings({"beta": "0.05", "model": "m", "dataset": "d.jsonl"}, str(path))
    assert (cfg.loss, cfg.beta, cfg.seed) == ("ipo", 0.05, 7)
    # PyYAML reads 5e-7 as a string (YAML 1.1 floats need a dot); it is still a float here
    assert cfg.learning_rate == 5e-7 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == TrainConfig().batch_size


def test_builtin_preset_only_without_model_and_dataset() -> None:
    preset = TrainConfig.builtin_preset
    builtin = train_settings({})
    assert builtin.learning_rate == preset["learning_rate"] != TrainConfig().learning_rate
    own = train_settings({"model": "some/model", "dataset": "d.jsonl"})
    assert own.learning_rate == TrainConfig().learning_rate
    flagged = train_settings({"learning_rate": "3e-4"})
    assert flagged.learning_rate == 3e-4 and flagged.batch_size == preset["batch_size"]


def test_beta_defaults_to_the_loss_default() -> None:
    assert train_settings({"loss": "simpo"}).beta == 2.0
    assert train_settings({"loss": "dpo"}).beta == 0.1


def test_default_output_dir_is_new_per_run_and_resume_needs_one() -> None:
    assert train_settings({"loss": "orpo"}).output_dir.startswith("runs/orpo-")
    assert resolve(RewardConfig, {}).output_dir.startswith("runs/rm-")
    assert resolve(PPOConfig, {}).output_dir.startswith("runs/ppo-")
    for cls in (TrainConfig, RewardConfig, PPOConfig):
        with pytest.raises(ConfigError, match="--resume needs the --output-dir"):
            resolve(cls, {"resume": True})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    values = load_yaml(str(path), TrainConfig)
    assert values["loss"] == path.stem
    judge = {"reward": ["judge.py:score"]} if values.get("online") else {}  # online needs one
    cfg = train_settings({"model": "m", "dataset": "d.jsonl", **judge}, str(path))
    assert cfg.loss == path.stem and cfg.beta > 0


def test_the_kto_config_keeps_the_balanced_weights() -> None:
    """configs/kto.yaml leaves λ_U unset, so balance_kto sets λ_U = λ_D·n_D / n_U (the setting
    docs/feedback.md measured collapsing, λ_U = 1 on imbalanced data, must not come back)."""
    from direct_align.preference.settings import balance_kto

    cfg = train_settings({"model": "m", "dataset": "d.jsonl"}, str(CONFIGS / "kto.yaml"))
    assert cfg.undesirable_weight is None
    assert balance_kto(cfg, [True] * 3 + [False] * 5).undesirable_weight == pytest.approx(3 / 5)


def test_every_loss_has_a_shipped_config() -> None:
    from direct_align.group_losses import GROUP_LOSSES
    from direct_align.losses import LOSSES

    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(LOSSES) | set(GROUP_LOSSES)


# ----------------------------------------------------------------------------- one coercer


@pytest.mark.parametrize("value", [3, "3", 3.0, "3.0", "3e0"])
def test_an_integer_may_be_written_any_way_that_means_it(value) -> None:
    for cls in (TrainConfig, RewardConfig, PPOConfig):  # the same answer in every command
        assert resolve(cls, {"log_every": value}).log_every == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": "1.5"}, "--epochs must be an integer (finite), got '1.5'"),
        ({"epochs": True}, "--epochs must be an integer (finite), got True"),
        ({"learning_rate": "inf"}, "--learning-rate must be a number (finite), got 'inf'"),
        ({"learning_rate": "nan"}, "--learning-rate must be a number (finite), got 'nan'"),
        ({"learning_rate": "1e30"}, "--learning-rate must be in (0, 1000], got 1e+30"),
        ({"beta": "-1"}, "--beta must be > 0, got -1.0"),
        ({"epochs": "0"}, "--epochs must be at least 1, got 0"),
        ({"max_length": "1"}, "--max-length must be at least 2, got 1"),
        ({"eval_fraction": "1.0"}, "--eval-fraction must be in (0, 1), got 1.0"),
        ({"top_p": "0"}, "--top-p must be in (0, 1], got 0.0"),
        ({"precision": "fp8"}, "--precision must be one of auto, fp32, bf16; got 'fp8'"),
        ({"loss": "dpoo"}, "--loss must be one of dpo, ipo, hinge, robust, orpo, simpo, kto, rebel, "
                           "lipo, sppo, rloo; got 'dpoo' (did you mean 'dpo'?)"),
        ({"online": "maybe"}, "--online must be true or false, got 'maybe'"),
        ({"resume": True, "overwrite": True, "output_dir": "x"}, "exclude each other"),
        ({"reference_free": True, "ref_model": "r"}, "exclude each other"),
        ({"lora_alpha": "4"}, "--lora-alpha needs --lora-r"),
    ],
)  # fmt: skip
def test_invalid_settings(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train_settings(values)
    assert message in str(info.value)


@pytest.mark.parametrize("cls", [RewardConfig, PPOConfig])
def test_other_commands_word_shared_checks_alike(cls: type) -> None:
    with pytest.raises(ConfigError, match=r"^--learning-rate must be in \(0, 1000\], got -1.0$"):
        resolve(cls, {"learning_rate": "-1"})
    with pytest.raises(ConfigError, match=r"^--warmup-ratio must be in \[0, 1\), got 1.5$"):
        resolve(cls, {"warmup_ratio": "1.5"})


def test_ppo_checks() -> None:
    with pytest.raises(ConfigError, match="--mini-batch-size must be at most --rollout-batch-size"):
        resolve(PPOConfig, {"rollout_batch_size": "4", "mini_batch_size": "8"})
    with pytest.raises(ConfigError, match="--reward-model is required with --model"):
        resolve(PPOConfig, {"model": "m"})


# ----------------------------------------------------------------------------- YAML


def test_yaml_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss: dpo\nbatch_size: lots\n")
    with pytest.raises(ConfigError, match=f"^{path}:2: batch_size must be an integer \\(finite\\), "
                                          "got 'lots'$"):  # fmt: skip
        load_yaml(str(path), TrainConfig)
    path.write_text("loss: dpo\n\nbetta: 0.2\n")
    with pytest.raises(ConfigError, match=f"^{path}:3: unknown setting 'betta' \\(did you mean "
                                          "'beta'\\?\\)$"):  # fmt: skip
        load_yaml(str(path), TrainConfig)
    path.write_text("epochs: 0\n")
    with pytest.raises(ConfigError, match=f"^{path}:1: epochs must be at least 1, got 0$"):
        load_yaml(str(path), TrainConfig)
    path.write_text("beta: 0.1\nseed: 1\nbeta: 0.2\n")
    with pytest.raises(ConfigError, match=f"^{path}:3: 'beta' is set twice$"):
        load_yaml(str(path), TrainConfig)
    path.write_text("- loss\n- dpo\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(str(path), TrainConfig)


def test_trl_names_point_to_direct_align_settings(tmp_path: Path) -> None:
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: Qwen/Qwen2.5-0.5B\n")
    with pytest.raises(ConfigError, match=f"^{path}:1: 'model_name_or_path' is TRL's name; here "
                                          "it is model$"):  # fmt: skip
        resolve(TrainConfig, {}, str(path))
    path.write_text("beta: 0.1\nloss_type: sigmoid\n")
    with pytest.raises(ConfigError, match=r"'loss_type' is TRL's name; here it is loss \(sigmoid "
                                          r"→ dpo"):  # fmt: skip
        resolve(TrainConfig, {}, str(path))
    path.write_text("per_device_train_batch_size: 4\n")
    for cls in (TrainConfig, RewardConfig):
        with pytest.raises(ConfigError, match="here it is batch_size"):
            resolve(cls, {}, str(path))


def test_push_to_hub_is_refused_up_front_when_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="--push-to-hub me/model: the Hub cannot be reached"):
        train_settings({"push_to_hub": "me/model"})
    with pytest.raises(ConfigError, match="--wandb-log-model needs --report-to wandb"):
        train_settings({"wandb_log_model": True})
    with pytest.raises(ConfigError, match="--wandb-config 'nokey' must be KEY=VALUE"):
        train_settings({"wandb_config": ("nokey",)})


def test_yaml_settings_of_another_command_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kl_coef: 0.1\n")
    assert resolve(PPOConfig, {}, str(path)).kl_coef == 0.1
    with pytest.raises(ConfigError, match="unknown setting 'kl_coef'"):
        resolve(TrainConfig, {}, str(path))


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
def test_every_command_takes_a_config_file(cls: type, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 11\n" if "seed" in settings_of(cls) else "overwrite: true\n")
    flags = {"output": str(tmp_path / "o.jsonl")} if "output" in settings_of(cls) else {}
    cfg = resolve(cls, flags, str(path))
    assert cfg.seed == 11 if "seed" in settings_of(cls) else cfg.overwrite


# ----------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
def test_every_field_is_a_declared_setting_of_its_annotated_type(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        setting = setting_of(f)
        tp = hints[f.name]
        optional = type(None) in typing.get_args(tp)
        base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
        base = list if typing.get_origin(base) is list else base
        assert base is setting.type, f"{cls.__name__}.{f.name}"
        assert optional == (setting.default is None) or setting.type is list, f.name
        assert setting.help.strip(), f"{cls.__name__}.{f.name} has no help"


def test_a_shared_setting_is_declared_once() -> None:
    """The same name means the same setting (help may differ by command; type and rule not).
    One name means two things, each in one command only, as in the papers: γ is SimPO's
    margin in `train` and GAE's discount in `ppo`."""
    seen: dict[str, tuple] = {}
    for cls in COMMANDS:
        for name, setting in settings_of(cls).items():
            if name == "gamma":
                continue
            key = (setting.type, setting.choices, setting.rule, setting.resumable)
            assert seen.setdefault(name, key) == key, f"{name} differs in {cls.__name__}"


def test_uses_reference() -> None:
    assert uses_reference(train_settings({"loss": "dpo"}))
    assert not uses_reference(train_settings({"loss": "dpo", "reference_free": True}))
    assert not uses_reference(train_settings({"loss": "orpo"}))
