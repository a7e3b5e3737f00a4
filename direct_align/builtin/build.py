"""Build (once) and cache the embedded default: a tiny base model and its preference data.

Recipe, as in the DPO paper's controlled-sentiment setting (Rafailov et al. 2023, §6.1):
1. train a byte-level BPE tokenizer on a synthetic review corpus (:mod:`.task`);
2. fit a tiny Llama (about 2M parameters) to the corpus: the SFT model, later the reference;
3. sample two continuations per review opening from that model and let the hidden true reward
   decide which one an annotator prefers (ties are skipped); ``label_noise`` flips a share of
   the labels, as disagreeing annotators would.

Everything is deterministic in ``BuiltinSpec.seed`` and lands in the user cache directory, built
in a temporary folder and renamed into place, so an interrupted build never leaves half a cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from direct_align.builtin.task import sample_corpus, sample_prompts, true_reward
from direct_align.builtin.tokenizer import build_tokenizer
from direct_align.data.prompts import encode_prompts
from direct_align.engine.tracking import progress
from direct_align.generation import sample

log = logging.getLogger(__name__)
RECIPE_VERSION = 2  # 2: a sample that decodes to blank text never enters a pair


@dataclass(frozen=True)
class BuiltinSpec:
    """Sizes of the built-in task; the defaults are the documented task."""

    seed: int = 0
    corpus_size: int = 20_000
    vocab_size: int = 512
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    sft_steps: int = 400
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    train_pairs: int = 2_000
    eval_pairs: int = 200
    held_out_prompts: int = 512
    max_new_tokens: int = 40

    def key(self) -> str:
        blob = json.dumps({"v": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return xxhash.xxh3_64(blob.encode()).hexdigest()


@dataclass(frozen=True)
class BuiltinAssets:
    """Paths of a built task: ``model_dir`` holds the base model and its tokenizer."""

    root: Path
    model_dir: Path
    eval_file: Path
    prompts_file: Path

    def train_file(self, label_noise: float, pairs: int = 0) -> Path:
        """Training pairs with ``label_noise`` of the labels flipped, and with ``pairs`` > 0 only
        a random ``pairs`` of them, the same ones for every seed (written on first use)."""
        subset = f"-n{pairs}" if pairs else ""
        path = self.root / f"train-noise{label_noise:.3f}{subset}.jsonl"
        if not path.exists():
            rows = [json.loads(line) for line in (self.root / "candidates.jsonl").open()]
            rng = random.Random(f"label-noise-{label_noise}")
            labelled = [_label(row, flip=rng.random() < label_noise) for row in rows]
            if pairs:
                keep = sorted(random.Random(f"subset-{pairs}").sample(range(len(labelled)),
                                                                      min(pairs, len(labelled))))  # fmt: skip
                labelled = [labelled[i] for i in keep]
            _write_jsonl(path, labelled)
        return path

    def thumbs_file(self, threshold: float, label_noise: float) -> Path:
        """The candidates' samples as unpaired feedback: each desirable when its hidden reward
        is above ``threshold``, ``label_noise`` of the labels flipped (written on first use)."""
        path = self.root / f"thumbs-t{threshold:.3f}-noise{label_noise:.3f}.jsonl"
        if not path.exists():
            rng = random.Random(f"thumbs-noise-{label_noise}")
            rows = []
            for row in (json.loads(line) for line in (self.root / "candidates.jsonl").open()):
                for text, reward in ((row["a"], row["reward_a"]), (row["b"], row["reward_b"])):
                    label = (reward > threshold) != (rng.random() < label_noise)
                    rows.append({"prompt": row["prompt"], "completion": text, "label": label})
            _write_jsonl(path, rows)
        return path

    def thumbs_eval_file(self, threshold: float) -> Path:
        """The held-out pairs' responses as unpaired feedback, labelled by the hidden reward."""
        path = self.root / f"thumbs-eval-t{threshold:.3f}.jsonl"
        if not path.exists():
            rows = [{"prompt": row["prompt"], "completion": text, "label": true_reward(text) > threshold}
                    for row in (json.loads(line) for line in self.eval_file.open())
                    for text in (row["chosen"], row["rejected"])]  # fmt: skip
            _write_jsonl(path, rows)
        return path

    def held_out_prompts(self, n: int) -> list[str]:
        prompts = json.loads(self.prompts_file.read_text())
        return prompts[:n]


