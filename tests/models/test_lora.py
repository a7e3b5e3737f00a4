"""LoRA through peft: the reference is the base (adapters off), only adapters train, the saved
adapter and merged model reproduce the policy, online DPO holds one model, bad values are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from commands import JUDGES_PY, ONLINE, assert_ok, fail, run_cli, train_args
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import train_settings
from direct_align.builtin.task import sample_prompts
from direct_align.data.packing import build_batch
from direct_align.errors import ConfigError
from direct_align.models.attention import ATTN_NAME
from direct_align.models.loading import load_causal_lm, load_policy, preference_model
from direct_align.models.lora import AdaptersOff, adapters_disabled, apply_lora, save_final
from direct_align.preference.reference import ReferenceLogps, model_fingerprint, score_pairs
from direct_align.preference.settings import TrainConfig
from fastpath import EOS_SHAPES, eos_pairs, plain
from prefdata import rows, write_jsonl

CPU = torch.device("cpu")
LORA_RUN = ["--lora-r", "8", "--learning-rate", "1e-2", "--beta", "0.5", "--batch-size", "16",
            "--epochs", "2", "--max-length", "64", "--eval-fraction", "0.15", "--eval-every", "0",
            "--save-every", "0", "--report-to", "none"]  # fmt: skip


def lora_cfg(model_dir: Path, **values) -> TrainConfig:
    return train_settings({"model": str(model_dir), "dataset": "unused.jsonl", "output_dir": "unused",
                    "lora_r": 4, **values})  # fmt: skip


def make_policy(model_dir: Path, **values):
    """A LoRA policy whose adapters are non-zero (as after training): B ~ N(0, 0.05²)."""
    torch.manual_seed(0)
    policy = load_policy(str(model_dir), lora_cfg(model_dir, **values), bf16=False, device=CPU)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy


def score(model, layout: str = "shared") -> ReferenceLogps:
    return score_pairs(model, eos_pairs(EOS_SHAPES, seed=1), batch_size=3, layout=layout,
                       pad_token_id=0, device=CPU)  # fmt: skip


def assert_same(a: ReferenceLogps, b: ReferenceLogps, atol: float = 1e-4) -> None:
    """Equal sums (log-prob sums of up to 30 tokens: fp32 rounding differs between layouts)."""
    torch.testing.assert_close(a.chosen, b.chosen, rtol=0, atol=atol)
    torch.testing.assert_close(a.rejected, b.rejected, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- in process


def test_reference_with_adapters_off_is_the_base_model(tiny_model_dir: Path) -> None:
    policy = make_policy(tiny_model_dir)
    base_lm = load_causal_lm(str(tiny_model_dir))
    base = score(preference_model(base_lm, lora_cfg(tiny_model_dir), bf16=False, device=CPU))
    policy.train()
    assert_same(score(AdaptersOff(policy)), base, atol=0)
    assert policy.training  # AdaptersOff computes in eval mode and restores the policy's mode
    with adapters_disabled(policy):
        assert_same(score(policy), base, atol=0)
    adapted = score(policy)  # adapters back on: the policy is not the base
    assert (adapted.chosen - base.chosen).abs().max() > 1e-3
    # the attention and the cache key go through the peft wrapper to the base model
    assert policy.model.config._attn_implementation == ATTN_NAME
    assert model_fingerprint(policy.model) == model_fingerprint(base_lm)


def test_saved_adapter_and_merged_model_give_the_policys_logps(tiny_model_dir: Path,
                                                              tiny_tokenizer, tmp_path: Path) -> None:  # fmt: skip
    policy = make_policy(tiny_model_dir)
    expected = score(policy)
    save_final(policy.model, tiny_tokenizer, tmp_path / "adapter", "adapter")
    save_final(policy.model, tiny_tokenizer, tmp_path / "merged", "merged")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapter only, no base weights
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = [PeftModel.from_pretrained(base, tmp_path / "adapter"),
              AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter"),
              AutoModelForCausalLM.from_pretrained(tmp_path / "merged")]  # fmt: skip
    assert not isinstance(loaded[2], PeftModel)
    for model in loaded:
        assert_same(score(plain(model.eval()), layout="padded"), expected)
    # merging left the policy as it was
    assert_same(score(policy), expected, atol=0)
    with pytest.raises(ConfigError, match="is a LoRA adapter, not a whole model"):
        load_causal_lm(str(tmp_path / "adapter"))  # as --model: refused with a way out


def test_gradients_reach_only_the_adapters_with_and_without_checkpointing(tiny_model_dir: Path) -> None:
    batch_pairs = eos_pairs(EOS_SHAPES, seed=2)
    grads = []
    for checkpointing in (False, True):
        policy = make_policy(tiny_model_dir, gradient_checkpointing=checkpointing).train()
        out = policy(build_batch(batch_pairs, list(range(len(EOS_SHAPES))), "shared", 0))
        (out.chosen - out.rejected).sum().backward()
        named = dict(policy.named_parameters())
        assert all(p.grad is None for n, p in named.items() if "lora_" not in n)
        grads.append({n: p.grad for n, p in named.items() if "lora_" in n})
        assert all(g is not None and g.abs().sum() > 0 for g in grads[-1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("lora") / "prefs.jsonl", rows("standard", 400, seed=1))


@pytest.fixture(scope="module")
def lora_run(prefs: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA DPO run stopped after 20 of its 44 steps, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("lora-run")
    args = ["train", "--loss", "dpo", "--model", str(tiny_model_dir), "--dataset", str(prefs),
            "--output-dir", str(tmp / "run"), *LORA_RUN]  # fmt: skip
    first = run_cli([*args, "--max-steps-per-run", "20"], tmp / "cache")
    assert_ok(first)
    assert "LoRA r=8 alpha=16 on all-linear" in first.stderr
    assert_ok(run_cli([*args, "--resume"], tmp / "cache"))
    return tmp / "run"


@pytest.mark.slow  # a subprocess run
def test_lora_dpo_raises_accuracy_and_trains_only_the_adapters(lora_run: Path,
                                                               tiny_model_dir: Path) -> None:  # fmt: skip
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["steps"] == 44 and summary["models_in_memory"] == 1
    # the reference is the base and B starts at zero: the policy starts as its reference
    assert summary["initial"]["eval/rewards/accuracies"] == 0.0
    assert summary["final"]["eval/rewards/accuracies"] >= 0.8
    assert summary["final"]["eval/loss"] < summary["initial"]["eval/loss"] - 0.2
    # the checkpoint at step 20 (from which the run resumed) holds the adapters alone: the
    # frozen base comes back from --model
    state = load_file(lora_run / "checkpoints" / "step-000020" / "model.safetensors")
    n_adapters = sum(1 for _ in make_policy(tiny_model_dir).named_parameters() if "lora_" in _[0])
    assert len(state) == n_adapters and all("lora_" in k for k in state)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    # final/ is the adapter plus the tokenizer, and loads with peft on the base
    final = lora_run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "tokenizer_config.json").is_file()
    model = AutoPeftModelForCausalLM.from_pretrained(final)
    assert model.peft_config["default"].r == 8


@pytest.mark.slow  # a subprocess run
def test_online_lora_holds_one_model_and_saves_merged(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "judges.py").write_text(JUDGES_PY)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": p} for p in sample_prompts(16, seed=5)])  # fmt: skip
    out = tmp_path / "run"
    result = run_cli(["train", "--loss", "dpo", *ONLINE, "--model", str(tiny_model_dir),
                      "--dataset", str(prompts), "--reward", f"{tmp_path / 'judges.py'}:letter_e",
                      "--rounds", "2", "--prompts-per-round", "8", "--samples-per-prompt", "3",
                      "--lora-r", "4",
                      "--lora-save", "merged", "--output-dir", str(out)], tmp_path / "cache")  # fmt: skip
    assert_ok(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models_in_memory"] == 1 and summary["rounds"] == 2 and summary["steps"] >= 2
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], initial.state_dict()[q])  # the adapter, merged
    assert torch.equal(merged.model.embed_tokens.weight, initial.model.embed_tokens.weight)


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(("flags", "message"), [
    ({"lora_r": 0}, "--lora-r must be at least 1, got 0"),
    ({"lora_r": "four"}, "--lora-r must be an integer (finite), got 'four'"),
    ({"lora_alpha": 16}, "--lora-alpha needs --lora-r (LoRA is off without it)"),
    ({"lora_save": "merged"}, "--lora-save needs --lora-r"),
    ({"lora_r": 4, "lora_alpha": -1}, "--lora-alpha must be > 0"),
    ({"lora_r": 4, "lora_dropout": 1.0}, "--lora-dropout must be in [0, 1)"),
    ({"lora_r": 4, "lora_targets": "q_proj,,v_proj"}, "--lora-targets must be module names"),
    ({"lora_r": 4, "lora_save": "full"}, "--lora-save must be one of adapter, merged; got 'full'"),
])  # fmt: skip
def test_bad_lora_settings_are_refused(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train_settings({**flags, "output_dir": "unused"})
    assert str(info.value).startswith(message)


def test_lora_alpha_defaults_to_twice_the_rank() -> None:
    assert train_settings({"lora_r": 8, "output_dir": "x"}).lora_alpha == 16
    assert train_settings({"lora_r": 8, "lora_alpha": 4, "output_dir": "x"}).lora_alpha == 4


def test_missing_peft_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: import fails
    with pytest.raises(ConfigError, match=r"^--lora-r needs peft: pip install 'direct-align\[lora\]'$"):
        train_settings({"lora_r": 4, "output_dir": "x"})


def test_targets_that_match_nothing_or_the_chunked_head_are_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="^--lora-targets: .*nope"):
        apply_lora(load_causal_lm(str(tiny_model_dir)), lora_cfg(tiny_model_dir, lora_targets="nope"))
    with pytest.raises(ConfigError, match="LM head cannot take an adapter with the chunked head"):
        apply_lora(load_causal_lm(str(tiny_model_dir)), lora_cfg(tiny_model_dir, lora_targets="lm_head"))


def test_cli_reports_a_bad_target_in_one_line(capsys, tiny_model_dir: Path, prefs: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    message = fail(capsys, train_args(tiny_model_dir, prefs, tmp_path / "out", "--lora-r", "4",
                                      "--lora-targets", "q_proj,nope"))  # fmt: skip
    assert message.startswith("--lora-targets: ")
    assert not (tmp_path / "out").exists()
