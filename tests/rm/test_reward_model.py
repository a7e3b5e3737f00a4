"""Reward models: the Bradley-Terry loss by hand, where the reward is read, scoring, and
`direct-align train-rm` end to end on a tiny local Llama."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from commands import assert_ok, fail, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from direct_align.builtin.build import RECIPE_VERSION, BuiltinSpec
from direct_align.builtin.task import true_reward
from direct_align.config import resolve
from direct_align.data import PairDataset, collate_pairs, prepare_pairs
from direct_align.rm.evaluate import RewardEval, average_ranks, pearson, spearman
from direct_align.rm.loss import bradley_terry_loss
from direct_align.rm.model import encode_responses, load_reward_model, pair_rewards, score
from direct_align.rm.run import hidden_reward_agreement, run_train_rm
from direct_align.rm.settings import RewardConfig
from prefdata import rows, text_pairs, write_jsonl

TINY_RM = ["--learning-rate", "1e-2", "--batch-size", "16", "--epochs", "2", "--max-length", "64"]


# --- the loss ------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand() -> None:
    """r_c = [2, 0], r_r = [0, 1], so the margins are [2, −1]:
    −log σ(2) = log(1 + e^−2) = 0.126928, −log σ(−1) = log(1 + e) = 1.313262, mean 0.720095.
    Centering with c = 0.1: (r_c + r_r)² = [4, 1], mean 2.5, adds 0.25 → 0.970095.
    One pair of two has r_c > r_r; mean margin 0.5; mean rewards 1.0 and 0.5."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.720095, abs=1e-6)
    assert metrics == pytest.approx({"rewards/chosen": 1.0, "rewards/rejected": 0.5,
                                     "rewards/margins": 0.5, "rewards/accuracies": 0.5})  # fmt: skip
    centered, _ = bradley_terry_loss(chosen, rejected, center_coef=0.1)
    assert centered.item() == pytest.approx(0.970095, abs=1e-6)


def test_loss_gradient_by_hand_and_ties_count_as_wrong() -> None:
    """d/dr_c of −log σ(r_c − r_r) is −σ(r_r − r_c); at a tie σ(0) = 1/2, over B = 1 pair.
    The centering term adds 2c(r_c + r_r) = 2 · 0.5 · 2 = 2 to both gradients."""
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([1.0], requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, rejected, center_coef=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * 4)
    assert chosen.grad.item() == pytest.approx(-0.5 + 2.0)
    assert rejected.grad.item() == pytest.approx(0.5 + 2.0)
    assert metrics["rewards/accuracies"] == 0.0


# --- the model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    return load_reward_model(str(tiny_model_dir), tiny_tokenizer).eval()


def test_fresh_head_on_the_causal_lm_trunk_is_seeded(tiny_model_dir, tiny_tokenizer, reward_model):
    assert reward_model.config.num_labels == 1
    assert reward_model.config.pad_token_id == tiny_tokenizer.pad_token_id
    torch.manual_seed(0)
    again = load_reward_model(str(tiny_model_dir), tiny_tokenizer)
    torch.manual_seed(1)
    other = load_reward_model(str(tiny_model_dir), tiny_tokenizer)
    assert torch.equal(again.score.weight, reward_model.score.weight)
    assert not torch.equal(other.score.weight, reward_model.score.weight)
    # the trunk is the causal LM's, not a fresh one
    lm = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.testing.assert_close(again.model.embed_tokens.weight, lm["model.embed_tokens.weight"])


