"""Exact attention for padding-free rows: each sequence attends only to itself.

A packed row holds many *segments*. A plain segment is one causal sequence. A shared-prompt
segment is ``[prompt, chosen, rejected]``: chosen tokens attend to the prompt and to earlier
chosen tokens, rejected tokens to the prompt and to earlier rejected tokens, never to chosen
ones (their position ids continue from the prompt, so RoPE sees two ordinary continuations).

On the CPU, an explicit ``[T, T]`` mask would make scaled-dot-product attention compute every
masked block of a long row; instead :func:`segment_attention` runs one SDPA call per sequence
(causal for ``prompt + chosen``, lower-right causal for rejected over ``prompt + rejected``), so
the attention FLOPs are exactly those of the sequences. On a GPU, flash-attention varlen kernels
do the same in one call (see the GPU issue); this function is the reference they must match.

The function is registered with transformers as the attention implementation
``"direct_align_segments"``. Without segment metadata (generation, padded batches) it defers to
transformers' own SDPA attention, so a model can keep this implementation for every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from direct_align.errors import ConfigError

ATTN_NAME = "direct_align_segments"
SEGMENTS_KWARG = "direct_align_segments"
# A 4-D mask is passed through by transformers untouched: this empty one tells the model that no
# mask is to be built, since the segments define the attention.
NO_MASK = torch.ones(1, 1, 0, 0, dtype=torch.bool)


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, start + length)`` of a row. ``branches`` is 0 for a plain sequence;
    for a shared-prompt pair it holds (prompt, chosen, rejected) lengths."""

    start: int
    length: int
    prompt: int = 0
    chosen: int = 0
    rejected: int = 0

    @property
    def shared(self) -> bool:
        return self.rejected > 0


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the segments of one row, or transformers' SDPA when none are given.

    query: [1, heads, T, d]; key, value: [1, kv_heads, T, d]. Returns ([1, T, heads, d], None).
    """
    segments: tuple[Segment, ...] | None = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        mask = None if attention_mask is NO_MASK else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                      scaling=scaling, **kwargs)  # fmt: skip
    _check_supported(kwargs, segments)
    if query.shape[0] != 1:
        raise ValueError("segment attention takes one packed row")
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    parts = []  # outputs of consecutive token ranges; cat, not slice assignment, keeps backward linear
    for seg in segments:
        a = seg.start
        b = a + (seg.prompt + seg.chosen if seg.shared else seg.length)
        parts.append(F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=p, is_causal=True,
            scale=scaling, enable_gqa=gqa))  # fmt: skip
        if seg.shared:
            c = b + seg.rejected  # rejected tokens [b, c) see the prompt [a, a + prompt) and [b, c)
            prompt = slice(a, a + seg.prompt)
            k = torch.cat([key[:, :, prompt], key[:, :, b:c]], dim=2)
            v = torch.cat([value[:, :, prompt], value[:, :, b:c]], dim=2)
            causal = torch.ones(seg.rejected, seg.prompt + seg.rejected, dtype=torch.bool,
                                device=query.device).tril(seg.prompt)  # fmt: skip
            parts.append(F.scaled_dot_product_attention(
                query[:, :, b:c], k, v, attn_mask=causal, dropout_p=p, scale=scaling,
                enable_gqa=gqa))  # fmt: skip
    out = torch.cat(parts, dim=2)
    if out.shape[2] != query.shape[2]:
        raise ValueError(f"segments cover {out.shape[2]} of the row's {query.shape[2]} tokens")
    return out.transpose(1, 2).contiguous(), None


def _check_supported(kwargs: dict[str, Any], segments: tuple[Segment, ...]) -> None:
    """Refuse attention features this function does not implement, rather than ignore them."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ConfigError("this model's attention (logit soft-capping or sinks) is not supported "
                          "by packed layouts; use --layout padded")  # fmt: skip
    window = kwargs.get("sliding_window")
    if window is not None and max(s.length for s in segments) > window:
        raise ConfigError(f"a sequence is longer than the model's sliding window ({window}); "
                          "use --layout padded")  # fmt: skip


AttentionInterface.register(ATTN_NAME, segment_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def use_segment_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` to segment attention (it behaves as SDPA for every other call)."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ConfigError(f"{type(model).__name__} does not support custom attention functions; "
                          "use --layout padded")  # fmt: skip
    model.set_attn_implementation(ATTN_NAME)
