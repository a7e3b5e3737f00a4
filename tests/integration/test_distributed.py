"""Two CPU processes (gloo; torchrun, and accelerate launch with configs/accelerate/ddp.yaml)
train exactly what one process trains with the same global batch, a run checkpointed by two
processes resumes in one, and online training, label and select share their work out."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch import ARGS, ROOT, free_port, last_train_record, launch, train, weights
from safetensors.torch import load_file

from conftest import make_tiny_model
from direct_align.builtin.task import sample_prompts
from direct_align.cli import main
from direct_align.engine.distributed import check_process_count
from direct_align.errors import ConfigError
from prefdata import rows, text_pairs, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    # 26 train pairs: 7 micro-batches of 4, so step 4 (the epoch's last) has one micro-batch,
    # which the second process repeats with weight 0; the one eval pair is one eval batch
    data = write_jsonl(tmp / "pairs.jsonl", rows("standard", 27, seed=4))
    return tiny_model_dir, data, tmp


def test_two_processes_match_one_with_the_same_global_batch(setup) -> None:
    model, data, tmp = setup
    train(1, tmp / "one", model, data, tmp / "cache1")
    # as users launch it: accelerate launch with the shipped data-parallel config
    result = train(2, tmp / "two", model, data, tmp / "cache2", config="ddp.yaml")
    one, two = weights(tmp / "one"), weights(tmp / "two")
    assert one.keys() == two.keys()
    initial = load_file(str(model / "model.safetensors"))
    assert any(not torch.equal(one[k], initial[k]) for k in one)  # training moved the weights
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)
    a, b = last_train_record(tmp / "one"), last_train_record(tmp / "two")
    for key in ("train/loss", "train/rewards/accuracies", "train/rewards/margins"):
        assert b[key] == pytest.approx(a[key], abs=1e-4)
    summary = json.loads((tmp / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4 and summary["train_pairs"] == 26
    # evaluation was dealt out among the processes and summed: the same metrics as one process
    single = json.loads((tmp / "one" / "summary.json").read_text())
    for key in ("eval/loss", "eval/rewards/margins"):
        assert summary["final"][key] == pytest.approx(single["final"][key], abs=1e-5)
    # the reference pass was sharded and gathered into one cache, equal to the 1-process one
    caches = [sorted((tmp / c / "reference").glob("*.safetensors")) for c in ("cache1", "cache2")]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and caches[0]
    for p, q in zip(*caches):
        for name, tensor in load_file(str(p)).items():
            torch.testing.assert_close(load_file(str(q))[name], tensor, atol=1e-5, rtol=1e-5)
    # only the main process logged and wrote
    assert result.stdout.count("steps, ") == 1


def test_a_two_process_checkpoint_resumes_in_one_process(setup) -> None:
    model, data, tmp = setup
    if not (tmp / "one").exists():
        train(1, tmp / "one", model, data, tmp / "cache1")
    train(2, tmp / "split", model, data, tmp / "cache3", "--max-steps-per-run", "2")
    assert not (tmp / "split" / "final").exists()
    assert (tmp / "split" / "checkpoints" / "step-000002").is_dir()
    train(1, tmp / "split", model, data, tmp / "cache3", "--resume")
    one, resumed = weights(tmp / "one"), weights(tmp / "split")
    for key in one:
        torch.testing.assert_close(resumed[key], one[key], atol=2e-5, rtol=1e-4)


def test_grad_accum_must_divide_among_the_processes() -> None:
    check_process_count(4, SimpleNamespace(num_processes=2))
    with pytest.raises(ConfigError, match="--grad-accum 3 must be a multiple of the 2 processes"):
        check_process_count(3, SimpleNamespace(num_processes=2))


def test_select_ranks_the_same_and_label_judges_each_prompt_once_in_two_processes(
    setup, tiny_tokenizer, tmp_path: Path
) -> None:
    model, _, _ = setup
    reference = tmp_path / "reference"
    make_tiny_model(tiny_tokenizer, seed=2).save_pretrained(reference)
    tiny_tokenizer.save_pretrained(reference)
    candidates = write_jsonl(tmp_path / "candidates.jsonl", [
        {"prompt": p, "a": a, "b": b, "id": i} for i, (p, a, b) in enumerate(text_pairs(10, seed=9))
    ])  # fmt: skip
    select = ["select", "--model", str(model), "--ref-model", str(reference), "--dataset",
              str(candidates), "--batch-size", "3"]  # fmt: skip
    launch(2, [*select, "--output", str(tmp_path / "two.jsonl")], {})
    main([*select, "--output", str(tmp_path / "one.jsonl")])  # one process, in this one
    one, two = ([json.loads(line) for line in (tmp_path / f"{n}.jsonl").open()] for n in ("one", "two"))
    assert [r["id"] for r in two] == [r["id"] for r in one]
    assert [r["margin"] for r in two] == pytest.approx([r["margin"] for r in one], abs=1e-5)

    (tmp_path / "judge.py").write_text("def e(prompts, responses):\n"
                                       "    return [float(r.count('e')) for r in responses]\n")  # fmt: skip
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in sample_prompts(6, seed=8)])
    labelled = launch(2, ["label", "--model", str(model), "--dataset", str(prompts), "--reward",
                          f"{tmp_path / 'judge.py'}:e", "--samples-per-prompt", "3",
                          "--max-new-tokens", "8", "--output", str(tmp_path / "pairs.jsonl")], {})  # fmt: skip
    assert labelled.stdout.count("pairs from 6 prompts (18 judge calls") == 1
    rows_written = [json.loads(line) for line in (tmp_path / "pairs.jsonl").open()]
    assert 0 < len(rows_written) <= 6
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows_written)


def _rank_of(pid: int) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(kv.split("=", 1) for kv in environ if "=" in kv).get("RANK")


def test_a_signal_to_one_process_stops_all_at_the_same_step(setup) -> None:
    """Preemption signals reach the processes at different steps; they must stop together (a
    process checkpointing alone waits for the others forever)."""
    model, data, tmp = setup
    out = tmp / "signalled"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "direct_align", "train", "--model",
               str(model), "--dataset", str(data), "--output-dir", str(out), *ARGS,
               "--max-steps", "5000", "--log-every", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "DIRECT_ALIGN_CACHE": str(tmp / "cache1")}  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and "train/loss" in metrics.read_text()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(next(int(w) for w in workers if _rank_of(int(w)) == "1"), signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # (a progress bar may share the line: find the messages anywhere)
    stops = re.findall(r"stopped by (signal 15|a signal to another process) at step (\d+);", stderr)
    assert sorted(how for how, _ in stops) == ["a signal to another process", "signal 15"], stderr[-3000:]
    steps = {step for _, step in stops}
    assert len(steps) == 1
    assert (out / "checkpoints" / f"step-{int(steps.pop()):06d}" / "trainer_state.json").is_file()


# ----------------------------------------------------------------------------- online

# Counts the e's of each response; records which prompts each process judged; in process 1 it
# fails on its second call (round 2) while the file FAIL exists.
JUDGE_PY = """
import os

