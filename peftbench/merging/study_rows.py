"""The merging study's rows on disk: one JSONL file per phase (selection, test, diagnostics), appended one
finished piece at a time, so that the study resumes by skipping the rows already there."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file; none when it does not exist yet."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and fsync it: a finished piece of the study survives an interruption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def find_row(rows: Sequence[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    """The first row whose fields equal `keys` (a finished piece), or None."""
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)
