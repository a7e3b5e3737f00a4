"""Two CPU processes (gloo) under FSDP (full shard, one unit per decoder layer, as
configs/accelerate/fsdp.yaml sets it) train what one plain process trains with the same global
batch, through a sharded checkpoint and --resume, and gather final/ whole."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from launch import launch, train, weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from direct_align.builtin.task import sample_prompts
from direct_align.engine.distributed import check_resumable, refuse_sharding
from direct_align.errors import ConfigError
from prefdata import rows, write_jsonl

# what `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports, in fp32
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
            "FSDP_SYNC_MODULE_STATES": "true"}  # fmt: skip


def test_fsdp_on_two_processes_trains_what_one_process_trains(tmp_path, tiny_model_dir,
                                                               monkeypatch) -> None:  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", rows("standard", 60, seed=4))
    # untied embeddings and LM head (as most large models): the head is an FSDP unit of its
    # own, with the final norm; the online test below covers tied ones
    untied = AutoModelForCausalLM.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
    untied.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "model")
    tiny_model_dir = tmp_path / "model"
    train(1, tmp_path / "one", tiny_model_dir, data, tmp_path / "cache1")
    # 2 of the 4 steps, a sharded checkpoint, then the rest after --resume: first launched as
    # users do, with the shipped config, then with torchrun and the variables it sets
    split = tmp_path / "fsdp"
    train(2, split, tiny_model_dir, data, tmp_path / "cache2", "--max-steps-per-run", "2",
          config="fsdp.yaml")  # fmt: skip
    checkpoint = split / "checkpoints" / "step-000002"
    assert (checkpoint / "pytorch_model_fsdp_0" / "__1_0.distcp").is_file()  # one part each
    for name, value in FSDP_ENV.items():
        monkeypatch.setenv(name, value)
    train(2, split, tiny_model_dir, data, tmp_path / "cache2", "--resume")

    one, two = weights(tmp_path / "one"), weights(split)
    assert one.keys() == two.keys() and "lm_head.weight" in one  # whole
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(one[k], initial[k]) for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)
    # the sharded policy scored the reference pairs: the same cache file, the same sums
    caches = [sorted((tmp_path / c / "reference").glob("*.safetensors")) for c in ("cache1", "cache2")]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and caches[0]
    for p, q in zip(*caches):
        for name, tensor in load_file(str(p)).items():
            torch.testing.assert_close(load_file(str(q))[name], tensor, atol=1e-5, rtol=1e-5)
    AutoModelForCausalLM.from_pretrained(split / "final")


def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(tmp_path) -> None:
    fsdp, deepspeed, plain = (SimpleNamespace(distributed_type=t) for t in (
        DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MULTI_CPU))  # fmt: skip
    check_resumable(tmp_path, plain)
    with pytest.raises(ConfigError, match="written under DDP or one process and this run is under FSDP"):
        check_resumable(tmp_path, fsdp)
    (tmp_path / "pytorch_model_fsdp_0").mkdir()
    check_resumable(tmp_path, fsdp)
    with pytest.raises(ConfigError, match="written under FSDP and this run is under DDP or one"):
        check_resumable(tmp_path, plain)
    (tmp_path / "pytorch_model_fsdp_0").rmdir()
    (tmp_path / "latest").write_text("pytorch_model")
    check_resumable(tmp_path, deepspeed)
    with pytest.raises(ConfigError, match="written under DeepSpeed and this run is under FSDP"):
        check_resumable(tmp_path, fsdp)


def test_commands_that_sample_with_the_policy_refuse_fsdp() -> None:
    with pytest.raises(ConfigError, match="direct-align ppo does not run under FSDP yet"):
        refuse_sharding("direct-align ppo", SimpleNamespace(distributed_type=DistributedType.FSDP))
    refuse_sharding("direct-align ppo", SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_online_lora_under_fsdp_learns_what_ddp_learns(tmp_path, tiny_model_dir) -> None:
    """Online DPO with LoRA: the sharded policy samples (every generate step in step across the
    processes), scores its fresh pairs with its adapters off, and checkpoints and evaluates at
    round ends, exactly as under DDP."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in sample_prompts(8, seed=3)])
    evals = write_jsonl(tmp_path / "eval.jsonl", rows("standard", 9, seed=5))
    (tmp_path / "judge.py").write_text("def e(prompts, responses):\n"
                                       "    return [float(r.count('e')) for r in responses]\n")  # fmt: skip
    args = ["train", "--online", "--loss", "dpo", "--model", str(tiny_model_dir), "--dataset",
            str(prompts), "--eval-dataset", str(evals), "--reward", f"{tmp_path / 'judge.py'}:e",
            "--rounds", "2", "--prompts-per-round", "8", "--samples-per-prompt", "2",
            "--batch-size", "8", "--grad-accum", "2", "--max-length", "48", "--max-new-tokens", "8",
            "--lora-r", "4", "--learning-rate", "1e-2", "--eval-every", "1", "--save-every", "1"]  # fmt: skip
    cache = {"DIRECT_ALIGN_CACHE": str(tmp_path / "cache")}
    launch(2, [*args, "--output-dir", str(tmp_path / "ddp")], cache)
    launch(2, [*args, "--output-dir", str(tmp_path / "fsdp")], cache, config="fsdp.yaml")
    ddp, fsdp = (load_file(str(tmp_path / run / "final" / "adapter_model.safetensors"))
                 for run in ("ddp", "fsdp"))  # fmt: skip
    assert ddp.keys() == fsdp.keys() and any(v.abs().sum() > 0 for k, v in ddp.items() if "lora_B" in k)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=1e-5)
    # a checkpoint and an evaluation at the end of round 1 (the last round's are left out)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000001" / "pytorch_model_fsdp_0").is_dir()
    assert (tmp_path / "ddp" / "checkpoints" / "step-000001" / "model.safetensors").is_file()
    for run in ("ddp", "fsdp"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        assert [r["step"] for r in records if "eval/loss" in r] == [0, 1, 2]
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("ddp", "fsdp")]
    assert summaries[1]["final"]["eval/loss"] == pytest.approx(summaries[0]["final"]["eval/loss"], abs=1e-6)
