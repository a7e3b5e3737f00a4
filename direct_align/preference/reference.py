"""Reference log-probs: computed once per (reference, tokenizer, data, settings), cached on disk.

The cache key is a fingerprint of everything that changes the numbers: the reference weights
(hashed tensor by tensor, as loaded), the tokenizer, the tokenized pairs (which capture the data,
the format, the chat template and the truncation settings) and the compute precision. A second
run with the same inputs reads the file; a change to any input gives a new key, so a stale cache
can never be used. Files are written atomically and validated when read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import xxhash
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from direct_align.data import PairDataset
from direct_align.data.packing import build_batch
from direct_align.engine.tracking import progress
from direct_align.models.logprobs import PreferenceModel
from direct_align.models.lora import adapters_disabled, base_state_dict

log = logging.getLogger(__name__)
FORMAT_VERSION = "2"  # 2: files carry a checksum of their sums
_LOCATION_KEYS = ("_name_or_path", "_commit_hash")


@dataclass
class ReferenceLogps:
    """Reference log-prob sums of the responses of every pair, in dataset order."""

    chosen: torch.Tensor  # [N] float32
    rejected: torch.Tensor  # [N] float32

    def select(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums of the pairs at ``index`` [B] → ([B], [B])."""
        return self.chosen[index], self.rejected[index]


