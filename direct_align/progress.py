"""Progress bars: live on a terminal, one update every 30 s when stderr is a log file."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress(**kwargs: Any) -> tqdm:
    """A tqdm bar that does not flood the logs of batch jobs (its writes go to stderr)."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("disable", os.environ.get("RANK", "0") != "0")  # other processes: no bars
    return tqdm(mininterval=0.1 if interactive else 30.0, dynamic_ncols=interactive, **kwargs)
