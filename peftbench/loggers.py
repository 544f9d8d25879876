"""Experiment loggers: Weights & Biases (offline unless the user is logged in) or none at all, and the one
login check the loggers and the comparison's W&B output share (`wandb_login`)."""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger

from peftbench.errors import bad_value

LOGGERS = ("wandb", "none")
DEFAULT_HOST = "api.wandb.ai"


@dataclass(frozen=True)
class WandbLogin:
    """Whether W&B runs sync to a server (`online`), the mode they run in, the server's host and why."""

    online: bool
    mode: str  # online | offline | disabled
    host: str
    reason: str


def _host(url: str) -> str:
    parsed = urlparse(url if "//" in url else f"//{url}")
    return parsed.hostname or url


def _netrc_has(host: str) -> bool:
    """A netrc entry with a password (the API key) for `host` ($NETRC, else ~/.netrc)."""
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_login() -> WandbLogin:
    """Where W&B would send a run, decided without prompting and without the network: WANDB_MODE
    `disabled` or `offline`/`dryrun` win; then an API key (WANDB_API_KEY) or a netrc entry for the server
    (WANDB_BASE_URL's host, a self-hosted server, else api.wandb.ai) means online; anything else offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    host = _host(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST)
    if mode == "disabled":
        return WandbLogin(False, "disabled", host, "WANDB_MODE=disabled")
    if mode in ("offline", "dryrun"):
        return WandbLogin(False, "offline", host, f"WANDB_MODE={mode}")
    if os.environ.get("WANDB_API_KEY"):
        return WandbLogin(True, "online", host, "WANDB_API_KEY is set")
    if _netrc_has(host):
        return WandbLogin(True, "online", host, f"netrc entry for {host}")
    return WandbLogin(False, "offline", host, f"no WANDB_API_KEY and no netrc entry for {host}")


def wandb_logged_in() -> bool:
    """True when runs would sync to a W&B server without prompting (`wandb_login`)."""
    return wandb_login().online


def prepare_wandb_env() -> WandbLogin:
    """Run offline unless logged in (never prompt), keep `disabled` as the user set it, quiet console."""
    login = wandb_login()
    if login.mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return login


def build_logger(cfg: Any, run_dir: Path, flat_config: dict[str, Any]) -> Logger | bool:
    """A WandbLogger carrying the full resolved config, tags and group; `False` for `logger=none`."""
    kind = cfg.logger.name
    if kind not in LOGGERS:
        raise bad_value("logger", kind, LOGGERS)
    if kind == "none":
        return False
    prepare_wandb_env()
    return WandbLogger(
        project=cfg.logger.project,
        group=cfg.logger.group,
        name=cfg.logger.run_name,
        tags=list(cfg.logger.tags),
        save_dir=str(run_dir),
        config=flat_config,
        job_type=cfg.logger.job_type,
    )
