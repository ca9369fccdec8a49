"""The one JSON-lines reader: one object per non-blank line, one error format.

Used by ingest (JSON-lines dumps), the drift monitor's batches and ``lmpipe predict --file``, so a
bad line reads the same wherever it is met: ``FILE:LINE: invalid JSON (message at column N)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline_tasks.errors import DataError


def parse_json_line(line: str, where: str) -> dict[str, Any]:
    """One JSON object from one line; ``where`` (``file:line``) names it in the error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); one JSON object per line") from exc
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def iter_json_objects(lines: Iterable[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``lines`` (numbered from 1)."""
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield number, parse_json_line(line, f"{name}:{number}")


def read_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a UTF-8 JSON-lines file."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        yield from iter_json_objects(fh, str(path))
