"""Running one stage of a comparison: cold (a new process) and warm (forked from a server)."""

from __future__ import annotations

import pytest

from direct_align.compare.execute import run_stage
from direct_align.compare.plan import Stage
from direct_align.errors import DirectAlignError


@pytest.mark.slow
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_failing_stage_names_its_command_its_error_and_its_log(tmp_path, warm) -> None:
    stage = Stage("train", "train", ("--loss", "no-such-loss"))
    with pytest.raises(DirectAlignError) as failure:
        run_stage(stage, tmp_path / "run", tmp_path / "cache", warm=warm)
    message = str(failure.value)
    assert "`direct-align train --loss no-such-loss" in message
    assert "exit status 2" in message and "no-such-loss" in message.split("(", 1)[1]
    log = tmp_path / "run.log"
    assert f"log: {log}" in message and "no-such-loss" in log.read_text()
    assert not (tmp_path / "run").exists()  # refused before anything was written
