"""Checks on the command line that Hydra would otherwise answer with a multi-line error.

`method=nosuch` makes Hydra print a paragraph; peftbench answers with one line naming the bad value and
the accepted ones, before anything is composed or loaded. The options are those of peftbench's configs
(`CONF_DIR`) and of the user's own config directories added with `hydra.searchpath=[file://<dir>]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peftbench.errors import bad_value

#: the configs: peftbench/conf (in a clone a link to the top-level conf/; in a wheel the files themselves)
CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("method", "model", "task", "trainer", "optim", "logger", "experiment", "sweep")


def search_dirs(argv: Sequence[str]) -> list[Path] | None:
    """The config directories `hydra.searchpath=[file://<dir>,...]` adds on the command line; None when it
    names a config package (`pkg://`), whose options are Hydra's to check."""
    dirs: list[Path] = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "hydra.searchpath":
            continue
        for entry in value.strip().strip("[]").split(","):
            entry = entry.strip().strip("'\"")
            if entry.startswith("file://"):
                dirs.append(Path(entry.removeprefix("file://")))
            elif entry:
                return None
    return dirs


def group_options(group: str, conf_dir: Path = CONF_DIR, extra: Sequence[Path] = ()) -> list[str]:
    return sorted({p.stem for d in (conf_dir, *extra) for p in (d / group).glob("*.yaml")})


def check_group_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise ConfigError for `group=option` (or a sweep `group=a,b`) naming an option that does not exist."""
    extra = search_dirs(argv)
    if extra is None:
        return
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key not in GROUPS or not any((d / key).is_dir() for d in (conf_dir, *extra)):
            continue
        if value.startswith(("choice(", "range(", "glob(")) or value in ("null", ""):
            continue
        accepted = group_options(key, conf_dir, extra)
        for option in value.split(","):
            if option.strip() not in accepted:
                raise bad_value(key, option.strip(), accepted)
