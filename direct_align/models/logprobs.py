"""Per-sequence log-prob sums of response tokens, for any batch layout.

:class:`PreferenceModel` wraps a Hugging Face causal LM as one module (so DDP/FSDP can wrap the
whole computation) that maps a :class:`~direct_align.data.packing.TokenBatch` to the response
log-prob sums of its chosen and rejected sequences.

With ``chunked=True`` only the hidden states that predict response tokens reach the LM head,
in chunks, and the chunk logits are recomputed in backward (:class:`ChunkedLogProbs`): the
``[tokens, vocab]`` logits of the batch never exist at once. With ``chunked=False`` the model's
own forward computes logits at every position, the plain computation the fast path must match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from transformers import PreTrainedModel

from direct_align.data.packing import TokenBatch
from direct_align.errors import ConfigError
from direct_align.models.attention import NO_MASK, SEGMENTS_KWARG

IGNORE = -100
# Logit transforms some architectures apply after the LM head; the chunked head does not.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier", "lm_head_multiplier")  # fmt: skip


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label token under the logits of the position before it.

    logits: [rows, T, vocab]; labels: [rows, T] (unshifted, IGNORE where no loss).
    Returns (logps [rows, T-1] zero where masked, mask [rows, T-1] bool).
    """
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logps = -F.cross_entropy(
        logits.float().flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none"
    ).view_as(labels)
    return torch.where(mask, logps, 0.0), mask  # not logps * mask: -inf * 0 would be NaN


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 128 MiB."""
    return max(16, min(4096, 2**25 // vocab_size))


class ChunkedLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target], chunk by chunk, recomputed in backward.

    hidden: [N, H]; weight: [V, H]; bias: [V] or None; target: [N]. Returns [N] fp32.
    Memory: one chunk of [chunk, V] fp32 logits at a time, plus the [N] log-sum-exps.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, chunk: int) -> torch.Tensor:  # fmt: skip
        w = weight.to(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[s : s + chunk], w, bias)
            out[s : s + chunk] = logits.gather(1, target[s : s + chunk, None]).squeeze(1)
            lse[s : s + chunk] = _logsumexp_(logits)
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk = chunk
        return out - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        hidden, weight, bias, target, lse = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            g = grad[s : s + ctx.chunk].float()
            # d logp / d logits = onehot(target) - softmax; scaled by the incoming gradient
            d = _logits(h, w, bias).sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            d.scatter_add_(1, target[s : s + ctx.chunk, None], g[:, None])
            if grad_b is not None:
                grad_b += d.sum(0)
            d = d.to(hidden.dtype)
            if grad_h is not None:
                grad_h[s : s + ctx.chunk] = d @ w
            if grad_w is not None:
                grad_w += (d.T @ h).float()
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)  # fmt: skip


# The chunk helpers work in place: on a CPU every fresh [chunk, vocab] buffer costs page faults,
# and the elementwise passes over it are memory-bound.
def _logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[c, V] fp32 logits of a chunk (a new tensor the caller may overwrite)."""
    logits = (h @ w.T).float()
    return logits if bias is None else logits.add_(bias.float())


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of [c, V] ``logits``, overwriting them. Returns [c]."""
    peak = logits.amax(-1, keepdim=True)
    return logits.sub_(peak).exp_().sum(-1).log_().add_(peak.squeeze(1))


@dataclass
class SequenceLogps:
    """Response log-prob sums (fp32) and token counts of a batch of ``B`` pairs, each [B]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


