"""ChunkedLogProbs, the LM head that never holds a batch's full logits, against log_softmax."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.errors import ConfigError
from direct_align.models.logprobs import ChunkedLogProbs, PreferenceModel

# ----------------------------------------------------------------------------- ChunkedLogProbs


def naive_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor) -> torch.Tensor:  # fmt: skip
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)


def random_head(n: int, h: int, v: int, seed: int, bias: bool,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, v, (n,), generator=g)  # n > v: targets repeat within chunks
    grad_out = torch.randn(n, generator=g, dtype=torch.float64)
    cast = [t.to(dtype) if t is not None else None for t in (hidden, weight, b, grad_out)]
    return cast[0], cast[1], cast[2], target, cast[3]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_logprobs_equal_log_softmax_gather(chunk: int, bias: bool) -> None:
    n, h, v = 11, 6, 9
    hidden, weight, b, target, grad_out = random_head(n, h, v, seed=chunk, bias=bias)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    out = ChunkedLogProbs.apply(leaves[0], leaves[1], leaves[2] if bias else None, target, chunk)
    assert out.shape == (n,) and out.dtype == torch.float32
    (out * grad_out).sum().backward()

    naive = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    expected = naive_logps(naive[0], naive[1], naive[2] if bias else None, target)
    (expected * grad_out).sum().backward()

    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(leaves, naive, strict=True):
        assert want.grad.abs().max() > 0
        assert got.grad.dtype == want.grad.dtype
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_chunked_logprobs_gradient_only_where_asked() -> None:
    hidden, weight, _, target, grad_out = random_head(7, 5, 6, seed=4, bias=False)
    h = hidden.clone().requires_grad_()
    ChunkedLogProbs.apply(h, weight, None, target, 2).mul(grad_out).sum().backward()  # frozen head
    h2 = hidden.clone().requires_grad_()
    naive_logps(h2, weight, None, target).mul(grad_out).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_chunked_logprobs_bf16_within_bf16_tolerance() -> None:
    hidden, weight, b, target, grad_out = random_head(40, 16, 50, seed=5, bias=True)
    bf = [t.to(torch.bfloat16).requires_grad_() for t in (hidden, weight, b)]
    out = ChunkedLogProbs.apply(*bf, target, 7)
    assert out.dtype == torch.float32
    (out * grad_out).sum().backward()
    assert [t.grad.dtype for t in bf] == [torch.bfloat16] * 3
    # The exact computation on the same (bf16-rounded) inputs, in float64.
    exact = [t.detach().double().requires_grad_() for t in bf]
    expected = naive_logps(*exact, target)
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.1)
    assert (out.double() - expected).abs().mean() < 0.03  # bf16 logits: ~3 significant digits
    for got, want in zip(bf, exact, strict=True):
        scale = want.grad.abs().max()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=0.03 * scale)


def test_chunked_logprobs_gradcheck_float64() -> None:
    # ChunkedLogProbs computes its logits and log-sum-exps in float32 whatever the input dtype
    # (it "returns [N] fp32"), so finite differences use a step that float32 resolves.
    hidden, weight, b, target, _ = random_head(5, 4, 7, seed=6, bias=True, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, b))
    assert torch.autograd.gradcheck(
        lambda h, w, bias: ChunkedLogProbs.apply(h, w, bias, target, 2), inputs,
        eps=1e-3, atol=1e-3, rtol=1e-3)  # fmt: skip


# ----------------------------------------------------------------------------- refusals


def test_chunked_head_refuses_a_logit_transform(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = make_tiny_model(tiny_tokenizer)
    PreferenceModel(model, chunked=True)  # accepted as it is
    model.config.logit_scale = 1.0  # an identity transform is fine
    PreferenceModel(model, chunked=True)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        PreferenceModel(model, chunked=True)
    PreferenceModel(model, chunked=False)  # the full forward applies the model's own transform
