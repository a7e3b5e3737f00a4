"""Turn a failed file load into one line that says which line of the file is wrong.

``datasets`` reports broken files with nested pyarrow or pandas exceptions whose messages count
rows inside internal blocks. When a load fails, the file is scanned again here with the standard
library, which knows line numbers, to name the first line that is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from direct_align.errors import DataError

_CSV_LINE = re.compile(r"\bline (\d+)\b")
_CSV_NOISE = re.compile(r"^Error tokenizing data\. C error: ")


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """The most specific message in ``exc``'s cause chain, on one line of at most ``limit`` chars."""
    best = exc
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current).strip():
            best = current
        current = current.__cause__ or current.__context__
    lines = [line.strip() for line in str(best).splitlines() if line.strip()]
    text = lines[0] if lines else type(best).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_kind(value: Any) -> str:
    """A user-facing name for the JSON type of a decoded value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def read_text(path: Path, source: str) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        DataError: ``source:LINE: not valid UTF-8 text`` or ``source: cannot read file: ...``.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot read file: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{source}:{line}: not valid UTF-8 text") from exc


def _array_items(text: str) -> Iterator[tuple[Any, int]]:
    """Yield ``(item, line)`` for each element of a JSON array that is known to parse."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        item, pos = decoder.raw_decode(text, pos)
        yield item, line


def _jsonl_items(text: str, source: str) -> Iterator[tuple[Any, int]]:
    """Yield ``(item, line)`` for each non-blank line; the first undecodable line raises."""
    # Split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may hold.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw), number
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{number}: invalid JSON: {exc.msg}") from exc


def check_json_rows(items: Iterator[tuple[Any, int]], source: str) -> int:
    """Check that every item is an object and each field keeps one JSON type; return the count.

    Raises:
        DataError: naming the first line whose item is not an object or whose field changes type.
    """
    first_seen: dict[str, tuple[str, int]] = {}
    count = 0
    for item, line in items:
        if not isinstance(item, dict):
            raise DataError(f"{source}:{line}: expected a JSON object, found a {json_kind(item)}")
        for key, value in item.items():
            if value is None:
                continue
            kind = json_kind(value)
            seen = first_seen.setdefault(key, (kind, line))
            if seen[0] != kind:
                raise DataError(
                    f"{source}:{line}: field '{key}' is a {kind} here but a {seen[0]} "
                    f"on line {seen[1]}"
                )
        count += 1
    return count


def diagnose_json(path: Path, source: str, exc: BaseException) -> DataError:
    """Explain why ``datasets`` could not read a ``.json``/``.jsonl`` file."""
    text = read_text(path, source)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return DataError(f"{source}:{err.lineno}: invalid JSON: {err.msg}")
        count = check_json_rows(_array_items(text), source)
    else:
        count = check_json_rows(_jsonl_items(text, source), source)
    if count == 0:
        return DataError(f"{source}: no rows")
    return DataError(f"{source}: cannot be read as a table: {short_reason(exc)}")


def diagnose_csv(path: Path, source: str, exc: BaseException) -> DataError:
    """Explain why ``datasets`` could not read a ``.csv`` file."""
    text = read_text(path, source)
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows, None)
        has_data = any(any(cell.strip() for cell in row) for row in rows)
    except csv.Error:
        header, has_data = [], True
    if header is None or not any(cell.strip() for cell in header):
        return DataError(f"{source}: no header row (the file is empty)")
    if not has_data:
        return DataError(f"{source}: no rows (only a header)")
    reason = _CSV_NOISE.sub("", short_reason(exc))
    match = _CSV_LINE.search(reason)
    if match:
        return DataError(f"{source}:{match.group(1)}: malformed CSV: {reason}")
    return DataError(f"{source}: malformed CSV: {reason}")


def csv_header(path: Path, source: str) -> list[str]:
    """The column names on the first line of a CSV file.

    Raises:
        DataError: when the file is unreadable, empty or names a column twice.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), None)
    except UnicodeDecodeError:
        read_text(path, source)  # raises with the line of the first bad byte
        raise
    except OSError as exc:
        raise DataError(f"{source}: cannot read file: {exc.strerror or exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{source}:1: malformed CSV header: {exc}") from exc
    if not header or not any(cell.strip() for cell in header):
        raise DataError(f"{source}: no header row (the file is empty)")
    # Name blank header cells as pandas does (a saved DataFrame index has one).
    names = [name if name.strip() else f"Unnamed: {i}" for i, name in enumerate(header)]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{source}:1: duplicate column '{name}'")
        seen.add(name)
    return names
