"""The GPU varlen kernels against the reference kernel, in bf16 on random packed and shared-prompt
rows: outputs and gradients, and above all the bottom-right alignment of the causal mask when a
sequence has fewer queries than keys (the rejected call of shared rows). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.data.packing import build_batch
from direct_align.models.attention import ATTN_NAME, Segment
from direct_align.models.loading import preference_model
from direct_align.models.varlen import (
    ATTN_NAMES,
    Kernel,
    available_kernels,
    choose_attention,
    flash_attn_kernel,
    reference_kernel,
    torch_varlen_kernel,
    unavailable,
    varlen_plan,
)
from direct_align.preference.settings import TrainConfig
from fastpath import INDEX, PAD, SHAPES, random_pairs, sharpen

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]  # fmt: skip

DEVICE = torch.device("cuda", 0)
KERNELS: dict[str, Kernel] = {"flash": flash_attn_kernel, "varlen": torch_varlen_kernel}
BF16_TOL = 2e-2  # of the largest magnitude: bf16 inputs, fp32 accumulation in the kernels


def kernel(option: str) -> Kernel:
    if option == "flash":
        pytest.importorskip("flash_attn")
    if why := unavailable(option, DEVICE):
        pytest.skip(f"--attn {option} {why}")
    return KERNELS[option]


def random_segments(layout: str, n: int, seed: int) -> tuple[Segment, ...]:
    """``n`` random sequences (packed) or pairs (shared) tiling one row."""
    g = torch.Generator().manual_seed(seed)
    segments, start = [], 0
    for _ in range(n):
        if layout == "packed":
            length = int(torch.randint(1, 200, (), generator=g))
            segments.append(Segment(start, length))
        else:
            p, c, r = (int(x) for x in torch.randint(1, 120, (3,), generator=g))
            length = p + c + r
            segments.append(Segment(start, length, p, c, r))
        start += length
    return tuple(segments)


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want.float()).abs().max()
    assert err <= BF16_TOL * want.float().abs().max(), f"max error {err:.3g}"


def attend_with_grads(kern: Kernel, segments: tuple[Segment, ...], qkv: list[torch.Tensor],
                      dtype: torch.dtype) -> list[torch.Tensor]:  # fmt: skip
    """[output, dq, dk, dv] of a whole row through the plan of ``segments`` in ``dtype``."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in qkv)
    out = varlen_plan(segments, DEVICE).attend(kern, q, k, v, scale=0.125)
    weights = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
    (out.float() * weights).sum().backward()
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("kv_heads", [2, 8])
@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("option", ["flash", "varlen"])
def test_kernel_matches_the_reference_in_bf16(option: str, layout: str, kv_heads: int) -> None:
    kern = kernel(option)
    segments = random_segments(layout, 7, seed=kv_heads)
    t = sum(s.length for s in segments)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shapes = [(t, 8, 64), (t, kv_heads, 64), (t, kv_heads, 64)]
    qkv = [torch.randn(s, device=DEVICE, generator=g).bfloat16() for s in shapes]
    want = attend_with_grads(reference_kernel, segments, qkv, torch.float32)  # same bf16 values
    got = attend_with_grads(kern, segments, qkv, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[0].shape == want[0].shape
    for a, b in zip(got, want, strict=True):
        assert_bf16_close(a, b)


@pytest.mark.parametrize("option", ["flash", "varlen"])
def test_causal_is_bottom_right_aligned_for_fewer_queries_than_keys(option: str) -> None:
    kern = kernel(option)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(3, 4, 64, device=DEVICE, generator=g).bfloat16()  # 3 queries
    k, v = (torch.randn(9, 4, 64, device=DEVICE, generator=g).bfloat16() for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device=DEVICE) for n in (3, 9))
    got = kern(q, k, v, cu_q, cu_k, 3, 9, scale=None, causal=True)
    want = reference_kernel(q.float(), k.float(), v.float(), cu_q, cu_k, 3, 9, scale=None,
                            causal=True)  # fmt: skip
    assert_bf16_close(got, want)
    # the last query sees every key: top-left alignment would show it only the first three
    full = reference_kernel(q.float()[2:], k.float(), v.float(), cu_q.clamp(max=1), cu_k, 1, 9,
                            scale=None, causal=False)  # fmt: skip
    assert_bf16_close(got[2:], full)


def test_auto_picks_the_best_available_kernel_on_cuda() -> None:
    best = available_kernels(DEVICE)[0]
    assert choose_attention("auto", DEVICE)[0] == ATTN_NAMES[best]
    assert choose_attention("auto", DEVICE, half=False) == (ATTN_NAME, "auto: fp32 compute")


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("option", ["flash", "varlen"])
def test_a_llama_on_a_gpu_kernel_gives_the_segment_sums(
    tiny_tokenizer: PreTrainedTokenizerFast, option: str, layout: str
) -> None:
    kernel(option)
    batch = build_batch(random_pairs(SHAPES, seed=4), INDEX, layout, PAD).to(DEVICE)
    sums = []
    for attn in ("segments", option):
        lm = sharpen(make_tiny_model(tiny_tokenizer, seed=2)).to(DEVICE, torch.bfloat16)
        pm = preference_model(lm, TrainConfig(attn=attn, precision="bf16"), bf16=True)
        assert pm.model.config._attn_implementation == ATTN_NAMES[attn]
        with torch.no_grad():
            out = pm(batch)
        sums.append(torch.cat([out.chosen, out.rejected]))
    # bf16 rounding of two different kernels through two layers; a leak moves sums by nats
    torch.testing.assert_close(sums[1], sums[0], rtol=0.02, atol=0.1)
