"""`direct-align label` (sample, judge, write pairs) and `direct-align select` (rank candidate
pairs by the policy's uncertainty), in process through the CLI entry point on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.builtin.task import sample_prompts
from direct_align.cli import main
from direct_align.data import prepare_pairs
from direct_align.generation import score_responses
from direct_align.rm.model import encode_responses
from prefdata import text_pairs, write_jsonl

JUDGE_PY = """
def letter_e(prompts, responses):
    return [float(r.count("e")) for r in responses]
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("label")
    (path / "judge.py").write_text(JUDGE_PY)
    write_jsonl(path / "prompts.jsonl", [{"prompt": p} for p in sample_prompts(12, seed=8)])
    write_jsonl(path / "candidates.jsonl", [{"prompt": p, "a": c, "b": r, "id": i}
                                            for i, (p, c, r) in enumerate(text_pairs(10, seed=9))])  # fmt: skip
    return path


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``direct-align ARGS`` in process: (exit status, stdout, last line of stderr)."""
    try:
        main(args)
        status = 0
    except SystemExit as e:
        status = int(e.code or 0)
    out = capsys.readouterr()
    return status, out.out, out.err.strip().splitlines()[-1] if out.err.strip() else ""


def test_label_writes_scored_pairs_that_train_reads(inputs: Path, tiny_model_dir: Path,
                                                    tiny_tokenizer: PreTrainedTokenizerFast,
                                                    tmp_path: Path, capsys) -> None:  # fmt: skip
    out = tmp_path / "labelled.jsonl"
    status, stdout, err = run(["label", "--model", str(tiny_model_dir), "--dataset",
                               str(inputs / "prompts.jsonl"), "--reward",
                               f"{inputs / 'judge.py'}:letter_e", "--samples-per-prompt", "4",
                               "--max-new-tokens", "10", "--output", str(out)], capsys)  # fmt: skip
    assert status == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) <= 12 and f"{len(rows)} pairs from 12 prompts (48 judge calls" in stdout
    prompts = {p for p in sample_prompts(12, seed=8)}
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
        assert row["prompt"] in prompts
        # the scores are the judge's, and the chosen response is the better one
        assert row["score_chosen"] == row["chosen"].count("e") > row["rejected"].count("e")
        assert row["score_rejected"] == row["rejected"].count("e")
    data = prepare_pairs(str(out), tiny_tokenizer, max_length=64)
    assert data.format == "standard" and len(data.pairs) == len(rows)

    again = run(["label", "--model", str(tiny_model_dir), "--dataset",
                 str(inputs / "prompts.jsonl"), "--output", str(out)], capsys)  # fmt: skip
    assert again[0] == 2 and again[2] == (f"error: --output: '{out}' exists; pass "
                                                  "--overwrite to replace it")  # fmt: skip


def test_label_with_a_failing_judge_writes_nothing(inputs: Path, tiny_model_dir: Path,
                                                   tmp_path: Path, capsys) -> None:  # fmt: skip
    (tmp_path / "bad.py").write_text("def judge(prompts, responses):\n    return [1.0, 2.0]\n")
    out = tmp_path / "labelled.jsonl"
    status, _, err = run(["label", "--model", str(tiny_model_dir), "--dataset",
                          str(inputs / "prompts.jsonl"), "--reward", f"{tmp_path / 'bad.py'}:judge",
                          "--max-new-tokens", "4", "--output", str(out)], capsys)  # fmt: skip
    assert status == 1 and not out.exists()
    assert err == f"error: judge '{tmp_path / 'bad.py'}:judge': returned 2 scores for 24 responses"


@torch.no_grad()
def test_select_ranks_by_the_dpo_margin(inputs: Path, tiny_tokenizer: PreTrainedTokenizerFast,
                                        tmp_path: Path, capsys) -> None:  # fmt: skip
    policy, reference = make_tiny_model(tiny_tokenizer, seed=1), make_tiny_model(tiny_tokenizer, seed=2)
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "ranked.jsonl"
    status, stdout, err = run(["select", "--model", str(tmp_path / "policy"), "--ref-model",
                               str(tmp_path / "reference"), "--dataset",
                               str(inputs / "candidates.jsonl"), "--beta", "0.5", "--top", "4",
                               "--output", str(out)], capsys)  # fmt: skip
    assert status == 0, err
    assert "4 of 10 candidates ranked" in stdout
    ranked = [json.loads(line) for line in out.read_text().splitlines()]

    # the DPO margin by hand: β·[(π(a) − ref(a)) − (π(b) − ref(b))], unbatched sums
    triples = text_pairs(10, seed=9)
    prompts = [p for p, _, _ in triples]
    p_ids, a_ids = encode_responses(tiny_tokenizer, prompts, [a for _, a, _ in triples], max_length=512)
    _, b_ids = encode_responses(tiny_tokenizer, prompts, [b for _, _, b in triples], max_length=512)
    pad = tiny_tokenizer.pad_token_id

    def logps(model, ids):
        return score_responses(model, p_ids, ids, pad_token_id=pad, batch_size=1)

    margin = 0.5 * ((logps(policy, a_ids) - logps(reference, a_ids))
                    - (logps(policy, b_ids) - logps(reference, b_ids)))  # fmt: skip
    expected = torch.argsort(margin.abs()).tolist()[:4]
    assert [r["id"] for r in ranked] == expected and [r["rank"] for r in ranked] == [0, 1, 2, 3]
    assert [r["margin"] for r in ranked] == pytest.approx(margin[expected].tolist(), abs=1e-4)
    assert margin.abs().max() > 10 * margin[expected[0]].abs()  # the ranking is not trivial


def test_select_needs_a_reference_for_dpo_but_not_for_simpo(inputs: Path, tiny_model_dir: Path,
                                                            tmp_path: Path, capsys) -> None:  # fmt: skip
    args = ["select", "--model", str(tiny_model_dir), "--dataset", str(inputs / "candidates.jsonl"),
            "--output", str(tmp_path / "r.jsonl")]  # fmt: skip
    status, _, err = run(args, capsys)
    assert status == 2 and err.startswith("error: --ref-model is needed: dpo's implicit reward")
    status, _, err = run([*args, "--loss", "simpo"], capsys)
    assert status == 0, err
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 10


def test_select_names_missing_columns(inputs: Path, tiny_model_dir: Path, tmp_path: Path,
                                      capsys) -> None:  # fmt: skip
    status, _, err = run(["select", "--model", str(tiny_model_dir), "--dataset",
                          str(inputs / "prompts.jsonl"), "--loss", "simpo", "--output",
                          str(tmp_path / "r.jsonl")], capsys)  # fmt: skip
    assert status == 2
    assert err == (f"error: {inputs / 'prompts.jsonl'}: candidate pairs need columns "
                           "prompt, a and b (missing: a, b; columns: prompt)")  # fmt: skip
