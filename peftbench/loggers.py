"""Experiment loggers: Weights & Biases (offline unless the user is logged in) or none at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from peftbench.errors import bad_value

LOGGERS = ("wandb", "none")


def wandb_logged_in() -> bool:
    """True when an API key is available without prompting (env var or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return netrc.exists() and "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def build_logger(cfg: Any, run_dir: Path, flat_config: dict[str, Any]) -> Logger | bool:
    """A WandbLogger carrying the full resolved config, tags and group; `False` for `logger=none`."""
    kind = cfg.logger.name
    if kind not in LOGGERS:
        raise bad_value("logger", kind, LOGGERS)
    if kind == "none":
        return False
    if not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return WandbLogger(
        project=cfg.logger.project,
        group=cfg.logger.group,
        name=cfg.logger.run_name,
        tags=list(cfg.logger.tags),
        save_dir=str(run_dir),
        config=flat_config,
        job_type=cfg.logger.job_type,
    )