def test_reward_is_read_at_the_last_real_token(tiny_tokenizer, reward_model):
    """Rows of different lengths are right-padded in one batch; each reward equals the head on
    the hidden state of that sequence's last token, computed alone without padding, and more
    padding changes nothing."""
    prompts, chosen, rejected = zip(*text_pairs(3, seed=5))
    p_ids, c_ids = encode_responses(tiny_tokenizer, prompts, chosen)
    _, r_ids = encode_responses(tiny_tokenizer, prompts, rejected)
    pairs = PairDataset(p_ids, c_ids, r_ids)
    lengths = [len(p) + len(r) for p, r in zip(p_ids + p_ids, c_ids + r_ids)]
    assert len(set(lengths)) > 1  # so some rows are padded
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        r_c, r_r = pair_rewards(reward_model, collate_pairs(pairs, [0, 1, 2], pad))
        more_c, more_r = pair_rewards(reward_model, collate_pairs(pairs, [0, 1, 2], pad,
                                                                  pad_to_multiple_of=96))  # fmt: skip
        alone = []
        for p, r in zip(p_ids + p_ids, c_ids + r_ids):
            hidden = reward_model.model(input_ids=torch.tensor([p + r])).last_hidden_state
            alone.append(reward_model.score(hidden[0, -1]).item())
    torch.testing.assert_close(torch.cat([r_c, r_r]), torch.tensor(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([more_c, more_r]), torch.cat([r_c, r_r]), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert torch.cat([r_c, r_r]).unique().numel() == 6


def test_score_tokenizes_as_training_and_does_not_depend_on_batching(tmp_path, tiny_tokenizer,
                                                                     reward_model):  # fmt: skip
    triples = text_pairs(7, seed=6)
    data = prepare_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows("standard", 7, seed=6))),
                         tiny_tokenizer, max_length=256).pairs  # fmt: skip
    with torch.no_grad():
        trained_c, trained_r = pair_rewards(reward_model, collate_pairs(
            data, range(7), tiny_tokenizer.pad_token_id))  # fmt: skip
    prompts = [p for p, _, _ in triples] * 2
    responses = [c for _, c, _ in triples] + [r for _, _, r in triples]
    one = score(reward_model, tiny_tokenizer, prompts, responses, batch_size=1)
    four = score(reward_model, tiny_tokenizer, prompts, responses, batch_size=4)
    assert one.shape == (14,)
    torch.testing.assert_close(one, torch.cat([trained_c, trained_r]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(four, one, rtol=1e-5, atol=1e-5)


# --- rank agreement ------------------------------------------------------------------------------


def test_ranks_and_correlations_by_hand():
    """Ranks of [10, 20, 20, 5]: 5 → 1, 10 → 2, the two 20s share (3 + 4)/2 = 3.5.
    Pearson of x = [1, 2, 3], y = [1, 2, 4]: centred x = [−1, 0, 1], y = [−4, −1, 5]/3, so
    r = 3 / (√2 · √42/3) = 9/√84 = 0.981981. Spearman of a monotone map is 1."""
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 2, 4])) == pytest.approx(0.981981,
                                                                                         abs=1e-6)  # fmt: skip
    x = torch.tensor([0.3, -1.0, 2.0, 0.5])
    assert spearman(x, x.exp()) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


def test_hidden_reward_agreement_pairs_scores_with_their_texts(tiny_tokenizer):
    triples = text_pairs(20, seed=7)
    p_ids, c_ids = encode_responses(tiny_tokenizer, *zip(*[(p, c) for p, c, _ in triples]))
    _, r_ids = encode_responses(tiny_tokenizer, *zip(*[(p, r) for p, _, r in triples]))
    truth_c = torch.tensor([true_reward(c) for _, c, _ in triples])
    truth_r = torch.tensor([true_reward(r) for _, _, r in triples])
    pairs = PairDataset(p_ids, c_ids, r_ids)
    exact = hidden_reward_agreement(pairs, RewardEval({}, 3 * truth_c - 1, 3 * truth_r - 1),
                                    tiny_tokenizer)  # fmt: skip
    assert exact == pytest.approx({"spearman": 1.0, "pearson": 1.0, "responses": 40.0})
    swapped = hidden_reward_agreement(pairs, RewardEval({}, truth_r, truth_c), tiny_tokenizer)
    assert swapped["pearson"] < 0


# --- the loop, in process ------------------------------------------------------------------------


def test_same_seed_same_weights_and_accumulation_matches_a_bigger_batch(tiny_model_dir, tmp_path):
    """Batch 16 and batch 8 × 2 accumulated take the same 16 pairs per step (one seeded order,
    cut in order), and each step is a mean over its pairs, so the weights agree."""
    data = write_jsonl(tmp_path / "d.jsonl", rows("standard", 120, seed=8))

    def train(name: str, *extra: str) -> dict[str, torch.Tensor]:
        flags = ["--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir",
                 str(tmp_path / name), "--max-steps", "3", "--eval-every", "0", "--report-to",
                 "none", *TINY_RM, *extra]  # fmt: skip
        names = [f.removeprefix("--").replace("-", "_") for f in flags[::2]]
        run_train_rm(resolve(RewardConfig, dict(zip(names, flags[1::2]))))
        return load_file(str(tmp_path / name / "final" / "model.safetensors"))

    a, b = train("a"), train("b")
    accumulated = train("c", "--batch-size", "8", "--grad-accum", "2")
    reseeded = train("d", "--seed", "7")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k in a:
        torch.testing.assert_close(accumulated[k], a[k], rtol=1e-3, atol=2e-4)
    assert not torch.equal(reseeded["score.weight"], a["score.weight"])


# --- the command ---------------------------------------------------------------------------------


