"""`direct-align evaluate` on tiny models with a judge whose answers are known."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from commands import fail, run_here
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.cli import main
from direct_align.evaluation.run import base_of
from prefdata import rows, write_jsonl

JUDGE = "def count_e(prompts, responses):\n    return [r.count('e') for r in responses]\n"
SMALL = ["--max-new-tokens", "8", "--batch-size", "8", "--report-to", "none"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast,
          tiny_model_dir: Path) -> dict[str, Path]:  # fmt: skip
    """A second tiny model (the 'trained' one), HH-style pairs whose prompts repeat, a judge."""
    tmp = tmp_path_factory.mktemp("evaluate")
    trained = tmp / "trained"
    make_tiny_model(tiny_tokenizer, seed=9).save_pretrained(trained)
    tiny_tokenizer.save_pretrained(trained)
    pairs = rows("implicit", 12, seed=3)
    prefs = write_jsonl(tmp / "hh.jsonl", pairs + pairs[:4])  # 4 prompts twice: 12 distinct
    judge = tmp / "judge.py"
    judge.write_text(JUDGE)
    return {"trained": trained, "base": tiny_model_dir, "prefs": prefs, "judge": judge, "tmp": tmp}


def evaluate(files: dict[str, Path], out: Path, *extra: str, model: Path | None = None) -> dict:
    """`direct-align evaluate` of ``model`` (default: the trained one, against the base) on the
    HH file's prompts, judged by the e's of each sample; its evaluation.json."""
    which = ["--model", str(model)] if model else ["--model", str(files["trained"]), "--ref-model", str(files["base"])]
    args = ["evaluate", *which, "--prompts", str(files["prefs"]), "--reward", f"{files['judge']}:count_e",
            "--output-dir", str(out), *SMALL, *extra]  # fmt: skip
    assert run_here(args, files["tmp"] / "cache") == 0
    return json.loads((out / "evaluation.json").read_text())


def test_evaluate_reports_what_its_generations_say(files: dict[str, Path]) -> None:
    result = evaluate(files, files["tmp"] / "out")
    gens = [json.loads(line) for line in (files["tmp"] / "out" / "generations.jsonl").open()]
    assert result["prompts"]["count"] == len(gens) == 12  # the distinct prompts of the pairs
    # the judge's numbers are the e's of each sample, recomputed by hand from the texts
    for g in gens:
        assert g["policy_reward"] == g["policy"].count("e")
        assert g["reference_reward"] == g["reference"].count("e")
    report = result["report"]
    assert report["policy/reward"] == pytest.approx(sum(g["policy_reward"] for g in gens) / 12)
    assert report["reference/reward"] == pytest.approx(sum(g["reference_reward"] for g in gens) / 12)
    wins = sum(g["policy_reward"] > g["reference_reward"] for g in gens)
    ties = sum(g["policy_reward"] == g["reference_reward"] for g in gens)
    assert result["wins"] == {"wins": wins, "ties": ties, "losses": 12 - wins - ties}
    assert report["policy/win_rate"] == pytest.approx((wins + ties / 2) / 12)
    assert report["policy/kl"] == pytest.approx(sum(g["policy_kl"] for g in gens) / 12)
    assert report["policy/response_tokens"] == pytest.approx(sum(g["policy_tokens"] for g in gens) / 12)
    assert result["judges"] == {f"{files['judge']}:count_e": 1.0}
    # deterministic for a seed, and another seed samples otherwise
    again = evaluate(files, files["tmp"] / "again")
    assert again["report"] == report
    other = evaluate(files, files["tmp"] / "other", "--seed", "7")
    assert other["report"]["policy/reward"] != report["policy/reward"] or \
        other["report"]["policy/kl"] != report["policy/kl"]


def test_a_model_evaluated_against_its_base_read_from_its_card(files: dict[str, Path]) -> None:
    model = files["tmp"] / "same"
    shutil.copytree(files["base"], model)
    (model / "README.md").write_text(f"---\nlibrary_name: transformers\nbase_model: {files['base']}\n---\n")
    assert base_of(str(model)) == str(files["base"])
    result = evaluate(files, files["tmp"] / "same-out", "--max-prompts", "5", model=model)
    assert result["reference"] == str(files["base"]) and result["prompts"]["count"] == 5
    # the same weights sample the same responses with the same seed: all ties, no KL
    assert result["report"]["policy/kl"] == 0.0
    assert result["report"]["policy/win_rate"] == 0.5 and result["wins"]["ties"] == 5


def test_an_adapter_is_evaluated_against_its_base(files: dict[str, Path],
                                                  tiny_tokenizer: PreTrainedTokenizerFast) -> None:  # fmt: skip
    from peft import LoraConfig, get_peft_model

    from direct_align.models.loading import load_causal_lm

    adapter = files["tmp"] / "adapter"
    model = get_peft_model(load_causal_lm(str(files["base"])),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    model.save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    assert base_of(str(adapter)) == str(files["base"])
    result = evaluate(files, files["tmp"] / "adapter-out", "--max-prompts", "4", model=adapter)
    # a fresh LoRA adapter (B = 0) changes nothing: the merged model is its base
    assert result["reference"] == str(files["base"])
    assert result["report"]["policy/kl"] == pytest.approx(0.0, abs=1e-5)


def test_bad_input_is_one_line_and_creates_nothing(files: dict[str, Path],
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    tmp = files["tmp"]
    out = tmp / "never"
    base = ["evaluate", "--model", str(files["trained"]), "--ref-model", str(files["base"]),
            "--output-dir", str(out), *SMALL]  # fmt: skip
    no_prompts = write_jsonl(tmp / "texts.jsonl", [{"text": "hello"}])
    error = fail(capsys, [*base, "--prompts", str(no_prompts), "--reward", f"{files['judge']}:count_e"])
    assert "texts.jsonl: no prompts" in error
    assert "needs a judge" in fail(capsys, [*base, "--prompts", str(files["prefs"])])
    missing = fail(capsys, [*base, "--prompts", str(files["prefs"]), "--reward", "nowhere.py:judge"])
    assert "nowhere.py" in missing
    # a model with no README and no adapter config: its reference cannot be told
    orphan = fail(capsys, ["evaluate", "--model", str(files["trained"]), "--prompts", str(files["prefs"]),
                           "--reward", f"{files['judge']}:count_e", "--output-dir", str(out)])  # fmt: skip
    assert "cannot tell what it was trained from" in orphan and "--ref-model" in orphan
    assert "--model is required" in fail(capsys, ["evaluate", "--output-dir", str(out)])
    assert not out.exists()
    # a judge that returns words: one line naming it (exit 1), no evaluation.json
    words = tmp / "words.py"
    words.write_text("def judge(prompts, responses):\n    return ['good'] * len(responses)\n")
    with pytest.raises(SystemExit) as stop:
        main([*base, "--prompts", str(files["prefs"]), "--reward", f"{words}:judge"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and f"judge '{words}:judge'" in err[0], err
    assert not (out / "evaluation.json").exists()


def test_evaluate_reports_to_wandb(files: dict[str, Path]) -> None:
    from scripts.wandb_offline import read_runs

    out = files["tmp"] / "wandb-out"
    args = ["evaluate", "--model", str(files["trained"]), "--ref-model", str(files["base"]),
            "--prompts", str(files["prefs"]), "--reward", f"{files['judge']}:count_e",
            "--max-prompts", "3", "--max-new-tokens", "6", "--output-dir", str(out),
            "--report-to", "wandb", "--wandb-group", "evals"]  # fmt: skip
    assert run_here(args, files["tmp"] / "cache") == 0
    [run] = read_runs(out)
    assert run.group == "evals" and run.config["judges"] == {f"{files['judge']}:count_e": 1.0}
    assert [s for s, _ in run.curve("eval/policy/win_rate")] == [0]
    assert [n for _, n in run.curve("eval/generations/nrows")] == [3]  # every prompt's samples
