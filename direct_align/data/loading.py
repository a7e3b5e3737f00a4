"""Load a preference data set from a file, a ``save_to_disk`` directory or the Hugging Face Hub.

Every problem becomes a one-line :class:`~direct_align.errors.DataError` that names the source as
the user wrote it, and for broken files the line that is wrong.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets

from direct_align.data.diagnose import csv_header, diagnose_csv, diagnose_json, short_reason
from direct_align.engine.outputs import file_digest
from direct_align.errors import DataError

#: File extension -> ``datasets`` builder.
BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Extensions that make a missing source count as a mistyped path rather than a hub name.
PATH_SUFFIXES = frozenset(BUILDERS) | {".arrow", ".tsv", ".txt", ".gz", ".zst", ".zip"}
DEFAULT_SPLIT = "train"


def load_source(source: str, *, split: str | None = None) -> datasets.Dataset:
    """Load ``source`` as one table of rows.

    ``source`` is, in this order of precedence:

    * an existing directory written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``,
      of which ``split`` is taken, default ``"train"``);
    * an existing ``.jsonl``/``.json`` (JSON lines or one JSON array of objects), ``.parquet`` or
      ``.csv`` file (CSV cells are read as text; an empty cell is an empty string);
    * otherwise, unless it looks like a path, the name of a Hugging Face Hub data set, of which
      ``split`` is taken (default ``"train"``).

    Files and saved single data sets are one table; ``split`` does not apply to them and is
    ignored (so one ``--split`` can serve a hub training set and a local eval file).

    Raises:
        DataError: the source is missing, unreadable, malformed or has no rows.
    """
    if not source.strip():
        raise DataError("no data source given (the path or data set name is empty)")
    path = Path(os.path.expanduser(source))
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as exc:
        raise DataError(f"{source}: cannot access: {exc.strerror or exc}") from exc
    if is_dir:
        ds = _load_directory(path, source, split)
    elif exists:
        ds = _load_file(path, source)
    elif looks_like_path(source):
        raise DataError(f"{source}: file not found")
    else:
        ds = _load_hub(source, split)
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    return ds


def looks_like_path(source: str) -> bool:
    """Whether a source that does not exist was meant as a local path rather than a hub name."""
    separators = tuple(sep for sep in (os.sep, os.altsep, "/") if sep)
    if source.startswith((*separators, ".", "~")):
        return True
    return Path(source).suffix.lower() in PATH_SUFFIXES


@contextmanager
def _quiet_datasets_logs() -> Iterator[None]:
    """Silence the ``datasets`` logger; its errors are re-reported as one DataError line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_file(path: Path, source: str) -> datasets.Dataset:
    suffix = path.suffix.lower()
    builder = BUILDERS.get(suffix)
    if builder is None:
        found = f"'{suffix}'" if suffix else "without an extension"
        raise DataError(
            f"{source}: unsupported file type {found} (supported: {', '.join(BUILDERS)})"
        )
    try:
        with path.open("rb") as handle:
            empty = not handle.read(1)
    except OSError as exc:
        raise DataError(f"{source}: cannot read file: {exc.strerror or exc}") from exc
    if empty:
        raise DataError(f"{source}: file is empty")

    kwargs: dict[str, object] = {}
    if builder == "csv":
        columns = csv_header(path, source)
        kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in columns})
        kwargs["keep_default_na"] = False  # keep "NA", "None", "" as the text they are
    try:
        with _quiet_datasets_logs():
            # `datasets` caches a local file by its path and modification time, so a file edited
            # with its mtime kept would be read stale: its content names the cache entry instead
            ds = datasets.load_dataset(builder, name=f"content-{file_digest(path)}",
                                       data_files=str(path), split="train", **kwargs)  # fmt: skip
        # Invalid UTF-8 can reach the table unchecked and fail much later; find it now.
        getattr(ds.data, "table", ds.data).validate(full=True)
    except Exception as exc:
        raise _diagnose(builder, path, source, exc) from exc
    return ds


def _diagnose(builder: str, path: Path, source: str, exc: BaseException) -> DataError:
    if builder == "json":
        return diagnose_json(path, source, exc)
    if builder == "csv":
        return diagnose_csv(path, source, exc)
    return DataError(f"{source}: not a readable Parquet file ({short_reason(exc)})")


def _load_directory(path: Path, source: str, split: str | None) -> datasets.Dataset:
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not (path / "state.json").is_file():
        raise DataError(
            f"{source}: is a directory but not a data set saved with save_to_disk "
            "(it has no dataset_dict.json or state.json)"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{source}: cannot load the saved data set: {short_reason(exc)}") from exc
    if isinstance(loaded, datasets.Dataset):
        return loaded
    name = split or DEFAULT_SPLIT
    if name not in loaded:
        available = ", ".join(loaded) or "none"
        raise DataError(f"{source}: no split '{name}' (available: {available})")
    return loaded[name]


def _load_hub(source: str, split: str | None) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(source, split=split or DEFAULT_SPLIT)
    except Exception as exc:
        raise DataError(
            f"dataset '{source}' is not a local file or directory and could not be loaded from "
            f"the Hugging Face Hub: {short_reason(exc)}"
        ) from exc
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"dataset '{source}': expected one split, got {type(ds).__name__}")
    return ds
