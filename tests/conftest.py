"""Shared fixtures: a tiny tokenizer and a tiny Llama model directory, built locally."""

from __future__ import annotations

import os

# Stay offline, before huggingface_hub and datasets read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from direct_align.builtin.task import sample_corpus  # noqa: E402
from direct_align.builtin.tokenizer import build_tokenizer  # noqa: E402
from direct_align.config import resolve  # noqa: E402
from direct_align.preference.settings import TrainConfig  # noqa: E402


def train_settings(flags: dict, config_file: str | None = None) -> TrainConfig:
    """`direct-align train`'s settings from flag values (as the CLI passes them) and a YAML."""
    return resolve(TrainConfig, flags, config_file)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ runs whole commands: slow (``-m "not slow"`` skips it)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 384) with BOS/EOS/PAD and a ChatML chat template."""
    return build_tokenizer(sample_corpus(2000, seed=123), vocab_size=384)


def make_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama of hidden size 32 (about 30k parameters)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def eos_prone_model(tokenizer: PreTrainedTokenizerFast, seed: int, eos_bias: float = 4.0):
    """A tiny model whose output layer favours EOS (p ~ 0.1 a step), so samples end early."""
    model = make_tiny_model(tokenizer, seed=seed)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head = head
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A local Hugging Face model directory (model + tokenizer) loadable by from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """`direct-align train --loss dpo` with nothing else, in an empty cache: (cache, working
    directory, the finished process). The cache then holds the built task for later tests."""
    tmp = tmp_path_factory.mktemp("builtin")
    env = {**os.environ, "DIRECT_ALIGN_CACHE": str(tmp / "cache")}
    result = subprocess.run([sys.executable, "-m", "direct_align", "train", "--loss", "dpo"],
                            cwd=tmp, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    return tmp / "cache", tmp, result
