"""Loading the policy: dropout off by default (as TRL), and what a run's config says of a model."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from direct_align.models.loading import describe_model, disable_dropout


def dropout_llama(tokenizer) -> LlamaForCausalLM:  # noqa: ANN001
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attention_dropout=0.5, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).train()


def test_disable_dropout_makes_training_mode_deterministic(tiny_tokenizer) -> None:
    ids = torch.tensor([[1, 5, 9, 14, 30, 7, 2]])
    noisy = dropout_llama(tiny_tokenizer)
    a, b = noisy(input_ids=ids).logits, noisy(input_ids=ids).logits
    assert not torch.allclose(a, b)  # attention dropout 0.5 is live in training mode
    disable_dropout(noisy)
    a, b = noisy(input_ids=ids).logits, noisy(input_ids=ids).logits
    assert torch.equal(a, b)
    assert noisy.config.attention_dropout == 0.0
    assert torch.allclose(a, noisy.eval()(input_ids=ids).logits, atol=1e-6)  # as in eval mode


def test_describe_model(tiny_tokenizer) -> None:
    model = dropout_llama(tiny_tokenizer)
    model.lm_head.requires_grad_(False)
    described = describe_model(model, "some/path")
    assert described["architecture"] == "LlamaForCausalLM" and described["path"] == "some/path"
    assert described["parameters"] == sum(p.numel() for p in model.parameters())
    assert described["trainable_parameters"] == described["parameters"] - model.lm_head.weight.numel()
