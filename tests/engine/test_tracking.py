"""metrics.jsonl: one run's records after a resume, whatever a crash or a full disk left."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from direct_align.engine.outputs import DiskFull
from direct_align.engine.tracking import Tracker, read_metrics, table
from direct_align.settings import TrackerSettings


def tracker(out: Path, resume_step: int | None = None) -> Tracker:
    return Tracker(out, TrackerSettings(report_to="none"), config={}, resume_step=resume_step)


def test_resume_keeps_the_records_up_to_the_checkpoint_and_drops_a_half_written_line(
        tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.4}\n'
                    '{"step": 3, "train/loss": 0.3}\n{"step": 4, "train/lo')  # a crash mid-write
    t = tracker(tmp_path, resume_step=3)
    t.log({"train/loss": 0.2}, 4)
    t.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert path.read_text().endswith('"train/loss": 0.2}\n')


def test_a_record_on_a_full_disk_fails_in_one_line_and_leaves_no_half_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    if not os.path.exists("/dev/full"):
        pytest.fail("this test needs /dev/full (Linux)")
    t = tracker(tmp_path)
    with pytest.raises(DiskFull, match=r"^no space left on device writing .*metrics.jsonl "
                                       r"\(free space, then --resume\)$"):  # fmt: skip
        t.log({"train/loss": 0.2}, 1)
    t.close()


def test_records_are_json_with_null_for_non_finite_values(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    t.log({"a": float("nan"), "b": 1}, 0)
    t.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "a": None, "b": 1}


def test_table_aligns_columns() -> None:
    text = table(["", "before", "after"], [("loss", 0.69314, 0.5), ("name", None, "x")])
    assert text.splitlines() == ["          before       after",
                                 "loss       0.693       0.500",
                                 "name           –           x"]  # fmt: skip
