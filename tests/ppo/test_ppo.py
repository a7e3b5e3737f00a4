"""PPO's models and rollouts on a tiny local Llama, and `direct-align ppo` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from direct_align.cli import main
from direct_align.data.prompts import load_prompts
from direct_align.errors import DataError
from direct_align.generation import score_responses
from direct_align.ppo.models import (
    ActorCritic,
    FrozenReference,
    FrozenRewardModel,
    reference_logps,
    reward_scores,
)
from direct_align.ppo.rollout import generate, score_rollout
from direct_align.rm.model import load_reward_model, score_ids
from prefdata import rows, write_jsonl


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    return load_reward_model(str(tiny_model_dir), tiny_tokenizer)


PROMPTS = [[1, 40, 41], [1, 50], [1, 60, 61, 62, 63]]


def sampled(policy, tiny_tokenizer, max_new_tokens: int = 12, eos: int | None = None):
    torch.manual_seed(3)
    return generate(policy, PROMPTS, max_new_tokens=max_new_tokens, temperature=1.0,
                    eos_token_id=tiny_tokenizer.eos_token_id if eos is None else eos,
                    pad_token_id=tiny_tokenizer.pad_token_id)  # fmt: skip


def test_generate_masks_everything_after_the_first_eos(policy, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    # a random tiny model rarely says EOS: call its most frequent token EOS, same seed
    free = sampled(policy, tiny_tokenizer, max_new_tokens=30)
    eos = int(torch.mode(free.response.flatten()).values)
    rollout = sampled(policy, tiny_tokenizer, max_new_tokens=30, eos=eos)
    for row in range(len(PROMPTS)):
        tokens = rollout.response[row].tolist()
        n = int(rollout.mask[row].sum())
        ended = eos in tokens
        assert bool(rollout.ended[row]) == ended
        assert n == (tokens.index(eos) + 1 if ended else len(tokens))
        assert tokens[:n] == free.response[row, :n].tolist()  # the same stream up to EOS
        assert all(t == pad for t in tokens[n:])
        assert rollout.mask[row, :n].eq(1).all()
    assert rollout.ended.any() and rollout.mask.eq(0).any()
    assert rollout.query[1, :3].tolist() == [pad, pad, pad]  # left-padded prompts


def test_actor_logprobs_and_rm_scores_match_unpadded_computations(policy, reward_model,
                                                                  tiny_tokenizer):  # fmt: skip
    """Left-padded prompts + right-padded responses must give the same log-probs as plain
    right-padded rows, and the same rewards as the reward model's own scoring."""
    rollout = sampled(policy, tiny_tokenizer)
    responses = [rollout.response[i, : int(rollout.mask[i].sum())].tolist() for i in range(3)]
    actor = ActorCritic(policy)
    width = rollout.query.shape[1]
    logps, entropy, values = actor(rollout.input_ids, rollout.attention_mask, width, 1.0)
    sums = (logps * rollout.mask).sum(1)
    expected = score_responses(policy, PROMPTS, responses, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.testing.assert_close(sums.detach(), expected, atol=1e-4, rtol=1e-4)
    assert values.abs().max().item() == 0.0  # zero-initialised value head
    assert (entropy > 0).all()
    ref = reference_logps(policy, rollout.input_ids, rollout.attention_mask, width, 1.0)
    torch.testing.assert_close(ref, logps.detach())
    # a higher temperature flattens the distribution the log-probs are taken under
    hot = reference_logps(policy, rollout.input_ids, rollout.attention_mask, width, 2.0)
    assert not torch.allclose(hot, ref)
    scores = reward_scores(reward_model, rollout.input_ids, rollout.attention_mask)
    torch.testing.assert_close(scores, score_ids(reward_model, PROMPTS, responses), atol=1e-4,
                               rtol=1e-4)  # fmt: skip


def test_separate_critic_reads_the_reward_models_head_at_every_position(policy, reward_model,
                                                                        tiny_tokenizer):  # fmt: skip
    rollout = sampled(policy, tiny_tokenizer)
    width = rollout.query.shape[1]
    actor = ActorCritic(policy, reward_model)
    scored = score_rollout(rollout, actor, FrozenReference(policy), FrozenRewardModel(reward_model),
                           temperature=1.0, batch_size=2)  # fmt: skip
    last = rollout.mask.sum(1).long() - 1
    # the critic's value before the last token is not the score (it reads one position earlier),
    # but shifting the prompt+response by one position must reproduce it from the RM itself
    ids, mask = rollout.input_ids, rollout.attention_mask
    for row in range(3):
        n = int(last[row])
        cut = width + n  # prompt + the first n response tokens: the state before token n
        expected = reward_scores(reward_model, ids[row : row + 1, :cut], mask[row : row + 1, :cut])
        torch.testing.assert_close(scored.values[row, n], expected[0], atol=1e-4, rtol=1e-4)
    assert (scored.values * (1 - rollout.mask)).abs().max() == 0.0
    with pytest.raises(ValueError, match="no linear 'score' head"):
        ActorCritic(policy, policy)


def test_load_prompts_text_and_chat_and_errors(tmp_path, tiny_tokenizer):
    text = write_jsonl(tmp_path / "t.jsonl", rows("standard", 4, seed=1))
    loaded = load_prompts(str(text), tiny_tokenizer)
    ids = loaded.ids
    first = rows("standard", 4, seed=1)[0]["prompt"]
    assert ids[0] == [tiny_tokenizer.bos_token_id,
                      *tiny_tokenizer(first, add_special_tokens=False).input_ids]  # fmt: skip
    assert loaded.texts[0] == first
    chat = write_jsonl(tmp_path / "c.jsonl", rows("conversational", 4, seed=1))
    rendered = tiny_tokenizer.decode(load_prompts(str(chat), tiny_tokenizer).ids[0])
    assert rendered.endswith("<|im_start|>assistant\n")
    short = load_prompts(str(text), tiny_tokenizer, keep=2).ids
    assert all(len(p) <= 2 and p[0] == tiny_tokenizer.bos_token_id for p in short)
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": " "}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: field 'prompt' is empty"):
        load_prompts(str(tmp_path / "bad.jsonl"), tiny_tokenizer)
    write_jsonl(tmp_path / "role.jsonl", [{"prompt": [{"role": "human", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"role.jsonl: row 0: field 'prompt' message 1 has an "
                                        r"unknown role 'human'"):  # fmt: skip
        load_prompts(str(tmp_path / "role.jsonl"), tiny_tokenizer)
    write_jsonl(tmp_path / "none.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="no prompts: expected a 'prompt' column"):
        load_prompts(str(tmp_path / "none.jsonl"), tiny_tokenizer)


def ppo_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["ppo", "--model", str(model), "--reward-model", str(model), "--dataset", str(data),
            "--output-dir", str(out), "--rollouts", "3", "--rollout-batch-size", "8",
            "--mini-batch-size", "4", "--max-new-tokens", "8", "--ppo-epochs", "2",
            "--learning-rate", "1e-3", *extra]  # fmt: skip


@pytest.mark.parametrize(("critic", "models"), [("separate", 4), ("shared", 3)])
def test_ppo_command_trains_and_writes_a_loadable_policy(tiny_model_dir, tmp_path, capsys,
                                                         critic, models):  # fmt: skip
    data = write_jsonl(tmp_path / "p.jsonl", rows("standard", 12, seed=2))
    out = tmp_path / "run"
    main(ppo_args(tiny_model_dir, data, out, "--critic", critic))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollouts"] == 3 and summary["responses"] == 24
    assert summary["updates"] == 3 * 2 * 2
    assert summary["models_in_memory"] == models
    assert 24 <= summary["tokens_generated"] <= 24 * 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["policy/clipfrac"] >= 0 and r["loss/value"] >= 0 for r in records)
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert any(moved)
    assert "3 rollouts, 24 responses" in capsys.readouterr().out


def fail(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_ppo_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", rows("standard", 4, seed=2))
    out = tmp_path / "run"
    no_rm = [a for a in ppo_args(tiny_model_dir, data, out) if a != str(tiny_model_dir)]
    no_rm = ["ppo", "--model", str(tiny_model_dir), *no_rm[no_rm.index("--dataset"):]]
    assert "--reward-model is required" in fail(capsys, no_rm)
    assert "--mini-batch-size must be at most --rollout-batch-size" in fail(
        capsys, ppo_args(tiny_model_dir, data, out, "--mini-batch-size", "9"))  # fmt: skip
    assert "--critic must be one of separate, shared; got 'both'" in fail(
        capsys, ppo_args(tiny_model_dir, data, out, "--critic", "both"))  # fmt: skip
    assert "--reward-model: " in fail(capsys, [*ppo_args(tiny_model_dir, data, out), "--reward-model",
                                          str(data)])  # fmt: skip
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "is not empty" in fail(capsys, ppo_args(tiny_model_dir, data, out))
    assert (out / "keep.txt").read_text() == "x"
