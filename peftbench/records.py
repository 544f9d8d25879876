"""The local results store: one JSON record per run, written atomically.

A run writes `record.json` into its own Hydra output directory and a copy into
`<results_dir>/<study>/<run_id>.json`; the comparison report reads these files, never W&B internals.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_VERSION = 1
VERSIONED_PACKAGES = ("torch", "lightning", "transformers", "datasets", "hydra-core", "bitsandbytes", "peft")


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


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def environment() -> dict[str, Any]:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "host": socket.gethostname(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "versions": versions(),
    }


def write_record(record: dict[str, Any], run_dir: Path, store_dir: Path | None) -> list[Path]:
    """Write the record into the run directory and, when given, into the results store."""
    record = {"record_version": RECORD_VERSION, **record}
    paths = [run_dir / "record.json"]
    if store_dir is not None:
        paths.append(store_dir / f"{record['run_id']}.json")
    for path in paths:
        atomic_write_json(path, record)
    return paths


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every record under `directory` (recursively), skipping files that are not records."""
    records = []
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(payload, dict) and "record_version" in payload and "run_id" in payload:
            records.append(payload)
    return records
