"""Files written all at once: a JSON file (records, state files) and a whole output directory (the export
and merge commands): a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftbench.errors import ConfigError


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync it, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_out(path: str | Path, marker: str) -> Path:
    """`path` if a command may write its output directory there (see `atomic_directory`); else ConfigError.
    Commands call it before their slow work too, so a bad --out fails at once."""
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists())):
        raise ConfigError(
            f"--out={str(path)!r} exists and holds other things; accepted: a new or empty directory, or one "
            f"written by this command before (holding {marker})"
        )
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path, marker: str) -> Iterator[Path]:
    """Write a directory all at once: yields an empty sibling to fill; on success it takes `path`'s place,
    on an error it is deleted and `path` is left as it was.

    An existing `path` is replaced only if it is empty or holds `marker` (an earlier output of the same
    kind): a directory of other files is refused with a ConfigError rather than deleted."""
    path = check_out(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
