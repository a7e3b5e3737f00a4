"""Read back an offline W&B run file (``run-*.wandb``) with wandb's own record definitions.

Used by the tests (what each command sent to W&B) and by scripts/dashboard_images.py (the
panels of docs/dashboards.md); wandb itself has no Python reader for its run files any more.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version), then records in
the LevelDB log format (32 KiB blocks; each chunk has a 7-byte header: checksum, length, type),
each record a ``wandb_internal_pb2.Record`` protobuf. Tests read what a run really wrote: its
config, history rows, summary, tables and artifacts, with no mock of wandb.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _value(item: Any) -> Any:
    return json.loads(item.value_json)


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class Run:
    """What one offline run wrote (``path``: its run directory)."""

    path: Path = Path()
    id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)

    def curve(self, key: str) -> list[tuple[int, Any]]:
        """(step, value) of every history row that has ``key``."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def read_run(run_dir: Path) -> Run:
    """The run in an offline run directory (``wandb/offline-run-*``)."""
    run = Run(path=run_dir)
    for record in records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.name, run.group, run.project = r.run_id, r.display_name, r.run_group, r.project
            run.notes, run.tags = r.notes, list(r.tags)
            for item in r.config.update:
                run.config[_key(item)] = _value(item)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = _value(item)
        elif kind == "history":
            run.history.append({_key(item): _value(item) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = _value(item)
        elif kind == "artifact":
            run.artifacts.append(record.artifact.name)
    return run


def read_table(run_dir: Path, run: Run, key: str) -> list[dict[str, Any]]:
    """The rows of the last table logged under ``key`` (its file is kept beside the run)."""
    path = run_dir / "files" / run.summary[f"{key}/path"]
    table = json.loads(path.read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def read_runs(output_dir: Path) -> list[Run]:
    """Every offline run under ``output_dir/wandb`` (oldest first). Folder names hold the start
    time to the second only, so runs that follow each other are ordered by when their run file
    was last written (each run writes it until it ends)."""
    def finished(d: Path) -> int:
        return max(f.stat().st_mtime_ns for f in d.glob("*.wandb"))

    return [read_run(d) for d in sorted((output_dir / "wandb").glob("offline-run-*"), key=finished)]
