"""Preference rows of the review domain in each supported format, for end-to-end tests.

The chosen response is a review of positive sentences, the rejected one of negative sentences,
so a model can learn the preference from word identity alone and held-out accuracy must rise.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from direct_align.builtin.task import _sentence, sample_prompts


def text_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (prompt, chosen, rejected) triples; responses start with a space, as continuations."""
    rng = random.Random(seed)
    out = []
    for prompt in sample_prompts(n, seed=seed):
        k = rng.randint(1, 2)
        chosen = " ".join(_sentence(rng, 1) for _ in range(k))
        rejected = " ".join(_sentence(rng, -1) for _ in range(k))
        out.append((prompt, " " + chosen, " " + rejected))
    return out


def rows(fmt: str, n: int, seed: int) -> list[dict]:
    """Rows of format ``standard``, ``implicit``, ``conversational`` (explicit prompt list) or
    ``ultrafeedback`` (a prompt string plus whole conversations, prompt implicit)."""
    out = []
    for prompt, chosen, rejected in text_pairs(n, seed):
        if fmt == "standard":
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": len(out)})
        elif fmt == "implicit":
            out.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            user = {"role": "user", "content": f"review: {prompt}"}
            good = {"role": "assistant", "content": chosen.strip()}
            bad = {"role": "assistant", "content": rejected.strip()}
            if fmt == "conversational":
                out.append({"prompt": [user], "chosen": [good], "rejected": [bad]})
            else:
                out.append({"prompt": user["content"], "chosen": [user, good],
                            "rejected": [user, bad], "score_chosen": 8.0})  # fmt: skip
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
