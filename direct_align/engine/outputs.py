"""The run directory: refusal rules, checkpoints that prove themselves intact, atomic writes.

Layout: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/step-NNNNNN/``,
``final/``. Nothing in an existing directory is touched until every input has been validated,
and files are written to a temporary name and renamed, so a failed run destroys nothing.

A checkpoint is complete when its ``manifest.json`` exists: written last, it lists every file of
the checkpoint with its size and xxh3-64 checksum. ``--resume`` takes the newest checkpoint whose
files all match their manifest, says which damaged ones it passed over, and refuses a checkpoint
that holds a file the manifest does not list (a pickle planted there could run code).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xxhash

from direct_align.errors import ConfigError, DirectAlignError

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(DirectAlignError):
    """A write failed because the file system is full (or over quota)."""


def disk_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc``, raised while writing under ``path``, means the disk is full: ENOSPC or
    EDQUOT, or a writer that hides its errno (torch's zip writer: "unexpected pos") on a file
    system with less than 1 MiB free."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    if "No space left" in str(exc) or "Disk quota" in str(exc):
        return True
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        return shutil.disk_usage(existing).free < 2**20
    except (OSError, StopIteration):
        return False


@contextmanager
def writing(path: Path, note: str = "") -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one line (:class:`DiskFull`) that names it;
    ``note`` says what is intact and what to do."""
    try:
        yield
    except Exception as e:  # torch, safetensors and the OS each say it in their own way
        if disk_full(e, path):
            raise DiskFull(f"no space left on device writing {path}{note}") from None
        raise


def file_digest(path: Path) -> str:
    """xxh3-64 of a file's bytes (about 10 GB/s): what it holds, whatever its name or mtime."""
    h = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def write_manifest(directory: Path) -> None:
    """List every file of ``directory`` with its size and checksum, in ``manifest.json``."""
    files = {name: {"size": (directory / name).stat().st_size, "xxh3": file_digest(directory / name)}
             for name in _files(directory) if name != MANIFEST}  # fmt: skip
    write_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1))


def damage(directory: Path) -> str | None:
    """What is wrong with a checkpoint (None when every file matches its manifest); raises
    :class:`ConfigError` for a file the manifest does not list."""
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    planted = [name for name in _files(directory) if name not in listed and name != MANIFEST]
    if planted:
        raise ConfigError(f"--resume: {directory} holds {planted[0]}, which direct-align did not "
                          "write; refusing to load it (a planted file could run code). Remove "
                          "the checkpoint or the file")  # fmt: skip
    for name, want in listed.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, not {want['size']}"
        if file_digest(path) != want["xxh3"]:
            return f"{name} does not match its checksum"
    return None


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"

    def check(self, *, resume: bool, overwrite: bool, resumable: bool = True) -> None:
        """Refuse what would lose or mix up earlier work; touches nothing. A run can be resumed
        from its checkpoints, or from its start when it stopped before the first one (its
        ``config.yaml`` exists); ``resumable``: the command has ``--resume``."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--output-dir: '{p}' exists and is not a directory")
        non_empty = p.is_dir() and any(p.iterdir())
        if resume:
            if self.last_checkpoint() is None and not (p / "config.yaml").is_file():
                raise ConfigError(f"--resume: no checkpoint in '{p / 'checkpoints'}' to resume from")
            if self.final.exists():
                raise ConfigError(f"--resume: '{p}' holds a finished run (final/ exists)")
        elif non_empty and not overwrite:
            choices = "--resume to continue that run or --overwrite" if resumable else "--overwrite"
            raise ConfigError(f"--output-dir: '{p}' is not empty; pass {choices} to replace it")

    def prepare(self, *, overwrite: bool, checkpoints: bool = True) -> None:
        """Create the directory (and ``checkpoints/``); with ``overwrite`` empty it first (after
        validation only)."""
        if overwrite and self.path.is_dir():
            for child in self.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        if checkpoints:
            self.checkpoints.mkdir(exist_ok=True)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints whose manifest was written (their save finished), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(d for d in self.checkpoints.glob("step-*")
                      if d.is_dir() and (d / MANIFEST).is_file())  # fmt: skip

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (not yet verified)."""
        return next(reversed(self.complete_checkpoints()), None)

    def intact_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files all match their manifest, after saying which newer
        ones were passed over; None when there is none at all. Raises :class:`ConfigError` when
        every checkpoint is damaged."""
        damaged = []
        for checkpoint in reversed(self.complete_checkpoints()):
            problem = damage(checkpoint)
            if problem is None:
                if damaged:
                    log.warning("--resume: %s; resuming from %s", "; ".join(damaged), checkpoint.name)
                return checkpoint
            damaged.append(f"{checkpoint.name} is damaged ({problem})")
        if damaged:
            raise ConfigError(f"--resume: no intact checkpoint in '{self.checkpoints}' "
                              f"({'; '.join(damaged)})")  # fmt: skip
        return None

    def save_checkpoint(self, step: int, save: Callable[[Path], None], state: dict[str, Any],
                        keep: int, *, main: bool = True, barrier: Callable[[], None] = lambda: None,
                        failed_anywhere: Callable[[bool], bool] = bool) -> Path:  # fmt: skip
        """``save(dir)`` writes the weights and optimizer; the state file and the manifest,
        written last by the ``main`` process, complete it; the oldest beyond ``keep`` are
        removed (never the new one).

        With several processes every one calls this (``save`` writes each one's part), between
        ``barrier``s; a write that fails in any process (``failed_anywhere``) fails in all, the
        half-written checkpoint is removed and the previous ones stay as they were.
        """
        final = self.checkpoints / f"step-{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        note = f"; last complete checkpoint: {self.last_checkpoint()} (free space, then --resume)"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()

        def attempt(write: Callable[[], None]) -> None:  # in every process, failing in all
            error: DiskFull | None = None
            try:
                with writing(tmp, note):
                    write()
            except DiskFull as e:
                error = e
            if failed_anywhere(error is not None):  # a collective: every process's write is done
                if main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise error or DiskFull(f"no space left on device in another process writing "
                                        f"{tmp}{note}")  # fmt: skip

        def complete() -> None:  # the main process, once every process's files are written
            if main:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
                write_manifest(tmp)

        attempt(lambda: save(tmp))
        attempt(complete)
        if main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        with writing(path):
            return write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())
