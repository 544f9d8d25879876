"""What the take-home commands (`peftbench.export`, `peftbench.merge`, `peftbench.generate`) share on the
command line: a one-line usage error, the run-directory argument with ``--model KEY=VALUE`` overrides, and
a ConfigError printed as one line with exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peftbench.errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr with exit code 2 (as `peftbench.compare`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def add_model_overrides(parser: argparse.ArgumentParser, flag: str = "--model") -> None:
    """The repeatable ``KEY=VALUE`` option that overrides the run's `model` config."""
    parser.add_argument(
        flag,
        dest="model_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the run's model config, e.g. name_or_path=<local base>, dtype=bfloat16 "
        "(repeatable)",
    )


def run_dir_parser(prog: str, description: str) -> OneLineParser:
    """The parser shared by export and merge: a run (or adapter) directory and ``--model`` overrides."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("path", type=Path, help="a run directory, or an adapter directory")
    add_model_overrides(parser)
    return parser


def fail(err: ConfigError) -> int:
    """Print a ConfigError as one line on stderr; the exit code for bad input (2)."""
    print(f"error: {err}", file=sys.stderr)
    return 2
