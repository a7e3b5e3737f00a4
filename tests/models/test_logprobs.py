"""Per-token and per-sequence response log-probs against a hand-written computation.

The reference value of a response's log-prob sum is computed one sequence at a time, without
padding or masks: run the model on prompt + response, take log_softmax of the logits, and add
``logp[t - 1, token_t]`` over the response positions ``t`` only.

``PLAIN`` is the plain computation (padded rows, full logits, the model's own attention); the
fast layouts are compared with it in ``test_packing.py`` and with the manual loop here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.data import IGNORE_INDEX, PairDataset, prepare_pairs
from direct_align.data.packing import TokenBatch, build_batch
from direct_align.models.attention import use_segment_attention
from direct_align.models.logprobs import PreferenceModel, SequenceLogps, token_logps
from prefdata import rows, write_jsonl

ATOL = 1e-5
RTOL = 1e-6  # float32 sums of ~20 terms near -6 carry ~1e-5 of rounding at -120
# Every (layout, chunked, attention) the package offers; the first is the plain computation.
PLAIN = ("padded", False, "mask")
CONFIGS = [PLAIN, ("padded", True, "mask"), ("packed", True, "mask"), ("packed", True, "segments"),
           ("packed", False, "segments"), ("shared", True, "mask"), ("shared", False, "mask"),
           ("shared", True, "segments"), ("shared", False, "segments")]  # fmt: skip


def sequence_logps(model: LlamaForCausalLM, batch: TokenBatch, *, chunked: bool = False,
                   attention: str = "mask") -> SequenceLogps:  # fmt: skip
    """The sums of ``batch`` under ``model`` (a model switched to segment attention if asked)."""
    if attention == "segments" and model.config._attn_implementation != "direct_align_segments":
        model = copy.deepcopy(model)
        use_segment_attention(model)
    return PreferenceModel(model, chunked=chunked, attention=attention)(batch)


@torch.no_grad()
def manual_sum(model: LlamaForCausalLM, prompt: list[int], response: list[int]) -> float:
    """Sum of log p(response_t | everything before it), one unpadded sequence, a plain loop."""
    ids = prompt + response
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))


@torch.no_grad()
def full_sequence_sum(model: LlamaForCausalLM, ids: list[int]) -> float:
    """Sum over every position after the first (prompt tokens included), for contrast."""
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))


@pytest.fixture(scope="module")
def model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_tiny_model(tiny_tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def prepared(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> PairDataset:
    path = write_jsonl(tmp_path_factory.mktemp("logps") / "pairs.jsonl", rows("standard", 6, 11))
    return prepare_pairs(str(path), tiny_tokenizer, max_length=64).pairs


def test_token_logps_matches_a_log_softmax_gather_loop() -> None:
    g = torch.Generator().manual_seed(0)
    rows_, steps, vocab = 3, 7, 11
    logits = torch.randn(rows_, steps, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (rows_, steps), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[2, 0] = IGNORE_INDEX  # position 0 is never a target anyway

    logps, mask = token_logps(logits, labels)

    assert logps.shape == mask.shape == (rows_, steps - 1)
    assert mask.dtype == torch.bool
    for r in range(rows_):
        logp = torch.log_softmax(logits[r].double(), dim=-1)
        for t in range(1, steps):
            label = int(labels[r, t])
            assert bool(mask[r, t - 1]) == (label != IGNORE_INDEX)
            expected = 0.0 if label == IGNORE_INDEX else logp[t - 1, label].item()
            assert logps[r, t - 1].item() == pytest.approx(expected, abs=1e-5)
    assert mask.sum().item() == 3 * (steps - 1) - 2 - 2  # row 0 loses t=1,2; row 1 t=5,6


def test_token_logps_computes_in_float32_from_bf16_logits() -> None:
    logits = torch.randn(2, 5, 9).to(torch.bfloat16)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7]])
    logps, mask = token_logps(logits, labels)
    assert logps.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1)[0, 0, 1].item()
    assert logps[0, 0].item() == pytest.approx(expected, abs=1e-6)
    assert mask.tolist() == [[True] * 4, [False, True, True, True]]


def test_token_logps_masked_positions_are_zero_even_for_infinite_logits() -> None:
    logits = torch.zeros(1, 4, 5)
    logits[0, 2, 0] = float("-inf")  # predicts position 3, which is padding
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX]])
    logps, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, True, False]]
    assert logps[0, 2].item() == 0.0
    assert torch.isfinite(logps.sum())


@pytest.mark.parametrize(("layout", "chunked", "attention"), CONFIGS)
def test_sequence_logps_matches_manual_computation(
    model: LlamaForCausalLM, prepared: PairDataset, tiny_tokenizer: PreTrainedTokenizerFast,
    layout: str, chunked: bool, attention: str,
) -> None:  # fmt: skip
    index = [4, 0, 2, 5]
    batch = build_batch(prepared, index, layout, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        out = sequence_logps(model, batch, chunked=chunked, attention=attention)
    chosen, rejected, chosen_len, rejected_len = (out.chosen, out.rejected, out.chosen_lengths,
                                                  out.rejected_lengths)  # fmt: skip

    assert chosen.shape == rejected.shape == chosen_len.shape == rejected_len.shape == (4,)
    assert chosen.dtype == rejected.dtype == torch.float32
    for k, i in enumerate(index):
        p = prepared.prompt_ids[i]
        c, r = prepared.chosen_ids[i], prepared.rejected_ids[i]
        assert chosen[k].item() == pytest.approx(manual_sum(model, p, c), rel=RTOL, abs=ATOL)
        assert rejected[k].item() == pytest.approx(manual_sum(model, p, r), rel=RTOL, abs=ATOL)
        assert int(chosen_len[k]) == len(c)
        assert int(rejected_len[k]) == len(r)


def test_prompt_tokens_contribute_nothing(
    model: LlamaForCausalLM, prepared: PairDataset, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    batch = build_batch(prepared, [1], "padded", tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        out = sequence_logps(model, batch)
    chosen, chosen_len = out.chosen, out.chosen_lengths
    p, c = prepared.prompt_ids[1], prepared.chosen_ids[1]
    response_only = manual_sum(model, p, c)
    with_prompt = full_sequence_sum(model, p + c)
    assert len(p) >= 3  # the prompt has predicted tokens that would count if not masked
    assert with_prompt < response_only - 1.0  # so the comparison below can tell them apart
    assert chosen.item() == pytest.approx(response_only, rel=RTOL, abs=ATOL)
    assert int(chosen_len) == len(c) == int((batch.seq_index == 0).sum())
    # The scored tokens are exactly the chosen response, predicted from the position before.
    assert batch.target[batch.seq_index == 0].tolist() == c
    assert (batch.pred_index[batch.seq_index == 0] % batch.input_ids.shape[1]).tolist() == list(
        range(len(p) - 1, len(p) + len(c) - 1))


def test_right_padding_does_not_change_a_pairs_sums(model: LlamaForCausalLM) -> None:
    short = ([1, 40, 41], [42, 43, 2], [44, 2])
    g = torch.Generator().manual_seed(3)
    long = tuple(torch.randint(5, 300, (n,), generator=g).tolist() for n in (30, 40, 25))
    data = PairDataset(*([s, lg] for s, lg in zip(short, long)))
    def as_tuple(out: SequenceLogps) -> tuple[torch.Tensor, ...]:
        return out.chosen, out.rejected, out.chosen_lengths, out.rejected_lengths

    with torch.no_grad():
        alone = as_tuple(sequence_logps(model, build_batch(data, [0], "padded", 0)))
        batched = as_tuple(sequence_logps(model, build_batch(data, [1, 0], "padded", 0)))
        # Garbage in the padding (attention mask 0, never a target) must not matter either.
        noisy = build_batch(data, [0, 1], "padded", 0)
        noisy.input_ids[noisy.attention_mask == 0] = 123
        noisy_out = as_tuple(sequence_logps(model, noisy))
    assert build_batch(data, [1, 0], "padded", 0).input_ids.shape[1] >= 70  # much longer than 6
    assert (noisy.input_ids == 123).sum() >= 100  # the garbage is really there
    for k in range(2):  # chosen, rejected sums
        assert batched[k][1].item() == pytest.approx(alone[k][0].item(), rel=RTOL, abs=ATOL)
        assert noisy_out[k][0].item() == pytest.approx(alone[k][0].item(), rel=RTOL, abs=ATOL)
    assert batched[2].tolist() == [40, 3] and batched[3].tolist() == [25, 2]
    assert alone[0].item() == pytest.approx(
        manual_sum(model, short[0], short[1]), rel=RTOL, abs=ATOL
    )


@pytest.mark.parametrize(("layout", "chunked", "attention"),
                         [PLAIN, ("shared", True, "segments"), ("packed", True, "mask")])  # fmt: skip
def test_sequence_logps_is_differentiable(
    tiny_tokenizer: PreTrainedTokenizerFast, prepared: PairDataset, layout: str, chunked: bool,
    attention: str,
) -> None:  # fmt: skip
    model = make_tiny_model(tiny_tokenizer, seed=1)
    if attention == "segments":
        use_segment_attention(model)
    batch = build_batch(prepared, [0, 1], layout, tiny_tokenizer.pad_token_id)
    out = sequence_logps(model, batch, chunked=chunked, attention=attention)
    (out.chosen - out.rejected).sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
