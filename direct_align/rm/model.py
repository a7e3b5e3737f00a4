"""Reward models as Hugging Face sequence classifiers: load one, and score token ids or texts.

A reward model here is ``AutoModelForSequenceClassification`` with ``num_labels=1``: the causal
LM's trunk and a linear head (``score``) that maps the hidden state of the last real token of
prompt + response to one number. Transformers finds that token as the rightmost one that is not
``config.pad_token_id``, so the pad id must be the tokenizer's, and rows are right-padded.
Inputs are tokenized exactly as training tokenizes pairs (:mod:`direct_align.data.tokenize`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from direct_align.data import PairBatch, fit_pair
from direct_align.data.prompts import encode_prompts
from direct_align.errors import ConfigError, one_line
from direct_align.models.loading import check_model_path, unread_model


def load_reward_model(name: str, tokenizer: PreTrainedTokenizerBase, *, option: str = "--model",
                      dtype: torch.dtype = torch.float32,
                      unread: bool = False) -> PreTrainedModel:  # fmt: skip
    """A reward model on the CPU, in ``dtype``: a saved one, or a causal LM with a fresh
    scalar head.

    The head of a causal LM is initialised from the global torch RNG (seed it first). The pad
    token id is set from ``tokenizer``, so that the last real token of each row is scored.
    ``unread``: built without reading its weights, which the main process will broadcast
    (:func:`~direct_align.models.loading.unread_model`).
    """
    check_model_path(name, option)
    path = str(Path(name).expanduser())
    try:
        if unread:
            model = unread_model(path, dtype, AutoModelForSequenceClassification,
                                 num_labels=1)  # fmt: skip
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                       dtype=dtype)  # fmt: skip
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{option}: cannot load '{name}' as a reward model "
                          f"(sequence classifier): {one_line(e)}") from None  # fmt: skip
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def pair_rewards(
    model: PreTrainedModel, batch: PairBatch
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Rewards ``([B], [B])`` of the chosen rows ``0..B-1`` and rejected rows ``B..2B-1``.

    One forward over the ``[2B, T]`` right-padded batch; each reward is the head's output at the
    row's last real token, in fp32.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    rewards = out.logits[:, 0].float()  # [2B]
    return rewards[: batch.num_pairs], rewards[batch.num_pairs :]


def encode_responses(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
    *, max_length: int | None = None, max_prompt_length: int | None = None,
    templated: bool = False,
) -> tuple[list[list[int]], list[list[int]]]:  # fmt: skip
    """Prompt and response ids as training tokenizes a pair (see :func:`tokenize_pairs`).

    Each text is tokenized on its own without special tokens; unless ``templated`` (texts
    rendered with the chat template), BOS goes before each prompt and EOS after each response.
    With ``max_length``, each prompt + response is truncated by the training rule (:func:`fit_pair`).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if templated:
        prompt_ids = [list(p) for p in tokenizer(list(prompts), add_special_tokens=False).input_ids]
    else:
        prompt_ids = encode_prompts(tokenizer, prompts)
    response_ids = [list(r) for r in tokenizer(list(responses), add_special_tokens=False).input_ids]
    eos = tokenizer.eos_token_id
    if not templated and eos is not None:
        response_ids = [r if r[-1:] == [eos] else [*r, eos] for r in response_ids]
    if max_length is not None:
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            fitted = fit_pair(p, r, r, max_length=max_length, max_prompt_length=max_prompt_length,
                              bos_id=tokenizer.bos_token_id)  # fmt: skip
            if fitted is None:
                raise ValueError(f"item {i}: no response token fits max_length={max_length}")
            prompt_ids[i], response_ids[i] = fitted[0], fitted[1]
    return prompt_ids, response_ids


@torch.no_grad()
def score_ids(
    model: PreTrainedModel,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    batch_size: int = 32,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Rewards ``[N]`` (fp32, on the CPU) of each prompt + response, in the given order.

    Rows are sorted by length and right-padded ``batch_size`` at a time, so little compute goes
    to padding; the result does not depend on the batching.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    device = next(model.parameters()).device
    pad = model.config.pad_token_id
    if pad is None:
        raise ValueError("model.config.pad_token_id is not set (load_reward_model sets it)")
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    rewards = torch.empty(len(rows))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(rows[i]) for i in index)
        ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in index])
        mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in index])
        with autocast():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        rewards[index] = out.logits[:, 0].float().cpu()
    model.train(was_training)
    return rewards


def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    templated: bool = False,
) -> torch.Tensor:
    """Rewards ``[N]`` of ``responses[i]`` to ``prompts[i]``, as the RM scored pairs in training.

    Prompts are plain text as in the standard data format (``templated=True``: already rendered
    with the chat template). Example, with a run's ``final/`` directory::

        tokenizer = AutoTokenizer.from_pretrained("runs/rm/final")
        model = load_reward_model("runs/rm/final", tokenizer)
        rewards = score(model, tokenizer, ["the movie"], [" was great."])  # shape [1]
    """
    prompt_ids, response_ids = encode_responses(
        tokenizer, prompts, responses, max_length=max_length,
        max_prompt_length=max_prompt_length, templated=templated,
    )  # fmt: skip
    return score_ids(model, prompt_ids, response_ids, batch_size=batch_size)
