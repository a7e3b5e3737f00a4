"""LoRA adapters through peft: wrap a causal LM, switch its adapters off, save what was learned.

With ``--lora-r`` the policy is the base model with low-rank adapters (Hu et al. 2021) on the
chosen linear layers: ``W x + (alpha / r) · B A x`` with ``A: [r, in]``, ``B: [out, r]``, ``B``
zero-initialised so that the adapted model starts as the base. Only ``A`` and ``B`` train, so
gradients and AdamW state exist for them alone.

The reference is the base model, which is the policy with its adapters disabled
(:func:`adapters_disabled`): offline and online losses alike get reference log-probs without a
second copy of the weights. :func:`base_state_dict` gives the base weights under their own names,
so the reference cache of a LoRA run is keyed by the same fingerprint as the base model's.

peft is optional (``pip install 'direct-align[lora]'``); it is imported only when LoRA is used.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from direct_align.errors import ConfigError, one_line

ALL_LINEAR = "all-linear"  # peft: every linear layer of the decoder, not the LM head


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a peft model (peft not imported yet: it cannot be one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def target_modules(targets: str | None) -> str | list[str]:
    """``--lora-targets`` as peft wants it: "all-linear" or a list of module names."""
    if targets is None or targets.strip() == ALL_LINEAR:
        return ALL_LINEAR
    return [t.strip() for t in targets.split(",") if t.strip()]


def apply_lora(model: PreTrainedModel, cfg: Any) -> Any:
    """``model`` with LoRA adapters of ``cfg.lora_r``/``lora_alpha``/``lora_dropout`` on
    ``cfg.lora_targets``, as a ``peft.PeftModel`` whose only trainable parameters are the adapters.

    Raises ConfigError when peft is missing, a target names no module, or the LM head is a target
    while the chunked head (which reads the head's weight directly) is on.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--lora-r needs peft: pip install 'direct-align[lora]'") from None
    targets = target_modules(cfg.lora_targets)
    if isinstance(targets, list):  # peft refuses only targets that all match nothing
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, nn.Linear)})  # fmt: skip
            raise ConfigError(f"--lora-targets: no module '{', '.join(missing)}' in "
                              f"{type(model).__name__} (its linear layers: {', '.join(linear)})")  # fmt: skip
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"--lora-targets: {one_line(e)}") from None
    head = peft_model.get_output_embeddings()
    if cfg.chunked_logprobs and hasattr(head, "base_layer"):
        raise ConfigError("--lora-targets: the LM head cannot take an adapter with the chunked "
                          "head; leave it out or use --no-chunked-logprobs")  # fmt: skip
    return peft_model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model``'s adapters off (the base model); a no-op for other models.

    ``model``: a peft model, or a module holding one as ``.model`` (a PreferenceModel).
    """
    inner = getattr(model, "model", model)
    if not is_peft(inner):
        yield
        return
    with inner.disable_adapter():
        yield


class AdaptersOff:
    """The policy with its adapters disabled, used where a reference :class:`PreferenceModel`
    would be (``TokenBatch → SequenceLogps``): the base model, sharing the policy's weights.

    It always computes in eval mode (no dropout) and leaves the policy's mode as it found it;
    ``train``/``eval`` are no-ops, so callers that toggle a reference's mode cannot change the
    policy's.
    """

    training = False

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy

    @property
    def model(self) -> Any:
        """The peft model (what reference fingerprints hash: its base weights)."""
        return self.policy.model

    def train(self, mode: bool = True) -> AdaptersOff:
        return self

    def eval(self) -> AdaptersOff:
        return self

    def __call__(self, batch: Any) -> Any:
        was_training = self.policy.training
        self.policy.eval()
        try:
            with adapters_disabled(self.policy):
                return self.policy(batch)
        finally:
            self.policy.train(was_training)


def base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's weights under the names it has without adapters (for a peft model), or
    ``model.state_dict()`` (for any other)."""
    if not is_peft(model):
        return model.state_dict()
    return {k.replace(".base_layer.", "."): v
            for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}  # fmt: skip


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base weights with each adapter's ``(alpha / r) · B A`` added, under the base names;
    ``model`` is left as it is (nothing merged in place)."""
    state = base_state_dict(model)
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            for adapter in module.active_adapters:
                key = f"{name}.weight"
                state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    return state


# final/ in safetensors files of at most this size, with an index when there are several (the
# Hub's convention; a 7B policy in fp32 is 6 files), so no file is too large to upload or mmap
FINAL_SHARD_SIZE = "5GB"


def save_final(model: Any, tokenizer: Any, path: Path, how: str = "adapter",
               state_dict: dict[str, torch.Tensor] | None = None,
               max_shard_size: int | str = FINAL_SHARD_SIZE) -> None:  # fmt: skip
    """Write ``model`` and ``tokenizer`` to the directory ``path``.

    A peft model is saved as its adapter (``adapter_config.json``, ``adapter_model.safetensors``;
    load with ``peft.AutoPeftModelForCausalLM`` or ``PeftModel.from_pretrained(base, path)``) or,
    with ``how="merged"``, as a full model with the adapters merged into the weights (load with
    ``AutoModelForCausalLM``). Any other model is saved whole, in files of ``max_shard_size``
    (``model.safetensors``, or ``model-0000K-of-0000N.safetensors`` and
    ``model.safetensors.index.json``). ``state_dict``: ``model``'s weights gathered whole, where
    its own are sharded (FSDP).
    """
    if not is_peft(model):
        model.save_pretrained(path, state_dict=state_dict, max_shard_size=max_shard_size)
    elif how == "merged":
        if state_dict is not None:  # run_train refuses this before training
            raise ConfigError("--lora-save merged is not supported under FSDP")
        model.get_base_model().save_pretrained(path, state_dict=merged_state_dict(model),
                                               max_shard_size=max_shard_size)  # fmt: skip
    else:
        model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)


def trainable_summary(model: nn.Module) -> str:
    """'N of M parameters train (p%)', for the log."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trained:,} of {total:,} parameters train ({100 * trained / max(total, 1):.2f}%)"
