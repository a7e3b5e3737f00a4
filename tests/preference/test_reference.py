"""Reference scoring, fingerprints, cache keys and the on-disk reference cache."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.data import PairDataset
from direct_align.data.packing import build_batch
from direct_align.models.attention import use_segment_attention
from direct_align.models.logprobs import PreferenceModel
from direct_align.preference.reference import (
    ReferenceCache,
    ReferenceLogps,
    cache_key,
    cached_reference_logps,
    model_fingerprint,
    score_pairs,
    tokenizer_fingerprint,
)
from fastpath import EOS_SHAPES, eos_pairs, plain

CPU = torch.device("cpu")
PAD = 0
TOL = {"rel": 1e-6, "abs": 1e-5}


@pytest.fixture(scope="module")
def model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_tiny_model(tiny_tokenizer, seed=0).eval()


def fast(model: LlamaForCausalLM) -> PreferenceModel:
    """The default fast path: a copy on segment attention, chunked LM head."""
    switched = copy.deepcopy(model)
    use_segment_attention(switched)
    return PreferenceModel(switched, chunked=True, attention="segments")


# (layout, wrapper) of score_pairs: the plain padded computation and the fast layouts.
SCORERS = [("padded", plain), ("packed", fast), ("shared", fast), ("shared", plain)]


@pytest.fixture(scope="module")
def pairs() -> PairDataset:
    return eos_pairs(EOS_SHAPES, seed=0)


@torch.no_grad()
def one_at_a_time(model: LlamaForCausalLM, data: PairDataset) -> tuple[list[float], list[float]]:
    chosen, rejected = [], []
    for i in range(len(data)):
        out = plain(model)(build_batch(data, [i], "padded", PAD))
        chosen.append(out.chosen.item())
        rejected.append(out.rejected.item())
    return chosen, rejected


# ----------------------------------------------------------------------------- score_pairs


@pytest.mark.parametrize(("layout", "wrap"), SCORERS)
def test_score_pairs_equals_scoring_each_pair_alone(
    model: LlamaForCausalLM, pairs: PairDataset, layout: str,
    wrap: Callable[[LlamaForCausalLM], PreferenceModel],
) -> None:  # fmt: skip
    order = sorted(range(len(pairs)), key=pairs.pair_tokens)
    assert order != list(range(len(pairs)))  # the length sort really reorders the pairs
    seen: list[int] = []
    scorer = wrap(model)
    scorer.train()
    ref = score_pairs(scorer, pairs, batch_size=3, layout=layout, pad_token_id=PAD, device=CPU,
                      progress=seen.append)  # fmt: skip
    assert scorer.training and scorer.model.training  # the mode is restored
    assert seen == [3, 3, 1]
    assert ref.chosen.dtype == ref.rejected.dtype == torch.float32
    assert ref.chosen.shape == ref.rejected.shape == (len(pairs),)
    model.eval()
    chosen, rejected = one_at_a_time(model, pairs)
    for i in range(len(pairs)):
        assert ref.chosen[i].item() == pytest.approx(chosen[i], **TOL)
        assert ref.rejected[i].item() == pytest.approx(rejected[i], **TOL)
    # The sums differ enough between pairs that any mix-up of the order would show.
    assert len({round(v, 2) for v in chosen}) == len(pairs)


def test_reference_logps_select(model: LlamaForCausalLM, pairs: PairDataset) -> None:
    ref = score_pairs(plain(model), pairs, batch_size=4, layout="padded", pad_token_id=PAD,
                      device=CPU)  # fmt: skip
    c, r = ref.select(torch.tensor([5, 0, 5]))
    assert c.tolist() == [ref.chosen[5].item(), ref.chosen[0].item(), ref.chosen[5].item()]
    assert r.tolist() == [ref.rejected[5].item(), ref.rejected[0].item(), ref.rejected[5].item()]


# ----------------------------------------------------------------------------- fingerprints


def test_model_fingerprint_tracks_weights_and_dtype(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    a, b = make_tiny_model(tiny_tokenizer, seed=0), make_tiny_model(tiny_tokenizer, seed=0)
    fp = model_fingerprint(a)
    assert fp == model_fingerprint(a) == model_fingerprint(b)  # stable, and equal for equal weights
    assert fp != model_fingerprint(make_tiny_model(tiny_tokenizer, seed=1))

    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[3, 7] += 1e-6
    assert b.model.layers[1].mlp.up_proj.weight[3, 7] != a.model.layers[1].mlp.up_proj.weight[3, 7]
    assert model_fingerprint(b) != fp
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight.copy_(a.model.layers[1].mlp.up_proj.weight)
    assert model_fingerprint(b) == fp  # back to equal weights, back to the same key

    b.to(torch.bfloat16)
    assert model_fingerprint(b) != fp


def test_model_fingerprint_survives_a_save_load_round_trip(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    first = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    second = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert model_fingerprint(first) == model_fingerprint(second)


def test_model_fingerprint_does_not_depend_on_the_load_path(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    copied = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    first = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    second = AutoModelForCausalLM.from_pretrained(str(copied))
    assert all(torch.equal(first.state_dict()[k], v) for k, v in second.state_dict().items())
    assert model_fingerprint(first) == model_fingerprint(second)


def test_tokenizer_fingerprint_tracks_vocabulary_and_chat_template(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    fp = tokenizer_fingerprint(tiny_tokenizer)
    same = copy.deepcopy(tiny_tokenizer)
    assert tokenizer_fingerprint(same) == fp

    added = copy.deepcopy(tiny_tokenizer)
    assert added.add_tokens(["<extra_token>"]) == 1
    assert tokenizer_fingerprint(added) != fp

    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = tiny_tokenizer.chat_template.replace("\n", "\n\n")
    assert tokenizer_fingerprint(templated) != fp

    special = copy.deepcopy(tiny_tokenizer)
    special.pad_token = special.eos_token
    assert tokenizer_fingerprint(special) != fp
    assert tokenizer_fingerprint(tiny_tokenizer) == fp  # the copies did not touch the original


def test_tokenizer_fingerprint_does_not_depend_on_the_last_call(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    fp = tokenizer_fingerprint(tok)
    tok(["the film", "a much longer review of the film"], padding=True)
    assert tokenizer_fingerprint(tok) == fp


# ----------------------------------------------------------------------------- cache keys


def test_cache_key_changes_with_every_part_and_ignores_order() -> None:
    parts = {"model": "m1", "tokenizer": "t1", "data": "d1", "precision": "fp32", "version": "1"}
    key = cache_key(parts)
    assert key == cache_key(dict(reversed(list(parts.items()))))
    assert len(key) == 32 and int(key, 16) >= 0  # a hex digest usable as a file name
    changed = {cache_key({**parts, name: value + "x"}) for name, value in parts.items()}
    assert len(changed) == len(parts) and key not in changed
    assert cache_key({**parts, "extra": ""}) != key
    # Names matter, not only values: swapping two values is another key.
    assert cache_key({**parts, "model": "t1", "tokenizer": "m1"}) != key


# ----------------------------------------------------------------------------- ReferenceCache


def test_cache_round_trip(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path / "nested" / "cache")
    ref = ReferenceLogps(torch.tensor([-1.5, -2.25, -30.0]), torch.tensor([-4.0, -0.5, -7.75]))
    path = cache.save("abc", ref, {"model": "m", "split": "train"})
    assert path == cache.path("abc") == tmp_path / "nested" / "cache" / "abc.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["abc.safetensors"]  # no temp file left
    loaded = cache.load("abc", 3)
    assert loaded is not None
    assert torch.equal(loaded.chosen, ref.chosen) and torch.equal(loaded.rejected, ref.rejected)
    assert cache.load("other", 3) is None


def test_cache_rejects_wrong_length_and_non_finite_values(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path)
    cache.save("k", ReferenceLogps(torch.full((4,), -1.0), torch.full((4,), -2.0)), {})
    assert cache.load("k", 4) is not None
    assert cache.load("k", 3) is None
    assert cache.load("k", 5) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.full((4,), -1.0)
        values[2] = bad
        cache.save("bad", ReferenceLogps(torch.full((4,), -1.0), values), {})
        assert cache.load("bad", 4) is None
        cache.save("bad", ReferenceLogps(values, torch.full((4,), -1.0)), {})
        assert cache.load("bad", 4) is None
    # chosen and rejected of different lengths
    cache.save("mixed", ReferenceLogps(torch.zeros(4), torch.zeros(3)), {})
    assert cache.load("mixed", 4) is None and cache.load("mixed", 3) is None


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "missing_tensor"])
def test_cache_treats_a_damaged_file_as_absent(tmp_path: Path, damage: str) -> None:
    cache = ReferenceCache(tmp_path)
    path = cache.save("k", ReferenceLogps(torch.zeros(5), torch.ones(5)), {"a": "b"})
    if damage == "garbage":
        path.write_bytes(bytes(range(256)) * 3)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    else:
        save_file({"chosen": torch.zeros(5)}, str(path))
    assert cache.load("k", 5) is None


def test_cache_rejects_finite_values_that_differ_from_what_was_written(tmp_path: Path) -> None:
    """A bit flipped on disk, or an edited file: the values are finite and of the right length,
    so only the checksum written with them can tell."""
    cache = ReferenceCache(tmp_path)
    path = cache.save("k", ReferenceLogps(torch.full((5,), -3.0), torch.full((5,), -4.0)), {"a": "b"})
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file({"chosen": torch.tensor([-3.0, -3.0, -2.5, -3.0, -3.0]), "rejected": torch.full((5,), -4.0)},
              str(path), metadata=metadata)  # fmt: skip
    assert cache.load("k", 5) is None


# ----------------------------------------------------------------------------- cached_reference_logps


def test_cached_reference_logps_computes_then_reuses_and_tracks_inputs(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast, pairs: PairDataset
) -> None:
    lm = make_tiny_model(tiny_tokenizer, seed=4).eval()
    model = fast(lm)  # what training uses by default
    cache = ReferenceCache(tmp_path / "ref")
    evals = eos_pairs([(5, 4, 6), (9, 3, 3), (2, 7, 5)], seed=9)
    settings = {"precision": "fp32", "version": "1"}

    def run(splits: dict[str, PairDataset], scorer: PreferenceModel | None = None, **kw: object):
        kw = {"settings": settings, **kw}
        return cached_reference_logps(scorer or model, tiny_tokenizer, splits, cache=cache,
                                      batch_size=3, layout="shared", pad_token_id=PAD,
                                      device=CPU, **kw)  # fmt: skip

    first, status = run({"train": pairs, "eval": evals})
    assert set(status) == {"train", "eval"}
    assert all(s.startswith("computed ") for s in status.values())
    paths = {name: Path(s.split(" ", 1)[1]) for name, s in status.items()}
    assert all(p.is_file() and p.parent == cache.root for p in paths.values())
    assert paths["train"] != paths["eval"]
    chosen, rejected = one_at_a_time(lm, pairs)
    assert first["train"].chosen.tolist() == pytest.approx(chosen, **TOL)
    assert first["train"].rejected.tolist() == pytest.approx(rejected, **TOL)

    second, status = run({"train": pairs, "eval": evals})
    assert status == {name: f"reused {p}" for name, p in paths.items()}
    for name in ("train", "eval"):
        assert torch.equal(second[name].chosen, first[name].chosen)
        assert torch.equal(second[name].rejected, first[name].rejected)
    # The key is that of the wrapped LM's weights: another wrapper around equal weights reuses it.
    _, status = run({"train": pairs}, scorer=fast(copy.deepcopy(lm)))
    assert status == {"train": f"reused {paths['train']}"}

    # One token of one pair differs: that split is recomputed, the other reused.
    changed = PairDataset(evals.prompt_ids, [list(c) for c in evals.chosen_ids], evals.rejected_ids)
    changed.chosen_ids[1][0] += 1
    _, status = run({"train": pairs, "eval": changed})
    assert status["train"] == f"reused {paths['train']}"
    assert status["eval"].startswith("computed ") and str(paths["eval"]) not in status["eval"]

    # Other settings (precision): everything is recomputed under new keys.
    _, status = run({"train": pairs, "eval": evals}, settings={**settings, "precision": "bf16"})
    assert all(s.startswith("computed ") for s in status.values())
    assert not set(status.values()) & {str(p) for p in paths.values()}

    # Other weights: recomputed too.
    with torch.no_grad():
        model.model.model.norm.weight[0] += 1e-3
    updated, status = run({"train": pairs})
    assert status["train"].startswith("computed ") and str(paths["train"]) not in status["train"]
    assert not torch.equal(updated["train"].chosen, first["train"].chosen)


def test_cached_reference_logps_recomputes_over_a_damaged_file(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast, pairs: PairDataset
) -> None:
    model = plain(make_tiny_model(tiny_tokenizer, seed=5).eval())
    cache = ReferenceCache(tmp_path)
    kwargs = dict(cache=cache, settings={"precision": "fp32"}, batch_size=4, layout="padded",
                  pad_token_id=PAD, device=CPU)  # fmt: skip
    first, status = cached_reference_logps(model, tiny_tokenizer, {"train": pairs}, **kwargs)
    path = Path(status["train"].split(" ", 1)[1])
    path.write_bytes(b"\x00" * 64)
    again, status = cached_reference_logps(model, tiny_tokenizer, {"train": pairs}, **kwargs)
    assert status["train"] == f"computed {path}"
    assert torch.equal(again["train"].chosen, first["train"].chosen)
    assert cache.load(path.stem, len(pairs)) is not None  # the file was rewritten