def default_cache_dir() -> Path:
    if env := os.environ.get("DIRECT_ALIGN_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "direct_align"


def ensure_builtin(cache_dir: Path, spec: BuiltinSpec = BuiltinSpec()) -> BuiltinAssets:
    """The cached task for ``spec``, built first if absent (a few minutes on 2 CPU cores)."""
    root = cache_dir / "builtin" / f"v{RECIPE_VERSION}-{spec.key()}"
    assets = BuiltinAssets(root, root / "base", root / "eval.jsonl", root / "prompts.json")
    if (root / "DONE").exists():
        log.info("built-in task: using %s", root)
        return assets
    log.info("built-in task: building it once in %s", root)
    remove_abandoned_builds(root.parent)
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(tmp, spec)
        os.replace(tmp, root)
    except OSError:
        if not (root / "DONE").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return assets


def remove_abandoned_builds(parent: Path) -> None:
    """Delete the temporary folders of builds whose process is gone (killed mid-build); a
    build still running in another process keeps its folder."""
    for tmp in parent.glob("v*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("built-in task: removing %s, left by an interrupted build", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def _build(root: Path, spec: BuiltinSpec) -> None:
    tokenizer, model = build_base_model(spec)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    candidates, evals = build_pairs(model, tokenizer, spec)
    _write_jsonl(root / "candidates.jsonl", candidates)
    _write_jsonl(root / "eval.jsonl", evals)
    held_out = sample_prompts(spec.held_out_prompts, seed=spec.seed + 2)
    (root / "prompts.json").write_text(json.dumps(held_out, indent=0))
    (root / "DONE").write_text(json.dumps(dataclasses.asdict(spec)))


def build_base_model(spec: BuiltinSpec) -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    """The task's tokenizer and base model, trained from the seed (steps 1 and 2)."""
    torch.manual_seed(spec.seed)
    corpus = sample_corpus(spec.corpus_size, seed=spec.seed)
    tokenizer = build_tokenizer(corpus, vocab_size=spec.vocab_size)
    return tokenizer, _fit_base_model(corpus, tokenizer, spec)


def _fit_base_model(corpus: list[str], tokenizer: PreTrainedTokenizerFast,
                    spec: BuiltinSpec) -> LlamaForCausalLM:  # fmt: skip
    """Next-token training on the corpus: the SFT stage of the usual recipe."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = tokenizer(corpus, add_special_tokens=False).input_ids
    rows = [[tokenizer.bos_token_id, *r, tokenizer.eos_token_id] for r in ids]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_learning_rate, weight_decay=0.0)
    warmup = spec.sft_steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / spec.sft_steps)),
    )
    rng = random.Random(spec.seed)
    model.train()
    bar = progress(iterable=range(spec.sft_steps), desc="built-in task: base model (SFT)",
                   unit="step")
    for _ in bar:
        batch = rng.sample(rows, spec.sft_batch_size)
        width = max(map(len, batch))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in batch])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in batch])
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


def build_pairs(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                spec: BuiltinSpec) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(training candidates, labelled eval rows) of the task, checked as training reads them.

    Which samples come out blank can depend on the machine's floating-point path (the thread
    count, the CPU), so the rows are checked here, before anything is written: a row that
    training would refuse is a bug of this builder, never the user's to find.
    """
    candidates = _sample_candidates(model, tokenizer, spec.train_pairs + spec.eval_pairs, spec)
    train = candidates[: spec.train_pairs]
    evals = [_label(row, flip=False) for row in candidates[spec.train_pairs :]]
    check_rows([_label(row, flip=False) for row in train] + evals, tokenizer)
    return train, evals


def check_rows(rows: list[dict], tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise RuntimeError unless training's own reader accepts every standard-format row."""
    from datasets import Dataset

    from direct_align.data.formats import to_text_pairs
    from direct_align.errors import DataError

    try:
        to_text_pairs(Dataset.from_list(rows), fmt="standard", tokenizer=tokenizer,
                      source="built-in task")  # fmt: skip
    except DataError as e:
        raise RuntimeError(f"the built-in task's builder made a row training refuses: {e}") from e


def _sample_candidates(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                       n: int, spec: BuiltinSpec) -> list[dict]:  # fmt: skip
    """``n`` prompts with two non-blank samples of different true reward each (a blank text
    scores 0.5, so it could differ from the other's score and still make no usable pair)."""
    out: list[dict] = []
    seed = spec.seed + 1
    with progress(total=n, desc="built-in task: preference pairs", unit="pair") as bar:
        while len(out) < n:
            prompts = sample_prompts(n, seed=seed)
            ids = encode_prompts(tokenizer, prompts)
            kw = {"max_new_tokens": spec.max_new_tokens, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id, "batch_size": 128}  # fmt: skip
            first = tokenizer.batch_decode(sample(model, ids, seed=seed, **kw), skip_special_tokens=True)
            second = tokenizer.batch_decode(sample(model, ids, seed=seed + 10_000, **kw),
                                            skip_special_tokens=True)  # fmt: skip
            for prompt, a, b in zip(prompts, first, second):
                ra, rb = true_reward(a), true_reward(b)
                if ra != rb and a.strip() and b.strip() and len(out) < n:
                    out.append({"prompt": prompt, "a": a, "b": b, "reward_a": ra, "reward_b": rb})
                    bar.update(1)
            seed += 1
    return out


def _label(row: dict, *, flip: bool) -> dict:
    """A standard-format preference row: the higher true reward wins unless ``flip``."""
    a_wins = (row["reward_a"] > row["reward_b"]) != flip
    chosen, rejected = (row["a"], row["b"]) if a_wins else (row["b"], row["a"])
    return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written whole or not at all (another process may be reading the task)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