class PreferenceModel(nn.Module):
    """A causal LM seen as ``TokenBatch → SequenceLogps``.

    ``attention``: ``"segments"`` passes the row's sequences to the segment attention function
    (the model must use it, see :func:`~direct_align.models.attention.use_segment_attention`);
    ``"mask"`` lets the model's own attention (sdpa, eager) see packed rows through masks:
    restarting position ids for ``packed`` rows, an explicit 4-D mask for ``shared`` ones.
    Padded batches always use their 2-D attention mask.
    """

    def __init__(self, model: PreTrainedModel, *, chunked: bool = True, attention: str = "segments",
                 chunk_size: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.attention = attention
        self.chunk_size = chunk_size or default_chunk_size(model.config.get_text_config().vocab_size)
        if chunked:
            transforms = [a for a in _LOGIT_TRANSFORMS
                          if getattr(model.config.get_text_config(), a, None) not in (None, 1.0)]  # fmt: skip
            if transforms:
                raise ConfigError(f"{type(model).__name__} transforms its logits "
                                  f"({', '.join(transforms)}); use --no-chunked-logprobs")  # fmt: skip

    # FSDP sees the module it wraps, this one: accelerate shards each class the model lists in
    # _no_split_modules (its decoder layers) as a unit, puts tied embeddings in one unit, and
    # re-ties them after moving the model to the meta device. It groups the final norm with
    # the LM head, finding the norm among the children of getattr(self, base_model_prefix):
    # the decoder, so that the chunked head's weight is gathered when the trunk ends.
    base_model_prefix = "decoder"

    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.model, "_no_split_modules", None)

    @property
    def decoder(self) -> nn.Module:
        """The decoder trunk of the causal LM (its final norm is a direct child)."""
        return self.model.get_decoder()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def tie_weights(self) -> None:
        self.model.tie_weights()

    def forward(self, batch: TokenBatch) -> SequenceLogps:
        inputs = self._inputs(batch)
        if self.chunked:
            with record_function("direct_align: trunk"):
                hidden = self.model.get_decoder()(**inputs).last_hidden_state  # [R, T, H]
            with record_function("direct_align: lm_head"):
                head = self.model.get_output_embeddings()
                selected = hidden.flatten(0, 1)[batch.pred_index]  # [N, H]
                logps = ChunkedLogProbs.apply(selected, head.weight, head.bias, batch.target,
                                              self.chunk_size)  # fmt: skip
        else:
            logits = self.model(**inputs).logits  # [R, T, V]
            selected = logits.flatten(0, 1)[batch.pred_index].float()
            logps = selected.log_softmax(-1).gather(1, batch.target[:, None]).squeeze(1)
        rows = 2 * batch.num_pairs
        sums = torch.zeros(rows, dtype=torch.float32, device=logps.device).index_add(
            0, batch.seq_index, logps.float())
        lengths = torch.bincount(batch.seq_index, minlength=rows)
        b = batch.num_pairs
        return SequenceLogps(sums[:b], sums[b:], lengths[:b], lengths[b:])

    def _inputs(self, batch: TokenBatch) -> dict:
        inputs = {"input_ids": batch.input_ids, "use_cache": False}
        if batch.layout == "padded":
            return {**inputs, "attention_mask": batch.attention_mask}
        inputs["position_ids"] = batch.position_ids
        if self.attention == "segments":
            return {**inputs, "attention_mask": NO_MASK, SEGMENTS_KWARG: batch.segments}
        if batch.layout == "shared":
            inputs["attention_mask"] = shared_masks(batch, self.model)
        return inputs  # packed rows: transformers masks sequences by their position ids


def shared_masks(batch: TokenBatch, model: PreTrainedModel) -> torch.Tensor | dict[str, torch.Tensor]:
    """The explicit masks of a shared-prompt row for ``model``'s attention layers.

    A 4-D mask reaches every layer untouched, so a model with sliding-window layers gets a
    mapping from layer type to mask (transformers' models accept one), windowed where they slide.
    """
    config = model.config.get_text_config()
    full = dense_mask(batch, model.dtype)
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return full
    return {"full_attention": full,
            "sliding_attention": dense_mask(batch, model.dtype, window=config.sliding_window)}  # fmt: skip


def dense_mask(batch: TokenBatch, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """[1, 1, T, T] additive mask of a shared-prompt row (0 where attended, dtype min elsewhere).

    ``window``: a query sees only keys fewer than ``window`` positions before it, measured in
    position ids (a rejected token's distance to the prompt is that of its own sequence).
    """
    t = batch.input_ids.shape[1]
    segment = torch.full((t,), -1, dtype=torch.long)
    branch = torch.zeros(t, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected
    for k, s in enumerate(batch.segments):
        segment[s.start : s.start + s.length] = k
        branch[s.start + s.prompt : s.start + s.prompt + s.chosen] = 1
        branch[s.start + s.prompt + s.chosen : s.start + s.length] = 2
    pos = torch.arange(t)
    allowed = ((segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
               & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None])))  # fmt: skip
    if window is not None:
        ids = batch.position_ids[0].cpu()
        allowed &= ids[:, None] - ids[None, :] < window
    mask = torch.zeros(t, t, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.to(batch.input_ids.device)[None, None]
