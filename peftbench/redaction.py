"""Secrets never reach a record, a config file or a log: the value of every environment variable whose name
contains KEY, TOKEN, SECRET or PASSWORD (WANDB_API_KEY, HF_TOKEN, ...) is replaced by `<redacted:NAME>`
wherever it occurs in a string (`redact`, applied by `write_record`, to the logged config, the run's
`.hydra/*.yaml` and every log line).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
#: shorter values (and booleans, modes) are too common to be secrets: redacting them would garble records
MIN_SECRET_LENGTH = 8


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
