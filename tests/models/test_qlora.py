"""QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, on the CPU here), LoRA adapters on top."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from commands import run_here

from prefdata import rows, write_jsonl

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A tiny Llama whose linear layers read at least 64 inputs (bitsandbytes quantises the
    weights in blocks of 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tiny_tokenizer.bos_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id,
                         pad_token_id=tiny_tokenizer.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    path = tmp_path_factory.mktemp("qlora-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_adapter_gradients_through_the_4bit_base_match_the_dequantized_weights(model_dir: Path) -> None:
    import bitsandbytes.functional as F
    from peft import LoraConfig, get_peft_model

    from direct_align.models.loading import load_4bit, load_causal_lm

    quantised = load_4bit(str(model_dir), device=torch.device("cpu"), compute_dtype=torch.float32)
    linear = [(n, m) for n, m in quantised.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear and all(m.weight.dtype == torch.uint8 for _, m in linear)  # 4 bits packed in bytes
    full = load_causal_lm(str(model_dir))
    for name, module in linear:  # the same weights, dequantized, in an ordinary model
        full.get_submodule(name).weight.data.copy_(F.dequantize_4bit(module.weight.data, module.weight.quant_state))
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # B ≠ 0: gradients reach A
    grads = []
    for model in (quantised, full):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, config)
        ids = torch.randint(0, 300, (2, 10))
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(linear)  # A and B each
    # bitsandbytes' CPU kernels dequantize to bf16 (8 bits of mantissa): agreement to a few
    # percent of each gradient's largest entry, where a wrong gradient would be off by all of it
    for name, grad in grads[0].items():
        scale = grads[1][name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grad, grads[1][name], rtol=0, atol=0.03 * scale)


def test_qlora_dpo_trains_resumes_and_saves_the_adapter(model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "pairs.jsonl", rows("standard", 64, seed=3))
    args = ["train", "--model", str(model_dir), "--dataset", str(data), "--lora-r", "4",
            "--load-in-4bit", "--max-steps", "6", "--batch-size", "4", "--learning-rate", "1e-2",
            "--max-length", "48", "--eval-every", "0", "--save-every", "0", "--report-to", "none"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_here([*args, "--output-dir", str(straight)], tmp_path / "cache") == 0
    assert run_here([*args, "--output-dir", str(stopped), "--max-steps-per-run", "3"], tmp_path / "cache") == 0
    assert run_here([*args, "--output-dir", str(stopped), "--resume"], tmp_path / "cache") == 0
    a = load_file(str(straight / "final" / "adapter_model.safetensors"))
    b = load_file(str(stopped / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it trained
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["reference_cache"]  # the 4-bit base scored the pairs
