"""Segment attention in at most two variable-length kernel calls per row (GPU backends).

:func:`~direct_align.models.attention.segment_attention` runs one SDPA call per sequence: exact,
but on a GPU hundreds of small launches per layer. Varlen kernels (flash-attn's
``flash_attn_varlen_func``, PyTorch's ``varlen_attn``) take many sequences at once, laid end to
end with ``cu_seqlens`` offsets, and compute only the blocks inside each sequence. A
:class:`VarlenPlan` maps a row's segments onto two such calls:

1. *causal*: every plain sequence and the ``prompt + chosen`` part of every shared-prompt pair,
   in row order, each causal. Without shared pairs this is the row itself, no gather needed.
2. *rejected* (rows with shared pairs only): the rejected tokens of each pair as queries, over the
   keys ``[prompt, rejected]`` of the same pair, causal aligned to the bottom right (rejected
   token ``i`` sees the whole prompt and rejected tokens ``0..i``).

The outputs of both calls are put back in row order by one index. The attention FLOPs are exactly
those of the sequences (no masked blocks are computed), and each shared prompt is computed once:
the rejected call only reads its keys and values.

The kernels share one signature (:class:`Kernel`). :func:`reference_kernel` is plain PyTorch on
any device: with it, the CPU tests prove that the plans are right; the GPU tests then compare the
real kernels with it. Each kernel is registered with transformers as its own attention function;
without segment metadata all of them defer to transformers' SDPA, as segment attention does.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from direct_align.errors import ConfigError
from direct_align.models.attention import (
    ATTN_NAME,
    SEGMENTS_KWARG,
    Segment,
    _check_supported,
    segment_attention,
    use_segment_attention,
)

# Registered names. Not "..._flash": transformers treats any name containing "flash" as one of
# its own flash-attention kernels and tries to load it.
FA_NAME = "direct_align_fa"
VARLEN_NAME = "direct_align_varlen"
REFERENCE_NAME = "direct_align_varlen_reference"
ATTN_NAMES = {"segments": ATTN_NAME, "flash": FA_NAME, "varlen": VARLEN_NAME}
GPU_OPTIONS = ("flash", "varlen")  # in the order --attn auto prefers them


class Kernel(Protocol):
    """q: [Tq, Hq, d]; k, v: [Tk, Hkv, d] (Hq a multiple of Hkv); cu_q, cu_k: [S+1] int32 offsets
    of the S sequences. Returns [Tq, Hq, d]. ``causal``: aligned to the bottom right, so query
    ``i`` of a sequence with ``lq`` queries and ``lk`` keys sees keys ``0..lk - lq + i``."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                 cu_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None,
                 causal: bool) -> torch.Tensor: ...  # fmt: skip


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class VarlenCall:
    """One kernel call. Indices are row positions (int64), offsets int32, all on the row's device."""

    q_index: torch.Tensor | None  # [Tq] the queries, in call order; None: the whole row
    k_index: torch.Tensor | None  # [Tk] the keys and values; None: the same tokens as the queries
    cu_q: torch.Tensor  # [S+1]
    cu_k: torch.Tensor  # [S+1]
    max_q: int
    max_k: int

    def run(self, kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            scale: float | None) -> torch.Tensor:  # fmt: skip
        """q: [T, Hq, d], k, v: [T, Hkv, d] of the whole row. Returns [Tq, Hq, d]."""
        keys = self.q_index if self.k_index is None else self.k_index
        if self.q_index is not None:
            q = q.index_select(0, self.q_index)
        if keys is not None:
            k, v = k.index_select(0, keys), v.index_select(0, keys)
        return kernel(q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, scale=scale,
                      causal=True)  # fmt: skip


