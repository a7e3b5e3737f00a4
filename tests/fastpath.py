"""Shared pieces of the fast-path tests: tiny sharpened models, random pairs and the padded,
full-logits reference computation every fast layout must match."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from conftest import make_tiny_model
from direct_align.data import PairDataset
from direct_align.data.packing import LAYOUTS, build_batch
from direct_align.models.attention import use_segment_attention
from direct_align.models.logprobs import PreferenceModel, SequenceLogps

PAD = 0
ATOL = 1e-4  # fp32 sums of up to ~25 terms of ~-6 (the tiny models differ by < 2e-5)
# "Unchanged": float32 rounding only (2 ulp of a sum near -40 is 7.6e-6); an edit that leaks
# moves the sums by > 1e-3 (test_without_segment_isolation_the_pairs_would_leak).
UNCHANGED = {"rtol": 2.5e-7, "atol": 1e-6}
SCALE = 4.0  # weight scale-up that makes attention patterns matter (see the module docstring)

# (prompt, chosen, rejected) lengths: a 1-token prompt (BOS only), 1-token responses on either
# side, a long prompt with a 1-token chosen response, a long rejected response.
SHAPES = [(40, 1, 6), (2, 15, 1), (9, 7, 7), (3, 4, 25), (1, 3, 2)]
INDEX = [2, 0, 4, 1, 3]  # not in dataset order, so index bookkeeping is exercised


def random_pairs(shapes: list[tuple[int, int, int]], seed: int) -> PairDataset:
    """Random non-special token ids with the given (prompt, chosen, rejected) lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 380, (n,), generator=g).tolist()

    return PairDataset([[1, *ids(p - 1)] for p, _, _ in shapes], [ids(c) for _, c, _ in shapes],
                       [ids(r) for _, _, r in shapes])  # fmt: skip


def sharpen(model: PreTrainedModel, factor: float = SCALE) -> PreTrainedModel:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model.eval()


def make_tiny_qwen2(tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                    **overrides: object) -> Qwen2ForCausalLM:  # fmt: skip
    """A 2-layer Qwen2 of hidden size 32 (q/k/v biases, untied LM head, GQA 4/2 heads)."""
    torch.manual_seed(seed)
    settings: dict = {"use_sliding_window": False, **overrides}
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **settings,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def with_head_bias(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Replace the LM head by an untied copy with a random bias (exercises the bias path)."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.weight.shape[1], old.weight.shape[0], bias=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g))
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False
    return model


BUILDERS: dict[str, Callable[[PreTrainedTokenizerFast], PreTrainedModel]] = {
    "llama": lambda tok: sharpen(make_tiny_model(tok, seed=0)),
    "qwen2": lambda tok: sharpen(make_tiny_qwen2(tok, seed=0)),
    "llama-head-bias": lambda tok: sharpen(with_head_bias(make_tiny_model(tok, seed=1), 1)),
}

# Every valid (layout, chunked, attention): segments needs a packed layout.
CONFIGS = [(layout, chunked, attention) for layout in LAYOUTS for chunked in (True, False)
           for attention in ("segments", "mask") if not (attention == "segments" and layout == "padded")]  # fmt: skip


def preference_model(model: PreTrainedModel, segment_model: PreTrainedModel, *, chunked: bool,
                     attention: str) -> PreferenceModel:  # fmt: skip
    lm = segment_model if attention == "segments" else model
    return PreferenceModel(lm, chunked=chunked, attention=attention)


def reference(model: PreTrainedModel, data: PairDataset, index: list[int]) -> SequenceLogps:
    return PreferenceModel(model, chunked=False, attention="mask")(
        build_batch(data, index, "padded", PAD)
    )


def assert_sums_close(out: SequenceLogps, ref: SequenceLogps, atol: float = ATOL) -> None:
    torch.testing.assert_close(out.chosen, ref.chosen, rtol=0, atol=atol)
    torch.testing.assert_close(out.rejected, ref.rejected, rtol=0, atol=atol)
    assert torch.equal(out.chosen_lengths, ref.chosen_lengths)
    assert torch.equal(out.rejected_lengths, ref.rejected_lengths)


def wrap(model: PreTrainedModel, layout: str) -> PreferenceModel:
    """The plain computation for padded rows; segment attention and chunked head otherwise."""
    if layout == "padded":
        return PreferenceModel(model, chunked=False, attention="mask")
    switched = copy.deepcopy(model)
    use_segment_attention(switched)
    return PreferenceModel(switched, chunked=True, attention="segments")


@torch.no_grad()
def manual_logp(model: PreTrainedModel, prompt: list[int], response: list[int]) -> float:
    """log p(response | prompt): one unpadded sequence, log_softmax and a gather loop."""
    ids = prompt + response
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))


def eos_pairs(shapes: list[tuple[int, int, int]], seed: int) -> PairDataset:
    """Pairs of random non-special token ids with (prompt, chosen, rejected) lengths ``shapes``."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 380, (n,), generator=g).tolist()

    return PairDataset(
        [[1, *ids(p - 1)] for p, _, _ in shapes],
        [[*ids(c - 1), 2] for _, c, _ in shapes],
        [[*ids(r - 1), 2] for _, _, r in shapes],
    )


# Very different lengths in no particular order, so sorting by length reorders them.
EOS_SHAPES = [(40, 20, 30), (3, 2, 4), (25, 10, 3), (2, 3, 2), (60, 15, 25), (8, 5, 6), (4, 30, 2)]


def plain(model: PreTrainedModel) -> PreferenceModel:
    """The plain computation: padded rows, full logits, the model's own attention."""
    return PreferenceModel(model, chunked=False, attention="mask")
