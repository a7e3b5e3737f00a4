"""`direct-align train --loss kto` on thumbs-up/down data, in-process: a tiny local Llama with an
unpaired JSONL file, pairs read as unpaired, and the errors for mixing pairs and unpaired losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from commands import TINY_RUN, fail, train_here

from prefdata import rows, write_jsonl


@pytest.fixture(scope="module")
def thumbs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Imbalanced feedback: 300 prompts answered well (desirable), 150 others badly."""
    out = []
    for i, row in enumerate(rows("standard", 450, seed=3)):
        good = i % 3 != 0
        out.append({"prompt": row["prompt"], "completion": row["chosen" if good else "rejected"],
                    "label": good})  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("thumbs") / "thumbs.jsonl", out)


def test_kto_on_unpaired_jsonl_learns_the_labels(thumbs, tiny_model_dir, tmp_path, caplog,
                                                 capsys) -> None:  # fmt: skip
    out = tmp_path / "run"
    log = train_here(["--loss", "kto", "--model", str(tiny_model_dir), "--dataset", str(thumbs),
                 "--output-dir", str(out), *TINY_RUN], tmp_path / "cache", caplog)  # fmt: skip
    printed = capsys.readouterr().out
    assert "held-out label accuracy" in printed and "held-out KL estimate z0" in printed
    assert " examples, " in printed.splitlines()[-1]
    assert "unpaired standard format, kept 450 of 450 examples" in log
    assert "λ_D·n_D / λ_U·n_U = 1.000" in log  # the undesirable weight balanced the 2:1 data
    summary = json.loads((out / "summary.json").read_text())
    assert summary["undesirable_weight"] == pytest.approx(2.0, rel=0.2)
    initial, final = summary["initial"], summary["final"]
    # policy == reference at the start: every log-ratio, mismatched ones included, is exactly 0
    assert initial["eval/kl"] == 0.0 and initial["eval/rewards/chosen"] == 0.0
    assert final["eval/loss"] < initial["eval/loss"] - 0.1
    assert final["eval/rewards/accuracies"] >= 0.8 > initial["eval/rewards/accuracies"]


def test_pairs_train_kto_only_when_asked(tiny_model_dir, tmp_path, caplog, capsys) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows("standard", 200, seed=4))
    args = ["--loss", "kto", "--model", str(tiny_model_dir), "--dataset", str(pairs),
            "--output-dir", str(tmp_path / "run"), *TINY_RUN]  # fmt: skip
    message = fail(capsys, ["train", *args])
    assert message.startswith(f"{pairs}: --loss kto trains on unpaired feedback")
    assert "--unpaired-from-pairs" in message and not (tmp_path / "run").exists()
    log = train_here([*args, "--unpaired-from-pairs"], tmp_path / "cache", caplog)
    assert "unpaired standard format, kept 400 of 400 examples" in log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["eval/rewards/accuracies"] > summary["initial"]["eval/rewards/accuracies"]


def test_unpaired_data_with_a_paired_loss_is_one_line(thumbs, tiny_model_dir, tmp_path, capsys) -> None:
    message = fail(capsys, ["train", "--loss", "dpo", "--model", str(tiny_model_dir), "--dataset",
                            str(thumbs), "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert message == (f"{thumbs}: unpaired feedback (prompt, completion, label) trains with "
                       "--loss kto, not --loss dpo, which needs pairs")  # fmt: skip
    message = fail(capsys, ["train", "--loss", "dpo", "--unpaired-from-pairs", "--model",
                            str(tiny_model_dir), "--dataset", str(thumbs)])  # fmt: skip
    assert message == "--unpaired-from-pairs is for unpaired losses (kto), not --loss dpo"
    message = fail(capsys, ["train", "--loss", "kto", "--online", "--pair-margin", "0.1"])
    assert message == "--pair-margin chooses pairs; --loss kto learns from every sample"
    message = fail(capsys, ["train", "--loss", "kto", "--reference-free"])
    assert message.startswith("--reference-free: --loss kto measures each completion against")
