"""The loop engine: cadence, checkpoints, resume, stops, accumulation and the step.

A toy command (:mod:`toy`) drives the real pieces in-process; its minibatches come from the global
RNG, so a resumed run matches an uninterrupted one only if weights, optimizer, schedule, RNG and
the loop's state all come back.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from toy import ToyConfig, run_toy
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from direct_align.data import PairDataset
from direct_align.data.packing import build_batch
from direct_align.engine.loop import Loop
from direct_align.engine.step import Forward, accumulate, make_optimizer
from direct_align.errors import DirectAlignError, Interrupted, NonFinite
from direct_align.losses import preference_loss
from direct_align.models.attention import use_segment_attention
from direct_align.models.logprobs import PreferenceModel


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- cadence


def test_log_eval_and_save_fire_on_their_multiples_and_rotate_checkpoints(tmp_path: Path) -> None:
    cfg = ToyConfig(steps=10, log_every=3, eval_every=4, save_every=5, save_total_limit=1,
                    output_dir=str(tmp_path / "run"))  # fmt: skip
    _, events, finished = run_toy(cfg)
    assert finished
    assert [s for e, s in events if e == "log"] == [3, 6, 9, 10]  # and the last step
    assert [s for e, s in events if e == "eval"] == [4, 8]  # the final evaluation is the loop's
    assert [s for e, s in events if e == "save"] == [5]  # final/ is written at the end, not here
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000005"]
    assert logged_steps(tmp_path / "run") == [3, 6, 9, 10]


def test_cadence_across_boundaries_several_steps_apart(tmp_path: Path) -> None:
    """Online rounds take several steps between boundaries: a setting fires once per boundary
    that passed one of its multiples."""
    cfg = ToyConfig(steps=12, save_every=0, output_dir=str(tmp_path / "run"))
    with pytest.MonkeyPatch.context() as mp:
        boundaries = {3, 7, 8, 12}
        real = Loop.boundary
        mp.setattr(Loop, "boundary", lambda self: real(self) if self.state.step in boundaries else False)
        fired = []

        def on_step(loop: Loop) -> None:
            if loop.state.step in boundaries:
                fired.append((loop.state.step, loop.due(4), loop.due(5)))

        run_toy(cfg, on_step=on_step)
    # steps 1-3: no multiple of 4 or 5; 4-7: 4 and 5; 8: 8; 9-12: 10 and 12
    assert fired == [(3, False, False), (7, True, True), (8, True, False), (12, True, True)]


# ----------------------------------------------------------------------------- resume


def test_max_steps_per_run_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, _, _ = run_toy(ToyConfig(steps=10, output_dir=str(tmp_path / "whole")))
    out = tmp_path / "split"
    first, events, finished = run_toy(ToyConfig(steps=10, max_steps_per_run=4, output_dir=str(out)))
    assert not finished and ("save", 4) in events
    assert (out / "checkpoints" / "step-000004").is_dir()
    second, _, finished = run_toy(ToyConfig(steps=10, max_steps_per_run=4, resume=True,
                                            output_dir=str(out)))  # fmt: skip
    assert not finished and (out / "checkpoints" / "step-000008").is_dir()
    third, _, finished = run_toy(ToyConfig(steps=10, resume=True, output_dir=str(out)))
    assert finished
    assert_same_weights(third, whole)
    assert logged_steps(out) == list(range(1, 11))  # one run's records, in order


def test_resume_drops_records_logged_after_the_checkpoint(tmp_path: Path) -> None:
    """A run killed after logging steps its checkpoint does not hold logs them again on
    resume; metrics.jsonl must read as one run."""
    out = tmp_path / "run"
    run_toy(ToyConfig(steps=10, max_steps_per_run=4, output_dir=str(out)))
    with (out / "metrics.jsonl").open("a") as f:  # what a kill -9 after step 6 leaves
        f.write('{"step": 5, "train/mse": 1.0}\n{"step": 6, "train/mse": 1.0}\n')
    run_toy(ToyConfig(steps=10, resume=True, output_dir=str(out)))
    assert logged_steps(out) == list(range(1, 11))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_at_the_step_and_resumes_exactly(tmp_path: Path,
                                                                   signum: int) -> None:  # fmt: skip
    whole, _, _ = run_toy(ToyConfig(steps=8, output_dir=str(tmp_path / "whole")))
    out = tmp_path / "stopped"

    def stop_at_3(loop: Loop) -> None:
        if loop.state.step == 3:
            os.kill(os.getpid(), signum)

    with pytest.raises(Interrupted, match="stopped by signal .* at step 3; checkpoint saved"):
        run_toy(ToyConfig(steps=8, output_dir=str(out)), on_step=stop_at_3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert signal.getsignal(signal.SIGTERM) is not None  # given back after the run
    resumed, _, finished = run_toy(ToyConfig(steps=8, resume=True, output_dir=str(out)))
    assert finished
    assert_same_weights(resumed, whole)


def test_signal_handlers_are_given_back(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run_toy(ToyConfig(steps=2, output_dir=str(tmp_path / "run")))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ----------------------------------------------------------------------------- non-finite


def test_a_non_finite_loss_stops_before_the_weights_change(tmp_path: Path) -> None:
    calls = []

    def poison_third_step(loss: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return loss * float("nan") if len(calls) > 4 else loss  # 2 micro-batches a step

    with pytest.raises(DirectAlignError, match=r"^step 3: the loss is non-finite \(nan in "
                                               r"process 0\); the weights were not updated; last "
                                               r"checkpoint: None$"):  # fmt: skip
        run_toy(ToyConfig(steps=5, output_dir=str(tmp_path / "run")), loss_of=poison_third_step)


def test_a_non_finite_held_out_loss_stops_before_the_weights_are_saved(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(DirectAlignError, match=r"^step 6: the held-out loss is nan: the weights "
                                               r"diverged .*; last checkpoint: .*step-000004$"):  # fmt: skip
        run_toy(ToyConfig(steps=10, eval_every=3, save_every=2, output_dir=str(out)),
                eval_loss=lambda step: float("nan") if step == 6 else 1.0)  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_non_finite_weight_is_never_checkpointed(tmp_path: Path) -> None:
    out = tmp_path / "run"

    def poison(loop: Loop) -> None:  # after step 4's update, before its checkpoint
        if loop.state.step == 4:
            with torch.no_grad():
                loop.model.weight[0, 0] = float("inf")

    with pytest.raises(DirectAlignError, match=r"^step 4: the weights hold non-finite values "
                                               r"\(.*weight\); not checkpointed; last checkpoint: "
                                               r".*step-000002$"):  # fmt: skip
        run_toy(ToyConfig(steps=10, save_every=2, output_dir=str(out)), on_step=poison)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_a_signal_during_the_final_evaluation_leaves_the_last_step_checkpointed(
        tmp_path: Path) -> None:  # fmt: skip
    whole, _, _ = run_toy(ToyConfig(steps=6, output_dir=str(tmp_path / "whole")))
    out = tmp_path / "run"

    def signal_then_loss(step: int) -> float:
        os.kill(os.getpid(), signal.SIGTERM)
        return 1.0

    with pytest.raises(Interrupted, match="at step 6, during the final evaluation; checkpoint saved"):
        run_toy(ToyConfig(steps=6, output_dir=str(out)), eval_loss=signal_then_loss)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000006"]
    resumed, _, finished = run_toy(ToyConfig(steps=6, resume=True, output_dir=str(out)))
    assert finished
    assert_same_weights(resumed, whole)


def test_accumulate_raises_before_any_backward() -> None:
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)

    def forward(value: float) -> Forward:
        return Forward(model(torch.ones(1, 2)).sum() * value, {}, 1)

    with pytest.raises(NonFinite, match="inf"):
        accumulate(model, [(1.0, True), (float("inf"), True)], forward, weight=lambda _: 1.0,
                   accelerator=accelerator)  # fmt: skip
    # the first micro-batch's backward ran; the optimizer step never does after NonFinite, and
    # the loop's next step starts from zero gradients (make_optimizer's zero_grad)
    assert model.weight.grad is not None


# ----------------------------------------------------------------------------- the optimizer


def test_make_optimizer_takes_trainable_parameters_and_warms_up() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    cfg = ToyConfig(learning_rate=0.1, warmup_ratio=0.2, lr_scheduler="linear")
    optimizer, scheduler = make_optimizer(model, cfg, total=10)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model[1].parameters()}
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 0.05, 0.1])  # 2 warmup steps, then linear decay
    assert lrs[3:] == pytest.approx([0.1 * (10 - k) / 8 for k in range(3, 10)])


def test_weight_decay_spares_biases_and_norm_weights(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """As transformers' Trainer: decay on weight matrices, none on biases and norms; a step
    with zero gradients then shrinks exactly the decayed parameters."""
    model = make_tiny_model(tiny_tokenizer)
    cfg = ToyConfig(learning_rate=0.1, weight_decay=0.5, warmup_ratio=0.0, lr_scheduler="constant")
    optimizer, _ = make_optimizer(model, cfg, total=1)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == ("norm" not in name and "bias" not in name), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        shrunk = torch.allclose(p, before[name] * (1 - 0.1 * 0.5))
        assert shrunk == (id(p) in decay) or not before[name].any(), name


# ----------------------------------------------------------------------------- accumulation


def _random_pairs(n: int, seed: int) -> PairDataset:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        length = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(5, 380, (length,), generator=g).tolist()

    return PairDataset([[1, *ids(2, 12)] for _ in range(n)], [[*ids(1, 9), 2] for _ in range(n)],
                       [[*ids(1, 9), 2] for _ in range(n)])  # fmt: skip


@pytest.mark.parametrize(("layout", "chunked", "attention"),
                         [("padded", False, "mask"), ("shared", True, "segments")])  # fmt: skip
def test_accumulate_weights_micro_batches_as_one_big_batch(
    tiny_tokenizer: PreTrainedTokenizerFast, layout: str, chunked: bool, attention: str
) -> None:
    data = _random_pairs(7, seed=1)
    reference = PreferenceModel(make_tiny_model(tiny_tokenizer, seed=11).eval(), chunked=False,
                                attention="mask")  # fmt: skip
    with torch.no_grad():
        ref = reference(build_batch(data, list(range(7)), "padded", 0))
        ref_c, ref_r = ref.chosen, ref.rejected

    def loss_on(model: PreferenceModel, index: list[int]) -> torch.Tensor:
        out = model(build_batch(data, index, layout, 0))
        loss, _ = preference_loss("dpo", chosen_logps=out.chosen, rejected_logps=out.rejected,
                                  ref_chosen_logps=ref_c[index], ref_rejected_logps=ref_r[index],
                                  beta=0.5)  # fmt: skip
        return loss

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    lm = make_tiny_model(tiny_tokenizer, seed=10).eval()  # eval: no dropout either way
    if attention == "segments":
        use_segment_attention(lm)
    model = PreferenceModel(lm, chunked=chunked, attention=attention)
    loss_on(model, list(range(7))).backward()
    whole = grads(model)

    group = [[4, 0, 6], [2, 5, 1], [3]]  # uneven micro-batches, as at the end of an epoch
    metrics, tokens = accumulate(model, [(index, True) for index in group],
                                 lambda index: Forward(loss_on(model, index), {}, len(index)),
                                 weight=len, accelerator=Accelerator(cpu=True))  # fmt: skip
    accumulated = grads(model)
    assert metrics["loss"] == pytest.approx(loss_on(model, list(range(7))).item(), abs=1e-6)
    assert tokens == 7
    model.zero_grad(set_to_none=True)

    for index in group:  # the naive mean of micro-batch means, for contrast
        (loss_on(model, index) / len(group)).backward()
    naive = grads(model)

    assert whole.keys() == accumulated.keys() and len(whole) > 10
    for name, g in whole.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(accumulated[name], g, rtol=0, atol=1e-6)
    worst = max((naive[n] - g).abs().max().item() for n, g in whole.items())
    assert worst > 1e-4  # the check above can tell a wrong weighting apart
