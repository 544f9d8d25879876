"""The local results store: one JSON record per run, written atomically.

A run writes `record.json` into its own Hydra output directory and a copy into
`<results_dir>/<study>/<run_id>.json`; the comparison report reads these files, never W&B internals.

Secrets never reach a record, a config file or a log: the value of every environment variable whose name
contains KEY, TOKEN, SECRET or PASSWORD (WANDB_API_KEY, HF_TOKEN, ...) is replaced by `<redacted:NAME>`
wherever it occurs in a string (`redact`, applied by `write_record`, to the logged config, the run's
`.hydra/*.yaml` and every log line).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_VERSION = 1
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
#: shorter values (and booleans, modes) are too common to be secrets: redacting them would garble records
MIN_SECRET_LENGTH = 8
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


def secret_values(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`{value: NAME}` for every environment variable whose name contains KEY/TOKEN/SECRET/PASSWORD (or
    PASSWD/CREDENTIAL), skipping values shorter than 8 characters and existing paths (not secrets)."""
    environ = dict(os.environ if environ is None else environ)
    found: dict[str, str] = {}
    for name, value in environ.items():
        upper = name.upper()
        if not any(word in upper for word in SECRET_WORDS) or len(value) < MIN_SECRET_LENGTH:
            continue
        if os.path.exists(value):
            continue
        found[value] = name
    return found


def redact(payload: Any, secrets: dict[str, str] | None = None) -> Any:
    """`payload` with every occurrence of a secret value in any string (keys too) replaced by
    `<redacted:NAME>`; containers are copied, everything else returned as it is."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return payload
    ordered = sorted(secrets.items(), key=lambda item: -len(item[0]))  # longest first: no partial leftovers

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            for secret, name in ordered:
                if secret in value:
                    value = value.replace(secret, f"<redacted:{name}>")
            return value
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(clean(v) for v in value)
        return value

    return clean(payload)


class RedactSecrets(logging.Filter):
    """A logging filter: secret values in a log line become `<redacted:NAME>`."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        if secrets:
            message = record.getMessage()
            cleaned = redact(message, secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, ()
        return True


def install_log_redaction() -> None:
    """Put `RedactSecrets` on every handler of the root logger (the run's log file and the console)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def redact_files(directory: Path) -> None:
    """Rewrite the text files in `directory` (a run's `.hydra/`) that contain a secret value."""
    secrets = secret_values()
    if not secrets or not directory.is_dir():
        return
    for path in directory.glob("*.yaml"):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        cleaned = redact(text, secrets)
        if cleaned != text:
            path.write_text(cleaned)


def write_record(record: dict[str, Any], run_dir: Path, store_dir: Path | None) -> list[Path]:
    """Write the record (secrets redacted) into the run directory and, when given, the results store."""
    record = redact({"record_version": RECORD_VERSION, **record})
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
