"""Load tokenizers and causal LMs from a local directory or the Hugging Face Hub, and the policy
of preference training (with LoRA, attention backend and log-prob head as configured)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from direct_align.engine.optim import trained_dtype
from direct_align.errors import ConfigError, one_line
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import ALL_LINEAR, apply_lora, trainable_summary
from direct_align.models.varlen import choose_attention, use_varlen_attention

log = logging.getLogger(__name__)


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
                          f"{one_line(e)}") from None  # fmt: skip
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, *, dtype: torch.dtype = torch.float32, option: str = "--model",
                   unread: bool = False) -> PreTrainedModel:  # fmt: skip
    """A causal LM in ``dtype``, on the CPU, with the library's default attention.

    ``unread``: build it from its config with room for its weights but without reading them
    (:func:`unread_model`), for a process that will receive them from another."""
    check_model_path(name, option)
    path = str(Path(name).expanduser())
    try:
        if unread:
            return unread_model(path, dtype)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{option}: cannot load a causal LM from '{name}': "
                          f"{one_line(e)}") from None  # fmt: skip


def unread_model(path: str, dtype: torch.dtype, auto_class: Any = AutoModelForCausalLM,
                 **config: Any) -> PreTrainedModel:  # fmt: skip
    """The model at ``path`` as ``auto_class`` (with ``config`` overrides, e.g. ``num_labels``)
    built from its config, its parameters allocated (uninitialised,
    so the operating system has not yet backed them with memory) but not read from disk; the
    buffers it computes itself (e.g. rotary frequencies) and its generation settings are real.

    Under FSDP with ``cpu_ram_efficient_loading`` the main process alone reads the checkpoint
    and accelerate broadcasts each tensor into every process's shard, so the other processes
    never hold the whole model. Their parameters must still be distinct real tensors (accelerate
    maps the optimizer's parameters to their shards by data pointer), which ``torch.empty``
    gives without touching the pages."""
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(AutoConfig.from_pretrained(path, **config), dtype=dtype)
    made: dict[int, nn.Parameter] = {}  # tied parameters (embeddings and LM head) stay one
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                   requires_grad=param.requires_grad)  # fmt: skip
                module._parameters[name] = made[id(param)]
    model.tie_weights()  # accelerate's empty init registers a new tensor where one was tied
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def load_4bit(name: str, *, device: torch.device, compute_dtype: torch.dtype,
              option: str = "--model") -> PreTrainedModel:  # fmt: skip
    """The causal LM at ``name`` with its linear layers in 4-bit NF4 with double quantisation
    (QLoRA, Dettmers et al. 2023: bitsandbytes through transformers' ``BitsAndBytesConfig``),
    on ``device``, computing in ``compute_dtype``; the embeddings, norms and LM head stay in that
    dtype."""
    check_model_path(name, option)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)  # fmt: skip
    place = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(name).expanduser()), dtype=compute_dtype,
                                                     quantization_config=quantization, device_map=place)  # fmt: skip
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"{option}: cannot load '{name}' in 4 bits: {one_line(e)}") from None
    # bitsandbytes' CPU matrix-vector kernel has no autograd registration, and torch warns on
    # every backward; the adapters' gradients through it match those of the dequantized weights
    # (tests/models/test_qlora.py)
    warnings.filterwarnings("ignore", message="bitsandbytes::gemv_4bit: an autograd kernel")
    # on a CPU with AVX512-BF16, bitsandbytes repacks a layer's weights for a faster kernel in
    # the first no-grad forward and unpacks them whenever the state dict is read (a checkpoint),
    # and the two compute differently: the weights' numerics would depend on when a run
    # evaluated and saved, and a resumed run would not follow an uninterrupted one
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    # frozen, and everything that is not quantised left in the compute dtype (peft's
    # prepare_model_for_kbit_training would hold the embedding and LM head in fp32: 4 bytes a
    # value, more than the whole quantised rest of a small model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def preference_model(model: PreTrainedModel, cfg: Any, *, bf16: bool,
                     device: torch.device | str | None = None) -> PreferenceModel:  # fmt: skip
    """Wrap a causal LM for the settings' layout, attention and log-prob computation (``cfg``:
    ``layout``, ``attn``, ``chunked_logprobs``).

    ``device``: where the model will run (default: where its parameters are now); ``--attn
    auto`` picks the best segment attention kernel available there (``bf16``: for bf16 compute).
    """
    if cfg.layout == "padded" or cfg.attn in ("sdpa", "eager"):
        if cfg.attn in ("sdpa", "eager"):
            model.set_attn_implementation(cfg.attn)
        log.info("attention: %s with masks", model.config._attn_implementation)
        return PreferenceModel(model, chunked=cfg.chunked_logprobs, attention="mask")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    name, why = choose_attention(cfg.attn, device, half=bf16)
    use_varlen_attention(model, name)
    log.info("attention: %s (%s)", name, why)
    # every segment-based kernel reads the segments that PreferenceModel passes in "segments" mode
    return PreferenceModel(model, chunked=cfg.chunked_logprobs, attention="segments")


def load_policy(model_path: str, cfg: Any, *, bf16: bool, device: torch.device,
                unread: bool = False) -> PreferenceModel:  # fmt: skip
    """The policy to train: the model at ``model_path``, with LoRA adapters when ``cfg.lora_r``
    is set, its dropout off (``cfg.disable_dropout``), wrapped by :func:`preference_model`, with
    gradient checkpointing when asked. ``unread``: its weights come from the main process when
    the engine shards it (see :func:`unread_model`). It loads in fp32 whatever the compute
    precision (the master weights that AdamW updates), or in bf16 with ``--weights bf16``."""
    if getattr(cfg, "load_in_4bit", False):
        model = load_4bit(model_path, device=device, compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    else:
        model = load_causal_lm(model_path, dtype=trained_dtype(cfg), unread=unread)
    if cfg.lora_r is not None:
        model = apply_lora(model, cfg)
        log.info("LoRA r=%d alpha=%g on %s: %s", cfg.lora_r, cfg.lora_alpha,
                 cfg.lora_targets or ALL_LINEAR, trainable_summary(model))  # fmt: skip
    if cfg.disable_dropout:
        disable_dropout(model)
    policy = preference_model(model, cfg, bf16=bf16, device=device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.lora_r is not None:  # frozen embeddings: recomputed blocks need an input that
            model.enable_input_require_grads()  # requires grad to pass gradients to adapters
    return policy


def describe_model(model: Any, path: str) -> dict[str, Any]:
    """What identifies a model in a run's config: where it came from, its architecture, its
    size in parameters (all, and those that train) and their dtype."""
    inner = model.model if isinstance(model, PreferenceModel) else model
    params = list(inner.parameters())
    architectures = getattr(inner.config, "architectures", None) or [type(inner).__name__]
    return {"path": path, "architecture": architectures[0],
            "model_type": getattr(inner.config, "model_type", None),
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "dtype": str(params[0].dtype).removeprefix("torch.") if params else None}  # fmt: skip


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of ``model`` off, as TRL does by default: ``nn.Dropout`` modules, the
    dropout rates attention layers keep as attributes, and the config's rates."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name, value in (vars(config).items() if config is not None else ()):
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            setattr(config, name, 0.0)
