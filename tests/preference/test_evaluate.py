"""Held-out preference metrics: loss, implicit rewards and accuracy, weighted by pairs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.data import PairDataset, TextPairs, tokenize_pairs
from direct_align.data.packing import build_batch
from direct_align.models.logprobs import PreferenceModel
from direct_align.preference.evaluate import evaluate_pairs
from direct_align.preference.reference import score_pairs
from fastpath import manual_logp, wrap
from prefdata import text_pairs

CPU = torch.device("cpu")
TOL = {"rel": 1e-6, "abs": 1e-5}


@pytest.fixture(scope="module")
def eval_pairs(tiny_tokenizer: PreTrainedTokenizerFast) -> PairDataset:
    triples = text_pairs(7, seed=21)
    texts = TextPairs([p for p, _, _ in triples], [c for _, c, _ in triples],
                      [r for _, _, r in triples], format="standard", templated=False)  # fmt: skip
    return tokenize_pairs(texts, tiny_tokenizer, max_length=64, source="test")[0]



# ----------------------------------------------------------------------------- evaluate_pairs


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_evaluate_pairs_against_itself_is_log2_with_zero_margins(
    tiny_tokenizer: PreTrainedTokenizerFast, eval_pairs: PairDataset, layout: str
) -> None:
    lm = make_tiny_model(tiny_tokenizer, seed=8)
    model = wrap(lm, layout)
    pad = tiny_tokenizer.pad_token_id
    ref = score_pairs(model, eval_pairs, batch_size=3, layout=layout, pad_token_id=pad,
                      device=CPU)  # fmt: skip
    model.train()
    metrics = evaluate_pairs(model, eval_pairs, ref, loss="dpo", beta=0.1, loss_kwargs={},
                             batch_size=3, layout=layout, pad_token_id=pad,
                             device=CPU)  # fmt: skip
    assert model.training and model.model.training
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == 0.0
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0

    # logps/* are means over all 7 pairs (batches of 3, 3, 1 weighted by their pair counts).
    lm.eval()
    plain = PreferenceModel(lm, chunked=False, attention="mask")
    chosen = []
    for i in range(len(eval_pairs)):
        with torch.no_grad():
            out = plain(build_batch(eval_pairs, [i], "padded", pad))
        chosen.append(out.chosen.item())
        assert out.chosen.item() == pytest.approx(
            manual_logp(lm, eval_pairs.prompt_ids[i], eval_pairs.chosen_ids[i]), **TOL)
    assert metrics["logps/chosen"] == pytest.approx(sum(chosen) / len(chosen), **TOL)


@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_evaluate_pairs_weights_batches_by_pairs(
    tiny_tokenizer: PreTrainedTokenizerFast, eval_pairs: PairDataset, layout: str
) -> None:
    # Reference-free DPO with a different reference-less policy: the loss over 7 pairs in
    # batches of 3, 3, 1 must equal the mean of the per-pair losses, not the mean of batch means.
    model = make_tiny_model(tiny_tokenizer, seed=9)
    pad = tiny_tokenizer.pad_token_id
    beta = 0.5
    metrics = evaluate_pairs(wrap(model, layout), eval_pairs, None, loss="dpo", beta=beta,
                             loss_kwargs={"label_smoothing": 0.0}, batch_size=3, layout=layout,
                             pad_token_id=pad, device=CPU)  # fmt: skip
    losses, wins = [], []
    for i in range(len(eval_pairs)):
        p = eval_pairs.prompt_ids[i]
        h = manual_logp(model, p, eval_pairs.chosen_ids[i]) - manual_logp(
            model, p, eval_pairs.rejected_ids[i]
        )
        losses.append(math.log1p(math.exp(-beta * h)))  # -log sigma(beta * h)
        wins.append(float(h > 0))
    assert metrics["loss"] == pytest.approx(sum(losses) / len(losses), **TOL)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(wins) / len(wins))
