"""The fast log-prob path (packed/shared layouts, segment attention, chunked LM head) against the
plain computation: padded rows, the model's own attention and its full-vocabulary logits.

The reference everywhere is ``PreferenceModel(model, chunked=False, attention="mask")`` on a
``padded`` batch, the computation the package used before the fast path existed (itself checked
against a one-sequence-at-a-time loop in ``test_logprobs.py``). Models are tiny Llama and Qwen2
networks whose weights are scaled up so that attention is far from uniform: a wrong mask or a
wrong position id then moves the sums by a lot more than the tolerances (see
``test_a_wrong_attention_pattern_is_far_outside_the_tolerance``).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from direct_align.data import PairDataset
from direct_align.data.packing import LAYOUTS, TokenBatch, build_batch, layout_tokens
from direct_align.losses import preference_loss
from direct_align.models.attention import (
    Segment,
    use_segment_attention,
)
from direct_align.models.logprobs import PreferenceModel
from fastpath import (
    ATOL,
    BUILDERS,
    CONFIGS,
    INDEX,
    PAD,
    SHAPES,
    UNCHANGED,
    assert_sums_close,
    preference_model,
    random_pairs,
    reference,
)


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(
    request: pytest.FixtureRequest, tiny_tokenizer: PreTrainedTokenizerFast
) -> PreTrainedModel:
    return BUILDERS[request.param](tiny_tokenizer)


@pytest.fixture(scope="module")
def segment_model(model: PreTrainedModel) -> PreTrainedModel:
    switched = copy.deepcopy(model)
    use_segment_attention(switched)
    return switched


@pytest.fixture(scope="module")
def pairs() -> PairDataset:
    return random_pairs(SHAPES, seed=0)


# ----------------------------------------------------------------------------- forward sums


@pytest.mark.parametrize(("layout", "chunked", "attention"), CONFIGS)
def test_sums_and_lengths_equal_the_padded_full_logits_computation(
    model: PreTrainedModel, segment_model: PreTrainedModel, pairs: PairDataset, layout: str,
    chunked: bool, attention: str,
) -> None:  # fmt: skip
    with torch.no_grad():
        ref = reference(model, pairs, INDEX)
        out = preference_model(model, segment_model, chunked=chunked, attention=attention)(
            build_batch(pairs, INDEX, layout, PAD)
        )
    assert out.chosen.dtype == out.rejected.dtype == torch.float32
    assert out.chosen_lengths.tolist() == [SHAPES[i][1] for i in INDEX]
    assert out.rejected_lengths.tolist() == [SHAPES[i][2] for i in INDEX]
    assert_sums_close(out, ref)


def test_a_wrong_attention_pattern_is_far_outside_the_tolerance(
    model: PreTrainedModel, segment_model: PreTrainedModel, pairs: PairDataset
) -> None:
    # The same rows with one causal sequence over the whole row (pairs see each other, rejected
    # sees chosen): the comparison above must be able to tell this apart.
    with torch.no_grad():
        ref = reference(model, pairs, INDEX)
        for layout in ("packed", "shared"):
            batch = build_batch(pairs, INDEX, layout, PAD)
            leaky = dataclasses.replace(batch, segments=(Segment(0, batch.input_ids.shape[1]),))
            out = PreferenceModel(segment_model, chunked=True)(leaky)
            error = torch.cat([out.chosen - ref.chosen, out.rejected - ref.rejected]).abs()
            assert error.max() > 1000 * ATOL


# ----------------------------------------------------------------------------- gradients


def fake_reference(data: PairDataset, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed reference sums near the policy's (about -6 a token), so the DPO loss is not flat."""
    chosen = torch.tensor([-6.0 * len(data.chosen_ids[i]) + 0.7 for i in index])
    rejected = torch.tensor([-6.0 * len(data.rejected_ids[i]) - 0.4 for i in index])
    return chosen, rejected


def dpo_grads(pm: PreferenceModel, batch: TokenBatch, data: PairDataset) -> dict[str, torch.Tensor]:
    out = pm(batch)
    ref_c, ref_r = fake_reference(data, batch.index.tolist())
    loss, _ = preference_loss("dpo", chosen_logps=out.chosen, rejected_logps=out.rejected,
                              ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=0.5)  # fmt: skip
    # A second term weighs pairs and sides differently, so a gradient routed to the wrong
    # sequence could not cancel out.
    weights = torch.arange(1, 2 * len(batch.index) + 1, dtype=torch.float32) / 10
    (loss + (torch.cat([out.chosen, out.rejected]) * weights).sum() / 100).backward()
    return {n: p.grad.clone() for n, p in pm.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("layout", "chunked", "attention"),
                         [("shared", True, "segments"), ("packed", True, "segments"),
                          ("shared", True, "mask"), ("packed", True, "mask")])  # fmt: skip
