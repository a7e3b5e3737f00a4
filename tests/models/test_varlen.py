"""Varlen segment attention on the CPU: the two-call plans written out by hand, the reference
kernel through the plans equal to segment attention (outputs and gradients), a tiny Llama
through :class:`PreferenceModel` unchanged, and the choice of attention. The real GPU kernels
are compared with the reference kernel in ``test_varlen_gpu.py``."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from conftest import make_tiny_model, train_settings
from direct_align.data.packing import build_batch
from direct_align.errors import ConfigError
from direct_align.models.attention import (
    ATTN_NAME,
    NO_MASK,
    Segment,
    segment_attention,
    use_segment_attention,
)
from direct_align.models.loading import preference_model
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.varlen import (
    FA_NAME,
    REFERENCE_NAME,
    VARLEN_NAME,
    available_kernels,
    choose_attention,
    flash_attn_kernel,
    reference_kernel,
    torch_varlen_kernel,
    use_varlen_attention,
    varlen_attention,
    varlen_plan,
)
from direct_align.preference.settings import TrainConfig
from fastpath import INDEX, PAD, SHAPES, UNCHANGED, random_pairs, sharpen

CPU = torch.device("cpu")
PACKED = (Segment(0, 3), Segment(3, 5))
# Pair A: prompt 0-1, chosen 2, rejected 3-4; pair B: prompt 5-7, chosen 8-9, rejected 10.
SHARED = (Segment(0, 5, 2, 1, 2), Segment(5, 6, 3, 2, 1))
MIXED = (Segment(0, 4), Segment(4, 9, 3, 2, 4), Segment(13, 1), Segment(14, 6, 1, 4, 1))


def ints(x: torch.Tensor | None) -> list[int] | None:
    return None if x is None else x.tolist()


# ----------------------------------------------------------------------------- plans


def test_plan_of_a_packed_row_is_the_row_itself() -> None:
    plan = varlen_plan(PACKED, CPU)
    call = plan.causal
    assert (plan.tokens, plan.rejected, plan.inverse) == (8, None, None)
    assert (call.q_index, call.k_index) == (None, None)  # no gather
    assert ints(call.cu_q) == ints(call.cu_k) == [0, 3, 8]
    assert call.cu_q.dtype == torch.int32 and (call.max_q, call.max_k) == (5, 5)


def test_plan_of_a_shared_row_written_out() -> None:
    plan = varlen_plan(SHARED, CPU)
    causal, rejected = plan.causal, plan.rejected
    assert plan.tokens == 11 and rejected is not None
    assert ints(causal.q_index) == [0, 1, 2, 5, 6, 7, 8, 9] and causal.k_index is None
    assert ints(causal.cu_q) == ints(causal.cu_k) == [0, 3, 8]
    assert (causal.max_q, causal.max_k) == (5, 5)
    assert ints(rejected.q_index) == [3, 4, 10]
    assert ints(rejected.k_index) == [0, 1, 3, 4, 5, 6, 7, 10]  # each pair's [prompt, rejected]
    assert ints(rejected.cu_q) == [0, 2, 3] and ints(rejected.cu_k) == [0, 4, 8]
    assert (rejected.max_q, rejected.max_k) == (2, 4)
    assert rejected.cu_q.dtype == rejected.cu_k.dtype == torch.int32
    # cat(causal out, rejected out) = row tokens [0, 1, 2, 5, 6, 7, 8, 9, 3, 4, 10]
    assert ints(plan.inverse) == [0, 1, 2, 8, 9, 3, 4, 5, 6, 7, 10]


def test_plans_are_cached_and_must_tile_the_row() -> None:
    assert varlen_plan(SHARED, CPU) is varlen_plan(tuple(SHARED), CPU)
    with pytest.raises(ValueError, match="tile the row"):
        varlen_plan((Segment(0, 3), Segment(4, 2)), CPU)


# ----------------------------------------------------------------------------- attention


def random_qkv(t: int, heads: int, kv_heads: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, heads, t, 8), (1, kv_heads, t, 8), (1, kv_heads, t, 8)]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 2).requires_grad_() for s in shapes]


def row_segments(name: str) -> tuple[Segment, ...]:
    if name == "mixed":
        return MIXED
    return build_batch(random_pairs(SHAPES, seed=3), INDEX, name, PAD).segments


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("row", ["packed", "shared", "mixed"])
def test_reference_kernel_equals_segment_attention_with_gradients(row: str, kv_heads: int) -> None:
    segments = row_segments(row)
    t = sum(s.length for s in segments)
    module = torch.nn.Module()
    outputs, grads = [], []
    for attention in (segment_attention, varlen_attention):  # varlen: reference kernel by default
        q, k, v = random_qkv(t, 4, kv_heads, seed=5)
        out, weights = attention(module, q, k, v, NO_MASK, scaling=0.35,
                                 direct_align_segments=segments)  # fmt: skip
        assert weights is None and out.shape == (1, t, 4, 8)
        out.mul(torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append([q.grad, k.grad, v.grad])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_under_autocast_the_kernel_gets_one_half_dtype() -> None:
    """RoPE leaves q and k in fp32 under autocast while v is half: all three reach the kernel in
    autocast's dtype (a GPU kernel refuses fp32 and mixed dtypes)."""
    segments = row_segments("shared")
    t = sum(s.length for s in segments)
    # inputs already on bf16's grid, so that the comparison sees only the kernel's own rounding
    q, k, v = (x.detach().bfloat16().double() for x in random_qkv(t, 4, 2, seed=7))
    want, _ = segment_attention(torch.nn.Module(), q, k, v, NO_MASK, direct_align_segments=segments)
    seen: list[torch.dtype] = []

    def spy(*args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.extend(x.dtype for x in args[:3])
        return reference_kernel(*args, **kwargs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = varlen_attention(torch.nn.Module(), q.float(), k.float(), v.bfloat16(), NO_MASK,
                                  kernel=spy, direct_align_segments=segments)  # fmt: skip
    assert set(seen) == {torch.bfloat16} and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=0.01, atol=0.02)


def test_varlen_attention_without_segments_is_transformers_sdpa(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    module = make_tiny_model(tiny_tokenizer).model.layers[0].self_attn  # GQA: 4 heads, 2 kv heads
    q, k, v = (x.detach().float() for x in random_qkv(9, 4, 2, seed=0))
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    for mask in (None, NO_MASK):
        got, weights = varlen_attention(module, q, k, v, mask, scaling=0.3)
        assert weights is None and torch.equal(got, want)


def test_refusals() -> None:
    q, k, v = (x.detach().float() for x in random_qkv(8, 4, 2, seed=0))
    with pytest.raises(ConfigError, match="dropout"):
        varlen_attention(torch.nn.Module().train(), q, k, v, NO_MASK, dropout=0.1,
                         direct_align_segments=PACKED)  # fmt: skip
    with pytest.raises(ValueError, match="segments cover 8 of the row's 9 tokens"):
        q9, k9, v9 = (x.detach() for x in random_qkv(9, 4, 2, seed=0))
        varlen_attention(torch.nn.Module(), q9, k9, v9, NO_MASK, direct_align_segments=PACKED)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    rows = [x[0].transpose(0, 1) for x in (q, k, v)]
    for kernel, option in ((flash_attn_kernel, "flash"), (torch_varlen_kernel, "varlen")):
        with pytest.raises(ConfigError, match=f"--attn {option} needs bf16 or fp16"):
            kernel(*rows, cu, cu, 8, 8, scale=None, causal=True)


def test_every_kernel_is_registered_with_transformers() -> None:
    for name in (FA_NAME, VARLEN_NAME, REFERENCE_NAME):
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        assert "flash" not in name  # transformers would try to load such a name as its own kernel


# ----------------------------------------------------------------------------- a whole model


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_a_llama_with_the_reference_kernel_gives_the_segment_sums(
    tiny_tokenizer: PreTrainedTokenizerFast, layout: str
) -> None:
    segment_model = sharpen(make_tiny_model(tiny_tokenizer, seed=2))
    varlen_model = copy.deepcopy(segment_model)
    use_segment_attention(segment_model)
    use_varlen_attention(varlen_model, REFERENCE_NAME)
    assert varlen_model.config._attn_implementation == REFERENCE_NAME
    batch = build_batch(random_pairs(SHAPES, seed=4), INDEX, layout, PAD)
    outs, grads = [], []
    for lm in (segment_model, varlen_model):
        out = PreferenceModel(lm)(batch)
        (out.chosen.sum() - 2 * out.rejected.sum()).backward()
        outs.append(out)
        grads.append([p.grad for p in lm.parameters()])
    for got, want in ((outs[1].chosen, outs[0].chosen), (outs[1].rejected, outs[0].rejected)):
        torch.testing.assert_close(got, want, **UNCHANGED)  # float32 rounding only
    for got, want in zip(grads[1], grads[0], strict=True):  # float32 rounding: about 1e-6
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


# ----------------------------------------------------------------------------- choosing


def test_auto_on_a_cpu_is_segment_attention(
    tiny_tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    assert available_kernels(CPU) == ["segments"]
    assert choose_attention("auto", CPU) == (ATTN_NAME, "auto: no CUDA")
    with caplog.at_level(logging.INFO, logger="direct_align.models.loading"):
        pm = preference_model(make_tiny_model(tiny_tokenizer), TrainConfig(attn="auto"), bf16=False)
    assert pm.attention == "segments"
    assert pm.model.config._attn_implementation == ATTN_NAME
    assert "attention: direct_align_segments (auto: no CUDA)" in caplog.messages


@pytest.mark.parametrize("option", ["flash", "varlen"])
def test_gpu_kernels_are_refused_on_a_cpu(
    tiny_tokenizer: PreTrainedTokenizerFast, option: str
) -> None:
    with pytest.raises(ConfigError, match=f"^--attn {option} needs a CUDA device"):
        choose_attention(option, CPU)
    with pytest.raises(ConfigError, match=f"^--attn {option} needs a CUDA device"):
        preference_model(make_tiny_model(tiny_tokenizer), TrainConfig(attn=option), bf16=False,
                         device=CPU)
    with pytest.raises(ConfigError, match=f"^--attn {option} needs a packed layout"):
        train_settings({"attn": option, "layout": "padded"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("option", ["flash", "varlen"])
def test_config_refuses_gpu_kernels_without_cuda(option: str) -> None:
    with pytest.raises(ConfigError) as info:
        train_settings({"attn": option})
    assert str(info.value) == f"--attn {option} needs a CUDA device (this one is cpu)"
