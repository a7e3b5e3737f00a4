"""A synthetic movie-review domain with a hidden, programmatic sentiment reward.

In the spirit of the controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023,
section 6.1): prompts are prefixes of reviews, the policy continues them, and the true reward is
the sentiment of the continuation. The paper scores sentiment with a classifier; here it is a
lexicon count, so it is exact, cheap and cannot be gamed by anything but sentiment words.

The training code never sees :func:`true_reward`; it sees only which of two samples an annotator
preferred (see :mod:`direct_align.builtin.build`).
"""

from __future__ import annotations

import random
import re

SUBJECTS = (
    "the movie", "the film", "the story", "the acting", "the plot", "the ending", "the music",
    "the cast", "the script", "the dialogue", "the pacing", "the camera work", "the director",
    "the lead", "the soundtrack", "the effects", "the humour", "the final act",
)  # fmt: skip
POSITIVE = (
    "great", "wonderful", "brilliant", "charming", "moving", "superb", "delightful", "clever",
    "beautiful", "gripping", "funny", "fresh", "stunning", "warm", "excellent",
)  # fmt: skip
NEGATIVE = (
    "awful", "boring", "dull", "terrible", "weak", "bland", "clumsy", "tedious", "messy", "poor",
    "flat", "silly", "lifeless", "painful", "forgettable",
)  # fmt: skip
NEUTRAL = (
    "long", "short", "quiet", "loud", "simple", "slow", "dark", "familiar", "unusual", "busy",
)  # fmt: skip
INTENSIFIERS = ("very", "really", "quite", "truly", "rather", "pretty")
VERBS = {1: ("loved", "enjoyed", "liked", "adored"), -1: ("hated", "disliked", "regretted"),
         0: ("watched", "saw", "rented", "finished")}  # fmt: skip
ADJECTIVES = {1: POSITIVE, -1: NEGATIVE, 0: NEUTRAL}
VERDICTS = {1: "i would recommend it.", -1: "i would skip it.", 0: "it was a film."}

POSITIVE_WORDS = frozenset(POSITIVE) | frozenset(VERBS[1]) | {"recommend"}
NEGATIVE_WORDS = frozenset(NEGATIVE) | frozenset(VERBS[-1]) | {"skip"}
_WORD = re.compile(r"[a-z]+")


def true_reward(text: str) -> float:
    """Hidden sentiment of ``text`` in [0, 1]: the share of sentiment words that are positive.

    0.5 when the text holds no sentiment word. Bounded, so longer texts are not rewarded for
    their length, only for their tone.
    """
    words = _WORD.findall(text.lower())
    pos = sum(w in POSITIVE_WORDS for w in words)
    neg = sum(w in NEGATIVE_WORDS for w in words)
    return 0.5 if pos + neg == 0 else pos / (pos + neg)


def _sentence(rng: random.Random, polarity: int) -> str:
    subj, subj2 = rng.sample(SUBJECTS, 2)
    adj = rng.choice(ADJECTIVES[polarity])
    kind = rng.randrange(7)
    if kind == 0:
        return f"{subj} was {adj}."
    if kind == 1:
        return f"{subj} was {rng.choice(INTENSIFIERS)} {adj}."
    if kind == 2:
        return f"{subj} felt {adj}."
    if kind == 3:
        return f"i {rng.choice(VERBS[polarity])} {subj}."
    if kind == 4:
        other = rng.choice(ADJECTIVES[rng.choice((1, -1, 0))])
        return f"{subj} was {adj} but {subj2} was {other}."
    if kind == 5:
        return f"{subj} was {adj} and {rng.choice(ADJECTIVES[polarity])}."
    return VERDICTS[polarity]


def sample_review(rng: random.Random) -> str:
    """One review of 2 to 4 sentences; its overall tone is drawn first, then each sentence's."""
    p_positive = rng.choice((0.15, 0.5, 0.85))
    sentences = []
    for _ in range(rng.randint(2, 4)):
        r = rng.random()
        polarity = 0 if r < 0.2 else (1 if rng.random() < p_positive else -1)
        sentences.append(_sentence(rng, polarity))
    return " ".join(sentences)


def sample_corpus(n: int, seed: int) -> list[str]:
    """``n`` reviews, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [sample_review(rng) for _ in range(n)]


def sample_prompts(n: int, seed: int) -> list[str]:
    """``n`` review openings (2 to 4 words, as in the DPO paper's IMDb prefixes), deterministic.

    Openings end before any sentiment word, so the prompt leaves the tone to the policy.
    """
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        words = sample_review(rng).split()
        k = rng.randint(2, 4)
        prefix = words[:k]
        if any(w.endswith(".") or w in POSITIVE_WORDS or w in NEGATIVE_WORDS for w in prefix):
            continue
        prompts.append(" ".join(prefix))
    return prompts