def test_gradients_equal_the_padded_full_logits_computation(
    model: PreTrainedModel, pairs: PairDataset, layout: str, chunked: bool, attention: str
) -> None:
    plain = copy.deepcopy(model)
    expected = dpo_grads(PreferenceModel(plain, chunked=False, attention="mask"),
                         build_batch(pairs, INDEX, "padded", PAD), pairs)  # fmt: skip
    fast = copy.deepcopy(model)
    if attention == "segments":
        use_segment_attention(fast)
    got = dpo_grads(PreferenceModel(fast, chunked=chunked, attention=attention),
                    build_batch(pairs, INDEX, layout, PAD), pairs)  # fmt: skip
    names = [n for n, _ in model.named_parameters()]
    assert set(expected) == set(got) == set(names)  # every parameter gets a gradient
    for name in names:
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- isolation


def edited(data: PairDataset, i: int, *, prompt: bool, chosen: bool, rejected: bool) -> PairDataset:
    """A copy where pair ``i`` has new tokens (and new lengths) in the chosen parts."""
    prompts, chosens, rejecteds = ([list(x) for x in part] for part in
                                   (data.prompt_ids, data.chosen_ids, data.rejected_ids))  # fmt: skip
    if prompt:
        prompts[i] = [1, *[(t * 7 + 3) % 370 + 5 for t in prompts[i][1:]], 17]
    if chosen:
        chosens[i] = [(t * 11 + 5) % 370 + 5 for t in chosens[i]] + [23, 29]
    if rejected:
        rejecteds[i] = [(t * 13 + 1) % 370 + 5 for t in rejecteds[i]] + [31]
    return PairDataset(prompts, chosens, rejecteds)


@pytest.mark.parametrize("attention", ["segments", "mask"])
@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_other_pairs_in_the_row_do_not_change_a_pairs_sums(
    model: PreTrainedModel, segment_model: PreTrainedModel, pairs: PairDataset, layout: str,
    attention: str,
) -> None:  # fmt: skip
    pm = preference_model(model, segment_model, chunked=True, attention=attention)
    k = INDEX.index(1)  # pair 1 sits in the middle of the row
    others = [j for j in range(len(INDEX)) if j != k]
    changed = edited(pairs, 1, prompt=True, chosen=True, rejected=True)
    with torch.no_grad():
        before = pm(build_batch(pairs, INDEX, layout, PAD))
        after = pm(build_batch(changed, INDEX, layout, PAD))
    for side in ("chosen", "rejected"):
        b, a = getattr(before, side), getattr(after, side)
        torch.testing.assert_close(a[others], b[others], **UNCHANGED)
        assert (a[k] - b[k]).abs() > 1e-2  # the edit did reach the model


@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_a_shared_pairs_rejected_sum_does_not_see_its_chosen_tokens(
    model: PreTrainedModel, segment_model: PreTrainedModel, pairs: PairDataset, attention: str
) -> None:
    pm = preference_model(model, segment_model, chunked=True, attention=attention)
    k = INDEX.index(2)
    changed = edited(pairs, 2, prompt=False, chosen=True, rejected=False)
    with torch.no_grad():
        before = pm(build_batch(pairs, INDEX, "shared", PAD))
        after = pm(build_batch(changed, INDEX, "shared", PAD))
        ref_after = reference(model, changed, INDEX)
    torch.testing.assert_close(after.rejected, before.rejected, **UNCHANGED)
    others = [j for j in range(len(INDEX)) if j != k]
    torch.testing.assert_close(after.chosen[others], before.chosen[others], **UNCHANGED)
    assert (after.chosen[k] - before.chosen[k]).abs() > 1e-2
    assert after.chosen_lengths[k] == before.chosen_lengths[k] + 2
    assert_sums_close(after, ref_after)