def traced(prompts, responses):
    rank = os.environ.get("RANK", "0")
    trace = os.environ["TRACE"] + "." + rank
    calls = open(trace).read().count("#") if os.path.exists(trace) else 0
    with open(trace, "a") as f:
        f.write("#\\n" + "".join(p.replace("\\n", " ") + "\\n" for p in prompts))
    if rank == "1" and calls == 1 and os.path.exists(os.environ["FAIL"]):
        return [float("nan")] * len(responses)
    return [float(r.count("e")) for r in responses]
"""


def test_online_shares_prompts_stops_everywhere_on_a_failed_judge_and_resumes_in_one(
    setup, tmp_path: Path
) -> None:
    model, _, _ = setup
    prompts = sample_prompts(8, seed=3)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    (tmp_path / "judge.py").write_text(JUDGE_PY)
    (tmp_path / "fail").write_text("")
    trace = tmp_path / "trace"
    env = {"TRACE": str(trace), "FAIL": str(tmp_path / "fail")}
    args = ["train", "--online", "--loss", "dpo", "--model", str(model), "--dataset", str(data),
            "--output-dir", str(tmp_path / "run"), "--reward", f"{tmp_path / 'judge.py'}:traced",
            "--rounds", "3", "--prompts-per-round", "8", "--samples-per-prompt", "2",
            "--batch-size", "8", "--grad-accum", "2", "--max-length", "48",
            "--max-new-tokens", "8", "--eval-every", "0", "--save-every", "0"]  # fmt: skip
    failed = launch(2, args, env, check=False)
    assert failed.returncode != 0
    # both processes stop with the judge's message, after checkpointing round 1
    message = f"error: round 2: judge '{tmp_path / 'judge.py'}:traced': returned nan"
    assert failed.stderr.count(message) == 2, failed.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["online_state"]["round"] == 1
    # round 1: each process judged its own half of the prompts, k = 2 responses each
    judged = [(trace.parent / f"trace.{r}").read_text().split("#\n")[1].splitlines() for r in (0, 1)]
    assert len(judged[0]) == len(judged[1]) == 8
    assert Counter(judged[0] + judged[1]) == Counter(p.replace("\n", " ") for p in prompts * 2)

    (tmp_path / "fail").unlink()
    resumed = launch(1, [*args, "--resume"], env)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["judge_calls"] == 3 * 8 * 2
    assert summary["processes"] == 1 and "online: 3 rounds" in resumed.stdout