@dataclass(frozen=True)
class VarlenPlan:
    """All the attention of one row of ``tokens`` tokens in one or two kernel calls."""

    tokens: int
    causal: VarlenCall  # plain sequences and prompt + chosen of shared pairs
    rejected: VarlenCall | None  # rejected tokens over [prompt, rejected]; None without pairs
    inverse: torch.Tensor | None  # [T] where each row token is in cat(causal out, rejected out)

    def attend(self, kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:  # fmt: skip
        """q: [T, Hq, d], k, v: [T, Hkv, d]. Returns [T, Hq, d] in row order."""
        out = self.causal.run(kernel, q, k, v, scale)
        if self.rejected is None:
            return out
        out = torch.cat([out, self.rejected.run(kernel, q, k, v, scale)])
        return out.index_select(0, self.inverse)


def _offsets(lengths: list[int], device: torch.device) -> torch.Tensor:
    """[S+1] int32 cumulative offsets of sequences of ``lengths``."""
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=16)  # one forward asks once per layer (and again when recomputing)
def varlen_plan(segments: tuple[Segment, ...], device: torch.device) -> VarlenPlan:
    """The plan of a row made of ``segments``, which must tile it in order from position 0."""
    end = 0
    for s in segments:
        if s.start != end:
            raise ValueError(f"segments must tile the row in order: one starts at {s.start}, "
                             f"not {end}")  # fmt: skip
        end += s.length
    if not any(s.shared for s in segments):
        cu = _offsets([s.length for s in segments], device)
        longest = max(s.length for s in segments)
        return VarlenPlan(end, VarlenCall(None, None, cu, cu, longest, longest), None, None)
    causal: list[int] = []  # row positions of the causal call's tokens
    causal_lengths: list[int] = []
    queries: list[int] = []  # of the rejected call
    keys: list[int] = []
    pairs: list[Segment] = []
    for s in segments:
        n = s.prompt + s.chosen if s.shared else s.length
        causal += range(s.start, s.start + n)
        causal_lengths.append(n)
        if s.shared:
            first = s.start + n  # of the rejected tokens
            queries += range(first, first + s.rejected)
            keys += [*range(s.start, s.start + s.prompt), *range(first, first + s.rejected)]
            pairs.append(s)
    long = {"dtype": torch.long, "device": device}
    cu = _offsets(causal_lengths, device)
    rejected = VarlenCall(
        torch.tensor(queries, **long), torch.tensor(keys, **long),
        _offsets([s.rejected for s in pairs], device),
        _offsets([s.prompt + s.rejected for s in pairs], device),
        max(s.rejected for s in pairs), max(s.prompt + s.rejected for s in pairs),
    )  # fmt: skip
    order = torch.tensor(causal + queries, dtype=torch.long)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return VarlenPlan(end, VarlenCall(torch.tensor(causal, **long), None, cu, cu,
                                      max(causal_lengths), max(causal_lengths)),
                      rejected, inverse.to(device))  # fmt: skip


# ----------------------------------------------------------------------------- kernels


def reference_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None,
                     causal: bool) -> torch.Tensor:  # fmt: skip
    """The :class:`Kernel` contract in plain PyTorch, one SDPA call per sequence (any device)."""
    gqa = q.shape[1] != k.shape[1]
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    parts = []
    for a, b, c, d in zip(starts_q, starts_q[1:], starts_k, starts_k[1:]):
        lq, lk = b - a, d - c
        mask = None  # square causal sequences take SDPA's own causal path
        if causal and lq != lk:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        out = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1),
            attn_mask=mask, is_causal=causal and lq == lk, scale=scale, enable_gqa=gqa)  # fmt: skip
        parts.append(out.transpose(0, 1))
    return torch.cat(parts)


def _need_half(q: torch.Tensor, option: str) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"--attn {option} needs bf16 or fp16 activations, got {q.dtype}; "
                          "use --precision bf16 or --attn segments")  # fmt: skip


def flash_attn_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                      cu_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None,
                      causal: bool) -> torch.Tensor:  # fmt: skip
    """flash-attn's varlen kernel (GQA native; bottom-right causal since flash-attn 2.1)."""
    _need_half(q, "flash")
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                  causal=causal)  # fmt: skip


def torch_varlen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                        cu_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None,
                        causal: bool) -> torch.Tensor:  # fmt: skip
    """PyTorch's ``varlen_attn`` (CUDA only). Its causal mask comes from the flash-attention
    kernel, bottom-right aligned when a sequence has fewer queries than keys: the rejected call
    relies on that, and the GPU tests check it against :func:`reference_kernel`."""
    _need_half(q, "varlen")
    attn = _torch_varlen_attn()
    assert attn is not None, "torch.nn.attention.varlen is unavailable"
    params = inspect.signature(attn).parameters
    kwargs: dict[str, Any] = {}
    if causal:  # torch 2.10 takes is_causal=; later releases a (left, right) window
        kwargs.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None:  # the kernel's own scale is 1/sqrt(d)
        q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


@functools.cache
def _torch_varlen_attn() -> Callable[..., torch.Tensor] | None:
    try:
        return importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError):
        return None