def test_without_segment_isolation_the_pairs_would_leak(
    segment_model: PreTrainedModel, pairs: PairDataset
) -> None:
    # Contrast for the two tests above: one causal sequence over the shared row makes the
    # rejected sums and later pairs depend on the edited chosen response.
    pm = PreferenceModel(segment_model, chunked=True)
    k = INDEX.index(2)
    changed = edited(pairs, 2, prompt=False, chosen=True, rejected=False)

    def leaky(batch: TokenBatch) -> TokenBatch:
        return dataclasses.replace(batch, segments=(Segment(0, batch.input_ids.shape[1]),))

    with torch.no_grad():
        before = pm(leaky(build_batch(pairs, INDEX, "shared", PAD)))
        after = pm(leaky(build_batch(changed, INDEX, "shared", PAD)))
    assert (after.rejected[k] - before.rejected[k]).abs() > 1e-3
    assert (after.chosen[k + 1 :] - before.chosen[k + 1 :]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- build_batch


# Pair 0: prompt [1, 10, 11], chosen [20, 21], rejected [30]
# Pair 1: prompt [1, 12],     chosen [22],     rejected [31, 32, 33]
HAND = PairDataset([[1, 10, 11], [1, 12]], [[20, 21], [22]], [[30], [31, 32, 33]])


def test_build_batch_shared_row() -> None:
    b = build_batch(HAND, [0, 1], "shared", PAD)
    assert b.layout == "shared" and b.attention_mask is None and b.num_pairs == 2
    assert b.input_ids.tolist() == [[1, 10, 11, 20, 21, 30, 1, 12, 22, 31, 32, 33]]
    # prompt 0..P-1, chosen P.., rejected P.. again
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 4]]
    assert b.segments == (Segment(0, 6, 3, 2, 1), Segment(6, 6, 2, 1, 3))
    assert b.target.tolist() == [20, 21, 30, 22, 31, 32, 33]
    # The first rejected token (30, row position 5) is predicted from the last prompt token
    # (11, position 2), not from the chosen token before it in the row; likewise 31 from 12.
    assert b.pred_index.tolist() == [2, 3, 2, 7, 7, 9, 10]
    assert b.input_ids[0, b.pred_index[2]] == 11 and b.input_ids[0, b.pred_index[4]] == 12
    assert b.seq_index.tolist() == [0, 0, 2, 1, 3, 3, 3]  # i chosen, B+i rejected
    assert b.index.tolist() == [0, 1]
    assert b.num_tokens == 12
    with pytest.raises(AssertionError):
        b.cu_seqlens()  # varlen offsets are for packed rows only


def test_build_batch_packed_row() -> None:
    b = build_batch(HAND, [1, 0], "packed", PAD)  # pair 1 first
    assert b.attention_mask is None and b.index.tolist() == [1, 0]
    assert b.input_ids.tolist() == [
        [1, 12, 22, 1, 12, 31, 32, 33, 1, 10, 11, 20, 21, 1, 10, 11, 30]
    ]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert [(s.start, s.length, s.shared) for s in b.segments] == [
        (0, 3, False), (3, 5, False), (8, 5, False), (13, 4, False)]  # fmt: skip
    assert b.cu_seqlens().tolist() == [0, 3, 8, 13, 17]
    assert b.cu_seqlens().dtype == torch.int32
    # order of sequences: chosen of pair 1, rejected of pair 1, chosen of pair 0, rejected of 0
    assert b.target.tolist() == [22, 31, 32, 33, 20, 21, 30]
    assert b.pred_index.tolist() == [1, 4, 5, 6, 10, 11, 15]
    assert b.seq_index.tolist() == [0, 2, 2, 2, 1, 1, 3]
    assert b.num_tokens == 17


def test_build_batch_padded_rows() -> None:
    b = build_batch(HAND, [0, 1], "padded", 7)
    assert b.position_ids is None and b.segments is None
    assert b.input_ids.tolist() == [[1, 10, 11, 20, 21], [1, 12, 22, 7, 7],
                                    [1, 10, 11, 30, 7], [1, 12, 31, 32, 33]]  # fmt: skip
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]  # fmt: skip
    assert b.target.tolist() == [20, 21, 22, 30, 31, 32, 33]
    assert b.pred_index.tolist() == [2, 3, 6, 12, 16, 17, 18]  # row * 5 + column - 1
    assert b.seq_index.tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert b.num_tokens == 17  # 20 positions, 3 of them padding
    assert b.input_ids.flatten()[b.pred_index + 1].tolist() == b.target.tolist()


def test_layout_tokens_and_unknown_layout() -> None:
    assert [layout_tokens(HAND, i, "shared") for i in range(2)] == [6, 6]
    assert [layout_tokens(HAND, i, "packed") for i in range(2)] == [9, 8]
    assert [layout_tokens(HAND, i, "padded") for i in range(2)] == [9, 8]  # padding aside
    for layout in LAYOUTS:  # the cost equals what build_batch computes for one pair
        if layout != "padded":
            for i in range(2):
                assert build_batch(HAND, [i], layout, PAD).num_tokens == layout_tokens(
                    HAND, i, layout
                )
    with pytest.raises(ValueError, match="layout"):
        build_batch(HAND, [0], "ragged", PAD)


def test_token_batch_to_moves_every_tensor() -> None:
    b = build_batch(HAND, [0, 1], "shared", PAD).to("meta")
    assert all(v.device.type == "meta" for v in vars(b).values() if isinstance(v, torch.Tensor))
    assert b.segments == build_batch(HAND, [0, 1], "shared", PAD).segments
