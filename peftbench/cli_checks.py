"""Checks on the command line that Hydra would otherwise answer with a multi-line error.

`method=nosuch` makes Hydra print a paragraph; peftbench answers with one line naming the bad value and
the accepted ones, before anything is composed or loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peftbench.errors import bad_value

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("method", "model", "task", "trainer", "optim", "logger", "experiment", "sweep")


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise ConfigError for `group=option` (or a sweep `group=a,b`) naming an option that does not exist."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key not in GROUPS or not (conf_dir / key).is_dir():
            continue
        if value.startswith(("choice(", "range(", "glob(")) or value in ("null", ""):
            continue
        accepted = group_options(key, conf_dir)
        for option in value.split(","):
            if option.strip() not in accepted:
                raise bad_value(key, option.strip(), accepted)
