"""The memory options on a CUDA device (skipped without one): torchao's compiled bf16 and 8-bit
AdamW, the step in backward and QLoRA with bitsandbytes' CUDA kernels, and the bytes per
parameter they hold, measured with ``torch.cuda.max_memory_allocated`` on a model large enough
that its weights, not the runtime, fill the device. Their CPU counterparts are
tests/engine/test_optim.py, tests/models/test_qlora.py and test_memory_resume.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]  # fmt: skip
pytest.importorskip("torchao")


@pytest.mark.parametrize(("settings", "most_bytes"), [
    ({"weights": "fp32", "optimizer": "adamw"}, 16.5),
    ({"weights": "bf16", "optimizer": "adamw"}, 8.5),
    ({"weights": "bf16", "optimizer": "adamw-8bit"}, 6.5),
    ({"weights": "bf16", "optimizer": "adamw-8bit", "step_in_backward": True}, 4.5),
])  # fmt: skip
def test_bytes_per_parameter_on_cuda(settings: dict, most_bytes: float) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from direct_align.engine.optim import trained_dtype
    from direct_align.engine.step import make_optimizer

    cfg = SimpleNamespace(**{"step_in_backward": False, "learning_rate": 1e-5, "weight_decay": 0.0,
                             "warmup_ratio": 0.0, "lr_scheduler": "constant", **settings})  # fmt: skip
    config = LlamaConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=4)  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        torch.set_default_dtype(trained_dtype(cfg))
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = make_optimizer(model, cfg, total=3)
    tokens = torch.randint(0, config.vocab_size, (1, 32), device="cuda")
    for _ in range(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    held = (torch.cuda.max_memory_allocated() - before) / params
    print(f"{settings}: {held:.2f} bytes a parameter")
    assert held <= most_bytes
    del model, optimizer


def test_qlora_on_cuda_trains_the_adapters(tmp_path, tiny_tokenizer) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from direct_align.models.loading import load_4bit

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = load_4bit(str(tmp_path), device=torch.device("cuda"), compute_dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 300, (2, 16), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