def model_fingerprint(model: PreTrainedModel) -> str:
    """xxh3-128 over the architecture and every parameter and buffer: names, dtypes, shapes, bytes.

    The directory the model was loaded from is left out: the same weights moved or copied keep
    their fingerprint. A LoRA model is fingerprinted by its base weights, what it computes with
    its adapters disabled, so its reference cache is the base model's.
    """
    h = xxhash.xxh3_128()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _LOCATION_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(base_state_dict(model).items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """xxh3-128 of the vocabulary, merges, normalisation, special tokens and chat template.

    The padding and truncation state that the last call left on a fast tokenizer is left out.
    """
    h = xxhash.xxh3_128()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {k: v for k, v in json.loads(backend.to_str()).items()
                 if k not in ("padding", "truncation")}  # fmt: skip
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def cache_key(parts: dict[str, str]) -> str:
    """One key from named fingerprints and settings (order-independent)."""
    return xxhash.xxh3_128(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def score_pairs(
    model: PreferenceModel,
    pairs: PairDataset,
    *,
    batch_size: int,
    layout: str,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress: Callable[[int], None] | None = None,
) -> ReferenceLogps:
    """Log-prob sums of every pair under ``model``, batched by length to waste little padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=pairs.pair_tokens)
    chosen = torch.empty(len(pairs), dtype=torch.float32)
    rejected = torch.empty(len(pairs), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = build_batch(pairs, index, layout, pad_token_id).to(device)
        with autocast():
            out = model(batch)
        chosen[index] = out.chosen.float().cpu()
        rejected[index] = out.rejected.float().cpu()
        if progress is not None:
            progress(len(index))
    model.train(was_training)
    return ReferenceLogps(chosen, rejected)


def _sharded(score: Callable[[PairDataset], ReferenceLogps], pairs: PairDataset,
             accelerator: Accelerator) -> ReferenceLogps:  # fmt: skip
    """``score`` of this process's share of ``pairs``, summed with the others' into the whole.

    Every process scores as many pairs (a short share repeats a pair, whose sums are dropped):
    a sharded (FSDP) model communicates in every forward, so all must run as many.
    """
    n, world = len(pairs), accelerator.num_processes
    mine = list(range(accelerator.process_index, n, world))
    part = score(pairs.subset(mine + [0] * (-(-n // world) - len(mine))))
    whole = torch.zeros(2, n, dtype=torch.float32, device=accelerator.device)
    whole[0, mine] = part.chosen[: len(mine)].to(accelerator.device)
    whole[1, mine] = part.rejected[: len(mine)].to(accelerator.device)
    whole = accelerator.reduce(whole, "sum").cpu()  # the shares are disjoint
    return ReferenceLogps(whole[0], whole[1])


def score_shared(model: PreferenceModel, pairs: PairDataset, *, accelerator: Accelerator,
                 **options: Any) -> ReferenceLogps:  # fmt: skip
    """:func:`score_pairs` (``options`` are its keywords), sharded among the processes of
    ``accelerator`` when there are several; every process gets the sums of all pairs."""
    score = partial(score_pairs, model, **options)
    return score(pairs) if accelerator.num_processes == 1 else _sharded(score, pairs, accelerator)


def _checksum(ref: ReferenceLogps) -> str:
    """xxh3-64 of the sums' bytes, stored with them and checked when they are read back."""
    h = xxhash.xxh3_64()
    for t in (ref.chosen, ref.rejected):
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class ReferenceCache:
    """A directory of ``<key>.safetensors`` files, one per (reference, data split)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, n_pairs: int) -> ReferenceLogps | None:
        """The cached sums, or None when absent or unusable (then they are recomputed)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
            ref = ReferenceLogps(tensors["chosen"], tensors["rejected"])
        except (SafetensorError, KeyError, OSError) as e:
            log.warning("reference cache %s is unreadable (%s); recomputing", path, e)
            return None
        ok = ref.chosen.shape == ref.rejected.shape == (n_pairs,)
        if not ok or not (torch.isfinite(ref.chosen).all() and torch.isfinite(ref.rejected).all()):
            log.warning("reference cache %s does not match the data; recomputing", path)
            return None
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("checksum")
        if stored != _checksum(ref):  # finite but altered values (or a file without one)
            log.warning("reference cache %s fails its checksum; recomputing", path)
            return None
        return ref

    def save(self, key: str, ref: ReferenceLogps, metadata: dict[str, str]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        meta = {**metadata, "format_version": FORMAT_VERSION, "created": time.ctime(),
                "checksum": _checksum(ref)}
        save_file({"chosen": ref.chosen.contiguous(), "rejected": ref.rejected.contiguous()},
                  str(tmp), metadata=meta)  # fmt: skip
        os.replace(tmp, path)
        return path


def cached_reference_logps(
    model: PreferenceModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, PairDataset],
    *,
    cache: ReferenceCache,
    settings: dict[str, str],
    batch_size: int,
    layout: str,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    accelerator: Accelerator | None = None,
    fingerprint: str | None = None,
    check_stop: Callable[[], None] | None = None,
) -> tuple[dict[str, ReferenceLogps], dict[str, str]]:
    """Reference sums of each split (e.g. train, eval), from the cache or computed and stored.

    With an ``accelerator`` of several processes, each scores every ``num_processes``-th pair,
    the sums are gathered into every process, and the main process writes the cache.
    ``fingerprint``: the model's :func:`model_fingerprint`, taken before it was sharded (a
    sharded model holds a part of its weights in each process). ``check_stop`` is called after
    every batch (in every process alike), to stop on a signal; the splits already scored are
    cached by then.
    Returns ({split: sums}, {split: "reused <path>" | "computed <path>"}).
    """
    processes = accelerator.num_processes if accelerator is not None else 1
    model_fp = fingerprint or model_fingerprint(model.model)
    parts = {"model": model_fp, "tokenizer": tokenizer_fingerprint(tokenizer),
             "format_version": FORMAT_VERSION, **settings}  # fmt: skip
    results: dict[str, ReferenceLogps] = {}
    status: dict[str, str] = {}
    for name, pairs in splits.items():
        key = cache_key({**parts, "data": pairs.fingerprint()})
        ref = cache.load(key, len(pairs))
        if ref is not None:
            log.info("reference log-probs (%s): reusing cache %s", name, cache.path(key))
            status[name] = f"reused {cache.path(key)}"
        else:
            log.info("reference log-probs (%s): scoring %d pairs once", name, len(pairs))
            with progress(total=len(pairs), desc=f"reference ({name})", unit="pair",
                          leave=False) as bar:  # fmt: skip
                def advance(n: int, bar: Any = bar) -> None:
                    bar.update(n)
                    if check_stop is not None:
                        check_stop()

                score = partial(score_pairs, model, batch_size=batch_size, layout=layout,
                                pad_token_id=pad_token_id, device=device, autocast=autocast,
                                progress=advance)  # fmt: skip
                ref = score(pairs) if processes == 1 else _sharded(score, pairs, accelerator)
            path = cache.path(key)
            if accelerator is None or accelerator.is_main_process:
                path = cache.save(key, ref, {**parts, "split": name, "pairs": str(len(pairs))})
            log.info("reference log-probs (%s): cached in %s", name, path)
            status[name] = f"computed {path}"
        results[name] = ref
    return results, status


def score_sharded(score: Callable[..., tuple[dict[str, ReferenceLogps], dict[str, str]]],
                  policy: PreferenceModel, *, fingerprint: str,
                  status: dict[str, str]) -> dict[str, ReferenceLogps]:  # fmt: skip
    """``score`` (:func:`cached_reference_logps` with its other arguments) of the prepared,
    sharded initial ``policy`` (with LoRA, its adapters off) under the ``fingerprint`` of its
    whole weights, taken before sharding; the cache status goes into ``status``."""
    with adapters_disabled(policy):
        refs, found = score(policy, fingerprint=fingerprint)
    status.update(found)
    return refs
