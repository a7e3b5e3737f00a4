"""Load tokenizers and causal LMs from a local directory or the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from direct_align.errors import ConfigError


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_path(name: str, option: str = "--model") -> None:
    """Fail early for a model path that does not exist (hub names are checked when loading)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
            raise ConfigError(f"{option}: '{name}' is a LoRA adapter, not a whole model; merge "
                              "it into its base first (or train with --lora-save merged)")  # fmt: skip
        if not (path / "config.json").is_file():
            raise ConfigError(f"{option}: '{name}' is not a Hugging Face model directory "
                              "(no config.json)")  # fmt: skip
        return
    if _looks_like_path(name):
        raise ConfigError(f"{option}: model path '{name}' does not exist")


def load_tokenizer(name: str, option: str = "--model") -> PreTrainedTokenizerBase:
    """The model's tokenizer; a missing pad token falls back to EOS (padding is masked anyway)."""
    check_model_path(name, option)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(name).expanduser()))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{option}: cannot load a tokenizer from '{name}': "
                          f"{str(e).splitlines()[0]}") from None  # fmt: skip
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str, *, dtype: torch.dtype = torch.float32, option: str = "--model"
) -> PreTrainedModel:
    """A causal LM in ``dtype``, on the CPU, with the library's default attention."""
    check_model_path(name, option)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(name).expanduser()), dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{option}: cannot load a causal LM from '{name}': "
                          f"{str(e).splitlines()[0]}") from None  # fmt: skip
    return model
