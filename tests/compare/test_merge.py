"""scripts/merge_comparisons.py: rows of comparisons run apart, merged only when the protocol is
the same (task, seeds, reward models, reference)."""

from __future__ import annotations

import pytest

from scripts.merge_comparisons import merge
from tests.compare.test_compare import _fake_row


def result(rows: list[dict], accuracy: float = 0.97, seeds: tuple[int, ...] = (1,)) -> dict:
    return {"task": "builtin", "quick": False, "seeds": list(seeds), "rows": rows,
            "runtime_s": 10.0, "reward_models": [{"seed": s, "eval": {"eval/rewards/accuracies": accuracy}}
                                                 for s in seeds]}  # fmt: skip


def test_later_methods_replace_earlier_ones_and_the_rest_is_kept() -> None:
    old = result([_fake_row("dpo", 0.1, 1, 0.8, 2.0), _fake_row("ppo", 0.05, 1, 0.9, 2.5)])
    new = result([_fake_row("ppo", 0.05, 1, 0.95, 2.5), _fake_row("rloo", 0.05, 1, 0.93, 2.0)])
    merged = merge([old, new], ["old.json", "new.json"])
    assert [(r["method"], r["true_reward"]) for r in merged["rows"]] == [
        ("dpo", 0.8), ("ppo", 0.95), ("rloo", 0.93)]
    assert {h["method"] for h in merged["headline"]} == {"dpo", "ppo", "rloo"}
    assert merged["runtime_s"] == 20.0
    assert [m["methods"] for m in merged["merged_from"]] == [["dpo", "ppo"], ["ppo", "rloo"]]


@pytest.mark.parametrize(("new", "message"), [
    (result([], seeds=(2,)), "seeds"),
    (result([], accuracy=0.5), "reward models differ"),
    (result([{**_fake_row("rloo", 0.05, 1, 0.9, 2.0), "reference_true_reward": 0.5}]),
     "reference's reward differs"),
])  # fmt: skip
def test_a_different_protocol_is_refused(new: dict, message: str) -> None:
    old = result([_fake_row("dpo", 0.1, 1, 0.8, 2.0)])
    with pytest.raises(SystemExit, match=message):
        merge([old, new], ["old.json", "new.json"])
