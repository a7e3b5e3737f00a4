"""Bad input: one `error: ...` line naming what and where, a non-zero exit, nothing destroyed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from commands import fail, train_args

from prefdata import rows, write_jsonl


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", rows("standard", 40, seed=3))


def test_malformed_jsonl_names_file_and_line(capsys, tiny_model_dir, good, tmp_path):
    lines = good.read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the closing of row 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    message = fail(capsys, train_args(tiny_model_dir, bad, tmp_path / "out"))
    assert message.startswith(f"{bad}:3: invalid JSON")


@pytest.mark.parametrize(("value", "problem"), [(None, "is missing"), ("  ", "is empty")])
def test_missing_or_empty_field_names_row_and_field(capsys, tiny_model_dir, tmp_path, value, problem):
    data = rows("standard", 10, seed=4)
    data[6]["rejected"] = value
    path = write_jsonl(tmp_path / "d.jsonl", data)
    message = fail(capsys, train_args(tiny_model_dir, path, tmp_path / "out"))
    assert message == f"{path}: row 7: field 'rejected' {problem}"


def test_malformed_csv_names_line(capsys, tiny_model_dir, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"a"," b"," c"\n"a"," b"," c"," d"\n')
    message = fail(capsys, train_args(tiny_model_dir, path, tmp_path / "out"))
    assert message.startswith(f"{path}:3: ")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--loss", "dpox"], "--loss must be one of dpo, ipo, hinge, robust, orpo, simpo, kto, rebel, lipo, sppo, rloo; got 'dpox' (did you mean 'dpo'?)"),
        (["--format", "xml"], "--format must be one of auto, standard, conversational, implicit; got 'xml'"),
        (["--beta", "0"], "--beta must be > 0, got 0.0"),
        (["--beta", "-0.5"], "--beta must be > 0, got -0.5"),
        (["--batch-size", "two"], "--batch-size must be an integer (finite), got 'two'"),
        (["--lossx", "dpo"], "No such option '--lossx'. Did you mean '--loss'?"),
        (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5), got 0.5"),
    ],
)  # fmt: skip
def test_bad_options(capsys, tiny_model_dir, good, tmp_path, extra, expected):
    assert fail(capsys, train_args(tiny_model_dir, good, tmp_path / "out", *extra)) == expected


def test_nonexistent_model_path(capsys, good, tmp_path):
    missing = tmp_path / "no-such-model"
    message = fail(capsys, train_args(missing, good, tmp_path / "out"))
    assert message == f"--model: model path '{missing}' does not exist"


def test_an_unloadable_tokenizer_is_one_whole_line(capsys, tiny_model_dir, good, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").unlink()  # and no slow tokenizer to convert from
    message = fail(capsys, train_args(broken, good, tmp_path / "out"))
    assert message.startswith(f"--model: cannot load a tokenizer from '{broken}': ")
    # the library's message runs over several lines: all of it, not the first line's half
    assert not message.endswith(":") and "(1)" in message, message


def test_missing_dataset_file(capsys, tiny_model_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert fail(capsys, train_args(tiny_model_dir, missing, tmp_path / "out")) == f"{missing}: file not found"


def test_max_length_that_no_pair_fits(capsys, tiny_model_dir, good, tmp_path):
    message = fail(capsys, train_args(tiny_model_dir, good, tmp_path / "out", "--max-length", "3",
                                      "--max-prompt-length", "3"))  # fmt: skip
    assert message.startswith(f"{good}: no pair fits max_length=3")


def test_config_file_errors(capsys, tiny_model_dir, good, tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("loss: dpo\nbetta: 0.2\n")
    args = train_args(tiny_model_dir, good, tmp_path / "out", "--config", str(unknown))
    assert fail(capsys, args) == f"{unknown}:2: unknown setting 'betta' (did you mean 'beta'?)"
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: dpo\nbeta: [0.1\nseed: 3\n")
    args = train_args(tiny_model_dir, good, tmp_path / "out", "--config", str(broken))
    assert fail(capsys, args) == f"{broken}:3: invalid YAML: expected ',' or ']', but got ':'"


def test_non_empty_output_dir_is_refused_and_kept(capsys, tiny_model_dir, good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    message = fail(capsys, train_args(tiny_model_dir, good, out))
    assert message.startswith(f"--output-dir: '{out}' is not empty; pass --resume")
    assert (out / "notes.txt").read_text() == "precious"


def test_overwrite_with_bad_input_destroys_nothing(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"steps": 7}')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b"}\n')
    message = fail(capsys, train_args(tiny_model_dir, bad, out, "--overwrite"))
    assert message == f"{bad}: missing column 'rejected' (columns: prompt, chosen)"
    assert json.loads((out / "summary.json").read_text()) == {"steps": 7}


def test_resume_without_checkpoint(capsys, tiny_model_dir, good, tmp_path):
    message = fail(capsys, train_args(tiny_model_dir, good, tmp_path / "out", "--resume"))
    assert message == f"--resume: no checkpoint in '{tmp_path / 'out' / 'checkpoints'}' to resume from"


def test_ref_model_with_reference_free_loss(capsys, tiny_model_dir, good, tmp_path):
    args = train_args(tiny_model_dir, good, tmp_path / "out", "--loss", "simpo", "--ref-model",
                      str(tiny_model_dir))  # fmt: skip
    assert fail(capsys, args) == "--ref-model: simpo is reference-free and uses no reference"


@pytest.mark.slow  # a subprocess run
@pytest.mark.parametrize("case", ["bad-json", "bad-model"])
def test_no_traceback_in_a_real_process(case, tiny_model_dir, good, tmp_path):
    """The console sees exactly one line on stderr and exit status 2."""
    data, model = good, tiny_model_dir
    if case == "bad-json":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": \n')
    else:
        model = tmp_path / "missing-model"
    result = subprocess.run([sys.executable, "-m", "direct_align",
                             *train_args(model, data, tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1
    assert (str(data) + ":2:" if case == "bad-json" else str(model)) in error_lines[0]
    assert not (tmp_path / "out").exists()
