"""Loading sources: every file type, saved data sets, hub names, and one-line errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest

from direct_align.data import load_source
from direct_align.errors import DataError

ROWS = [
    {"prompt": "the movie", "chosen": " was great.", "rejected": " was dull."},
    {"prompt": "the plot", "chosen": " was clever.", "rejected": " was silly."},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_lines(path, [json.dumps(row) for row in rows])


def error_of(source: str | Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_source(str(source), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- files that load -----------------------------------------------------------------------


def test_jsonl_loads(tmp_path: Path) -> None:
    ds = load_source(str(write_jsonl(tmp_path / "pairs.jsonl", ROWS)))
    assert ds.to_list() == ROWS


def test_json_array_loads(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load_source(str(path)).to_list() == ROWS


def test_json_lines_in_json_file_load(tmp_path: Path) -> None:
    assert load_source(str(write_jsonl(tmp_path / "pairs.json", ROWS))).to_list() == ROWS


def test_parquet_loads(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    assert load_source(str(path)).to_list() == ROWS


def test_csv_loads_every_cell_as_text(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "pairs.csv",
        ["prompt,chosen,rejected,score", '42,NA,"two\nlines",3', "None,a,b,4"],
    )
    assert load_source(str(path)).to_list() == [
        {"prompt": "42", "chosen": "NA", "rejected": "two\nlines", "score": "3"},
        {"prompt": "None", "chosen": "a", "rejected": "b", "score": "4"},
    ]


def test_csv_written_by_pandas_with_index_loads(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    pd.DataFrame(ROWS).to_csv(path)  # the index column has an empty header cell
    ds = load_source(str(path))
    assert ds.select_columns(["prompt", "chosen", "rejected"]).to_list() == ROWS


def test_saved_dataset_directory_loads(tmp_path: Path) -> None:
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert load_source(str(tmp_path / "saved")).to_list() == ROWS


def test_saved_dataset_dict_takes_the_split(tmp_path: Path) -> None:
    path = tmp_path / "saved"
    splits = {
        "train": datasets.Dataset.from_list(ROWS),
        "test": datasets.Dataset.from_list(ROWS[:1]),
    }
    datasets.DatasetDict(splits).save_to_disk(str(path))
    assert len(load_source(str(path))) == 2
    assert len(load_source(str(path), split="test")) == 1
    message = error_of(path, split="validation")
    assert message == f"{path}: no split 'validation' (available: train, test)"


def test_split_does_not_apply_to_a_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    assert len(load_source(str(path), split="test")) == 2


# --- broken files -------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path`` so that sources can be given as bare file names."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_jsonl_syntax_error_names_the_line(in_tmp: Path) -> None:
    write_lines(in_tmp / "data.jsonl", [json.dumps(ROWS[0]), "", '{"prompt": "a" "chosen": 1}'])
    assert error_of("data.jsonl") == "data.jsonl:3: invalid JSON: Expecting ',' delimiter"


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "list"), ("7", "number"), ('"x"', "string")])
def test_jsonl_row_that_is_not_an_object(in_tmp: Path, line: str, kind: str) -> None:
    write_lines(in_tmp / "data.jsonl", [json.dumps(ROWS[0]), line])
    assert error_of("data.jsonl") == f"data.jsonl:2: expected a JSON object, found a {kind}"


def test_json_array_syntax_error_names_the_line(in_tmp: Path) -> None:
    write_lines(in_tmp / "data.json", ["[", json.dumps(ROWS[0]) + ",", json.dumps(ROWS[1]), "}"])
    assert error_of("data.json").startswith("data.json:4: invalid JSON: ")


def test_json_array_item_that_is_not_an_object(in_tmp: Path) -> None:
    write_lines(in_tmp / "data.json", ["[", json.dumps(ROWS[0]) + ",", "  [1, 2]", "]"])
    assert error_of("data.json") == "data.json:3: expected a JSON object, found a list"


@pytest.mark.parametrize(
    ("name", "data"),
    [("data.jsonl", b'{"prompt": "a"}\n{"prompt": "\xff"}\n'), ("data.csv", b"prompt\na\n\xff\n")],
)
def test_invalid_utf8_names_the_line(in_tmp: Path, name: str, data: bytes) -> None:
    (in_tmp / name).write_bytes(data)
    line = data.count(b"\n")
    assert error_of(name) == f"{name}:{line}: not valid UTF-8 text"


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.csv", "data.parquet"])
def test_empty_file(in_tmp: Path, name: str) -> None:
    (in_tmp / name).write_bytes(b"")
    assert error_of(name) == f"{name}: file is empty"


def test_blank_jsonl_has_no_rows(in_tmp: Path) -> None:
    (in_tmp / "data.jsonl").write_text("\n  \n\n", encoding="utf-8")
    assert error_of("data.jsonl") == "data.jsonl: no rows"


def test_empty_json_array_has_no_rows(in_tmp: Path) -> None:
    (in_tmp / "data.json").write_text("[]", encoding="utf-8")
    assert error_of("data.json") == "data.json: no rows"


def test_csv_with_only_a_header_has_no_rows(in_tmp: Path) -> None:
    write_lines(in_tmp / "data.csv", ["prompt,chosen"])
    assert error_of("data.csv").startswith("data.csv: no rows")


def test_csv_bad_row_names_the_line(in_tmp: Path) -> None:
    write_lines(in_tmp / "data.csv", ["prompt,chosen", "a,b", "c,d,e"])
    message = error_of("data.csv")
    assert message.startswith("data.csv:3: malformed CSV: ")
    assert "Expected 2 fields" in message


def test_csv_duplicate_column(in_tmp: Path) -> None:
    write_lines(in_tmp / "data.csv", ["prompt,chosen,chosen", "a,b,c"])
    assert error_of("data.csv") == "data.csv:1: duplicate column 'chosen'"


def test_garbage_parquet(in_tmp: Path) -> None:
    (in_tmp / "data.parquet").write_text("not parquet at all", encoding="utf-8")
    assert error_of("data.parquet").startswith("data.parquet: not a readable Parquet file (")


def test_unsupported_extension(in_tmp: Path) -> None:
    (in_tmp / "data.txt").write_text("hello", encoding="utf-8")
    assert error_of("data.txt") == (
        "data.txt: unsupported file type '.txt' (supported: .jsonl, .json, .parquet, .csv)"
    )


# --- directories, missing paths, hub names -------------------------------------------------


def test_directory_that_is_not_a_saved_dataset(in_tmp: Path) -> None:
    (in_tmp / "folder").mkdir()
    assert "folder: is a directory but not a data set saved with save_to_disk" in error_of("folder")


def test_directory_named_like_a_file(in_tmp: Path) -> None:
    (in_tmp / "data.jsonl").mkdir()
    assert error_of("data.jsonl").startswith("data.jsonl: is a directory but not a data set")


@pytest.mark.parametrize("source", ["missing.jsonl", "./missing", "sub/missing.csv", "/no/such"])
def test_missing_path_is_file_not_found(in_tmp: Path, source: str) -> None:
    assert error_of(source) == f"{source}: file not found"


def test_empty_source() -> None:
    assert "empty" in error_of("  ")


def test_unknown_hub_name_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The flags are read when the libraries are imported, so set them where they are kept.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    message = error_of("no-such-org-x9/no-such-dataset")
    assert time.monotonic() - start < 10
    assert message.startswith(
        "dataset 'no-such-org-x9/no-such-dataset' is not a local file or directory and could "
        "not be loaded from the Hugging Face Hub: "
    )