def run_ok(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    result = run_cli(args, cache)
    assert_ok(result)
    return result


@pytest.mark.slow  # a subprocess run
def test_train_rm_learns_the_preference_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows("standard", 400, seed=1))
    evals = write_jsonl(tmp_path / "eval.jsonl", rows("standard", 60, seed=2))
    out = tmp_path / "run"
    result = run_ok(["train-rm", "--model", str(tiny_model_dir), "--dataset", str(train),
                      "--eval-dataset", str(evals), "--output-dir", str(out), "--eval-every", "10",
                      *TINY_RM], tmp_path / "cache")  # fmt: skip
    assert "held-out pair accuracy" in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    initial, final = summary["initial"], summary["final"]
    assert (summary["train_pairs"], summary["eval_pairs"], summary["steps"]) == (400, 60, 50)
    assert initial["eval/rewards/accuracies"] < 0.7  # a random head: about chance
    assert final["eval/rewards/accuracies"] >= 0.85
    assert final["eval/loss"] < initial["eval/loss"] - 0.3
    assert "builtin" not in summary  # own data: no hidden reward to compare with

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 51))
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 10, 20, 30, 40, 50]
    assert records[-1]["eval/rewards/accuracies"] == final["eval/rewards/accuracies"]
    assert yaml.safe_load((out / "config.yaml").read_text())["center_rewards_coef"] == 0.0
    assert list((out / "checkpoints").iterdir()) == []  # 50 steps < --save-every 500

    # final/ is a plain HF sequence classifier that scores the held-out pairs as training did
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    prompts, chosen, rejected = zip(*text_pairs(60, seed=2))
    rewards = score(model, tokenizer, prompts * 2, chosen + rejected)
    margins = rewards[:60] - rewards[60:]
    assert margins.mean().item() == pytest.approx(final["eval/rewards/margins"], abs=1e-4)
    assert (margins > 0).float().mean().item() == pytest.approx(final["eval/rewards/accuracies"])


def fake_builtin_cache(cache: Path, model_dir: Path, n_train: int, n_eval: int) -> None:
    """The built-in task's cache layout, holding the tiny model and the tests' review pairs with
    their hidden rewards, so the built-in path runs in seconds instead of building the task."""
    root = cache / "builtin" / f"v{RECIPE_VERSION}-{BuiltinSpec().key()}"
    root.mkdir(parents=True)
    (root / "base").symlink_to(model_dir)
    candidates = [{"prompt": p, "a": c, "b": r, "reward_a": true_reward(c),
                   "reward_b": true_reward(r)} for p, c, r in text_pairs(n_train, seed=11)]  # fmt: skip
    write_jsonl(root / "candidates.jsonl", candidates)
    write_jsonl(root / "eval.jsonl", rows("standard", n_eval, seed=12))
    (root / "prompts.json").write_text(json.dumps(["the movie"]))
    (root / "DONE").write_text("{}")


@pytest.mark.slow  # a subprocess run
def test_without_model_and_dataset_it_uses_the_builtin_task_and_its_hidden_reward(
    tiny_model_dir, tmp_path
):
    cache = tmp_path / "cache"
    fake_builtin_cache(cache, tiny_model_dir, n_train=320, n_eval=60)
    result = run_ok(["train-rm", "--output-dir", str(tmp_path / "run"), "--learning-rate", "1e-2"],
                     cache)  # fmt: skip
    assert "vs hidden reward: Spearman" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["train_pairs"], summary["eval_pairs"]) == (320, 60)  # the built-in eval file
    hidden = summary["builtin"]
    assert hidden["final"]["responses"] == 120
    assert hidden["final"]["spearman"] > max(0.5, hidden["initial"]["spearman"] + 0.3)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (config["batch_size"], config["max_length"]) == (32, 64)  # the built-in preset


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", rows("standard", 40, seed=3))


def rm_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train-rm", "--model", str(model), "--dataset", str(data), "--output-dir", str(out),
            "--max-steps", "1", *extra]  # fmt: skip


def test_missing_dataset_file(capsys, tiny_model_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    message = fail(capsys, rm_args(tiny_model_dir, missing, tmp_path / "out"))
    assert message == f"{missing}: file not found"
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused_and_kept(capsys, tiny_model_dir, good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"steps": 7}')
    message = fail(capsys, rm_args(tiny_model_dir, good, out))
    assert message == (f"--output-dir: '{out}' is not empty; pass --resume to continue that run "
                       "or --overwrite to replace it")
    assert json.loads((out / "summary.json").read_text()) == {"steps": 7}


def test_overwrite_with_bad_input_destroys_nothing(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"steps": 7}')
    bad = rows("standard", 3, seed=4)
    bad[1]["rejected"] = None
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    message = fail(capsys, rm_args(tiny_model_dir, path, out, "--overwrite"))
    assert message == f"{path}: row 2: field 'rejected' is missing"
    assert json.loads((out / "summary.json").read_text()) == {"steps": 7}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--center-rewards-coef", "-1"], "--center-rewards-coef must be ≥ 0, got -1.0"),
        (["--center-rewards-coef", "x"],
         "--center-rewards-coef must be a number (finite), got 'x'"),
        (["--lr-scheduler", "step"],
         "--lr-scheduler must be one of cosine, linear, constant; got 'step'"),
        (["--beta", "0.1"], "No such option '--beta'."),
    ],
)  # fmt: skip
def test_bad_options(capsys, tiny_model_dir, good, tmp_path, extra, expected):
    assert fail(capsys, rm_args(tiny_model_dir, good, tmp_path / "out", *extra)) == expected


def test_nonexistent_model_path(capsys, good, tmp_path):
    missing = tmp_path / "no-model"
    message = fail(capsys, rm_args(missing, good, tmp_path / "out"))
    assert message == f"--model: model path '{missing}' does not exist"
