"""Loading the policy: dropout off by default (as TRL), and what a run's config says of a model."""

from __future__ import annotations

import pytest
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


def test_an_unread_model_has_the_shape_buffers_and_ties_of_the_real_one_without_its_weights(
    tmp_path, tiny_model_dir, tiny_tokenizer
) -> None:
    """What a process that receives its weights builds (FSDP, cpu_ram_efficient_loading): the
    same module tree, parameter names, shapes, dtypes and ties, the real rotary frequencies and
    generation settings, and no read of the weights (here there are none to read)."""
    import shutil

    from transformers import AutoModelForCausalLM, GenerationConfig

    from direct_align.models.loading import load_causal_lm

    for tied in (True, False):
        real = dropout_llama(tiny_tokenizer)
        real.config.tie_word_embeddings = tied
        real = LlamaForCausalLM(real.config)
        real.generation_config = GenerationConfig(eos_token_id=[2, 7], max_new_tokens=11)
        where = tmp_path / f"tied-{tied}"
        real.save_pretrained(where)
        shutil.copy(tiny_model_dir / "tokenizer.json", where)
        (where / "model.safetensors").unlink()  # nothing to read
        unread = load_causal_lm(str(where), unread=True)
        assert type(unread) is type(real) and not unread.training
        mine, theirs = dict(unread.named_parameters()), dict(real.named_parameters())
        assert mine.keys() == theirs.keys()
        assert all(mine[k].shape == theirs[k].shape and mine[k].dtype == torch.float32
                   and mine[k].device.type == "cpu" for k in mine)  # fmt: skip
        # distinct tensors (accelerate maps the optimizer's parameters by data pointer) ...
        pointers = {p.data_ptr() for p in unread.parameters()}
        assert len(pointers) == len(list(unread.parameters()))
        # ... except where the model ties them
        same = unread.lm_head.weight is unread.model.embed_tokens.weight
        assert same == tied
        for name, buffer in real.named_buffers():
            torch.testing.assert_close(dict(unread.named_buffers())[name], buffer)
        assert unread.generation_config.eos_token_id == [2, 7]
        assert unread.generation_config.max_new_tokens == 11
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(where)  # the ordinary load would need the weights


def test_final_is_written_in_shards_with_an_index_that_from_pretrained_reads(
    tmp_path, tiny_tokenizer
) -> None:
    from transformers import AutoModelForCausalLM

    from direct_align.models.lora import save_final

    model = dropout_llama(tiny_tokenizer)
    size = sum(p.numel() * 4 for p in model.parameters())
    save_final(model, tiny_tokenizer, tmp_path / "final", max_shard_size=size // 3)
    shards = sorted(p.name for p in (tmp_path / "final").glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "final" / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