@functools.cache
def _flash_attn_version() -> tuple[int, int] | None:
    try:
        import flash_attn
    except ImportError:
        return None
    major, minor = (int("".join(filter(str.isdigit, p)) or 0) for p in
                    flash_attn.__version__.split(".")[:2])  # fmt: skip
    return major, minor


# ----------------------------------------------------------------------------- attention


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    kernel: Kernel = reference_kernel,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Segment attention through ``kernel``, or transformers' SDPA when no segments are given.

    query: [1, heads, T, d]; key, value: [1, kv_heads, T, d]. Returns ([1, T, heads, d], None).
    """
    segments: tuple[Segment, ...] | None = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        return segment_attention(module, query, key, value, attention_mask, dropout=dropout,
                                 scaling=scaling, **kwargs)  # fmt: skip
    _check_supported(kwargs, segments)
    if query.shape[0] != 1:
        raise ValueError("segment attention takes one packed row")
    if module.training and dropout > 0:
        raise ConfigError(f"the model's attention dropout ({dropout}) is not implemented by the "
                          "varlen attention kernels; use --attn segments")  # fmt: skip
    plan = varlen_plan(segments, query.device)
    if plan.tokens != query.shape[2]:
        raise ValueError(f"segments cover {plan.tokens} of the row's {query.shape[2]} tokens")
    # Under autocast, RoPE's fp32 cos/sin promote q and k back to fp32 while v stays half: the
    # kernels take one half dtype, the one autocast computes in.
    device_type = query.device.type
    dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    )
    q, k, v = (x[0].transpose(0, 1).to(dtype or x.dtype).contiguous() for x in (query, key, value))
    return plan.attend(kernel, q, k, v, scaling)[None], None


for _name, _kernel in ((FA_NAME, flash_attn_kernel), (VARLEN_NAME, torch_varlen_kernel),
                       (REFERENCE_NAME, reference_kernel)):  # fmt: skip
    AttentionInterface.register(_name, functools.partial(varlen_attention, kernel=_kernel))
    AttentionMaskInterface.register(_name, sdpa_mask)


# ----------------------------------------------------------------------------- choosing one


def unavailable(option: str, device: torch.device) -> str | None:
    """Why ``--attn option`` cannot run on ``device``, or None when it can."""
    if option not in GPU_OPTIONS:
        return None
    if device.type != "cuda":
        return f"needs a CUDA device (this one is {device.type})"
    if option == "flash":
        version = _flash_attn_version()
        if version is None:
            return "needs the flash-attn package (pip install flash-attn)"
        if version < (2, 1):  # older releases align the causal mask to the top left
            return f"needs flash-attn 2.1 or later, found {'.'.join(map(str, version))}"
    if option == "varlen" and _torch_varlen_attn() is None:
        return f"needs torch.nn.attention.varlen (PyTorch 2.10 or later, found {torch.__version__})"
    return None


def available_kernels(device: torch.device) -> list[str]:
    """The ``--attn`` options for packed rows that run on ``device``, best first."""
    return [o for o in GPU_OPTIONS if unavailable(o, device) is None] + ["segments"]


def choose_attention(option: str, device: torch.device, *, half: bool = True) -> tuple[str, str]:
    """(registered attention name, why) for ``--attn option`` (auto, segments, flash, varlen) on
    packed rows; ``half``: whether the model computes in bf16 (the GPU kernels need it)."""
    if option == "auto":
        if device.type != "cuda":
            return ATTN_NAME, "auto: no CUDA"
        if not half:
            return ATTN_NAME, "auto: fp32 compute"
        best = available_kernels(device)[0]
        return ATTN_NAMES[best], "auto" if best != "segments" else "auto: no varlen kernel"
    if option not in ATTN_NAMES:
        raise ValueError(f"not an attention for packed rows: {option!r}")
    if why := unavailable(option, device):
        raise ConfigError(f"--attn {option} {why}")
    if option in GPU_OPTIONS and not half:
        raise ConfigError(f"--attn {option} needs bf16 compute; use --precision bf16")
    return ATTN_NAMES[option], "requested"


def use_varlen_attention(model: PreTrainedModel, name: str) -> None:
    """Switch ``model`` to the segment-based attention registered as ``name``."""
    use_segment_attention(model)  # checks that the model takes custom attention functions
    if name != ATTN_NAME:
        model.set_attn_implementation(name)
