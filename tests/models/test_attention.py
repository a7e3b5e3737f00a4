"""Segment attention: equal to SDPA under the layout's explicit mask, transparent for every other
call, and refusing (or, with masks, honouring) sliding windows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import make_tiny_model
from direct_align.data import PairDataset
from direct_align.data.packing import build_batch
from direct_align.errors import ConfigError
from direct_align.models.attention import (
    NO_MASK,
    Segment,
    segment_attention,
    use_segment_attention,
)
from direct_align.models.logprobs import PreferenceModel
from fastpath import (
    INDEX,
    PAD,
    SHAPES,
    assert_sums_close,
    make_tiny_qwen2,
    random_pairs,
    reference,
    sharpen,
)


@pytest.fixture(scope="module")
def pairs() -> PairDataset:
    return random_pairs(SHAPES, seed=0)


# ----------------------------------------------------------------------------- segment attention


def test_segment_attention_without_segments_is_transformers_sdpa(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    module = make_tiny_model(tiny_tokenizer).model.layers[0].self_attn  # GQA: 4 heads, 2 kv heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :3] = False  # left padding in the second row
    mask[1, :, :3, 0] = True  # (padded queries attend to something)
    for given in (None, mask):
        want, _ = sdpa_attention_forward(module, q, k, v, given, scaling=0.3)
        got, weights = segment_attention(module, q, k, v, given, scaling=0.3)
        assert weights is None and torch.equal(got, want)
    got, _ = segment_attention(module, q, k, v, NO_MASK, scaling=0.3)  # "no mask": causal
    assert torch.equal(got, sdpa_attention_forward(module, q, k, v, None, scaling=0.3)[0])


def allowed_pairs(segments: tuple[Segment, ...], t: int) -> torch.Tensor:
    """[T, T] bool: query i may attend key j, from the layout's rules, written out per token."""
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for s in segments:
        if not s.shared:
            for i in range(s.start, s.start + s.length):
                allowed[i, s.start : i + 1] = True
            continue
        prompt_end, chosen_end = s.start + s.prompt, s.start + s.prompt + s.chosen
        for i in range(s.start, chosen_end):  # prompt and chosen: plain causal
            allowed[i, s.start : i + 1] = True
        for i in range(chosen_end, s.start + s.length):  # rejected: prompt + earlier rejected
            allowed[i, s.start : prompt_end] = True
            allowed[i, chosen_end : i + 1] = True
    return allowed


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_segment_attention_equals_sdpa_under_an_explicit_mask(
    tiny_tokenizer: PreTrainedTokenizerFast, layout: str
) -> None:
    module = make_tiny_model(tiny_tokenizer).model.layers[0].self_attn
    batch = build_batch(random_pairs(SHAPES, seed=3), INDEX, layout, PAD)
    t = batch.input_ids.shape[1]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, t, 8, generator=g) * 2
    k, v = torch.randn(1, 2, t, 8, generator=g) * 2, torch.randn(1, 2, t, 8, generator=g)
    got, _ = segment_attention(module, q, k, v, NO_MASK, scaling=0.35,
                               direct_align_segments=batch.segments)  # fmt: skip
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_pairs(batch.segments, t),
                                          scale=0.35, enable_gqa=True).transpose(1, 2)  # fmt: skip
    assert got.shape == (1, t, 4, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_switched_model_generates_as_before(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    plain = sharpen(make_tiny_model(tiny_tokenizer, seed=1))
    switched = copy.deepcopy(plain)
    use_segment_attention(switched)
    assert switched.config._attn_implementation == "direct_align_segments"
    assert plain.config._attn_implementation == "sdpa"
    prompts = torch.tensor([[1, 50, 60, 70, 80, 33], [PAD, PAD, PAD, 1, 90, 91]])  # left padding
    mask = (prompts != PAD).long()
    kw = {"attention_mask": mask, "do_sample": False, "max_new_tokens": 10, "pad_token_id": PAD,
          "eos_token_id": None, "return_dict_in_generate": True, "output_scores": True}  # fmt: skip
    with torch.no_grad():
        want = plain.generate(input_ids=prompts, **kw)
        got = switched.generate(input_ids=prompts, **kw)
        # A whole padded forward gives the same logits, too.
        logits = [m(input_ids=prompts, attention_mask=mask).logits for m in (plain, switched)]
    assert torch.equal(got.sequences, want.sequences)
    assert len(set(want.sequences[:, 6:].flatten().tolist())) > 2  # not one token repeated
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-6)


def sliding_qwen2(tokenizer: PreTrainedTokenizerFast, window: int) -> Qwen2ForCausalLM:
    # max_window_layers=0: every layer slides (Qwen2's default of 28 would leave both of these
    # two layers on full attention, and use_sliding_window=True would change nothing).
    model = make_tiny_qwen2(tokenizer, use_sliding_window=True, sliding_window=window,
                            max_window_layers=0)  # fmt: skip
    assert model.config.layer_types == ["sliding_attention"] * 2
    return sharpen(model)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_segment_attention_refuses_a_sliding_window_shorter_than_a_sequence(
    tiny_tokenizer: PreTrainedTokenizerFast, pairs: PairDataset, layout: str
) -> None:
    model = sliding_qwen2(tiny_tokenizer, window=4)
    use_segment_attention(model)
    with pytest.raises(ConfigError, match="--layout padded"), torch.no_grad():
        PreferenceModel(model)(build_batch(pairs, INDEX, layout, PAD))


def test_segment_attention_accepts_a_window_longer_than_every_sequence(
    tiny_tokenizer: PreTrainedTokenizerFast, pairs: PairDataset
) -> None:
    longest = max(p + c + r for p, c, r in SHAPES)
    model = sliding_qwen2(tiny_tokenizer, window=longest)
    switched = copy.deepcopy(model)
    use_segment_attention(switched)
    with torch.no_grad():
        ref = reference(model, pairs, INDEX)
        for layout in ("packed", "shared"):
            assert_sums_close(
                PreferenceModel(switched)(build_batch(pairs, INDEX, layout, PAD)), ref
            )


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_mask_attention_respects_a_sliding_window(
    tiny_tokenizer: PreTrainedTokenizerFast, pairs: PairDataset, layout: str
) -> None:
    model = sliding_qwen2(tiny_tokenizer, window=4)
    with torch.no_grad():
        ref = reference(model, pairs, INDEX)
        out = PreferenceModel(model, attention="mask")(build_batch(pairs, INDEX, layout, PAD))
    assert_sums_close(out, ref)
