"""`python -m peftbench.bench [overrides] [--out PATH]`: the speed / memory benchmark (see `peftbench.bench`).

Hydra composes `conf/bench/default.yaml` (a config of its own: `model`, `methods`, `bench.*`). `--out PATH`
is short for `bench.out=PATH`. Bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from peftbench.errors import ConfigError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed outside @hydra.main
        return Path.cwd()


@hydra.main(config_path="../../conf", config_name="bench/default", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from peftbench.bench import run_bench

    try:
        run = run_bench(cfg, _output_dir())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for path in run.paths:
        print(f"wrote {path}", file=sys.stderr)


def translate_argv(argv: list[str]) -> list[str]:
    """`--out PATH` / `--out=PATH` -> `bench.out=PATH` (Hydra owns the rest of the command line)."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--out":
            value = next(args, None)
            if value is None:
                raise ConfigError("--out needs a path, e.g. --out experiments/bench/cpu.json")
            out.append(f"bench.out={value}")
        elif arg.startswith("--out="):
            out.append(f"bench.out={arg.removeprefix('--out=')}")
        else:
            out.append(arg)
    return out


def cli() -> None:
    from peftbench.cli_checks import check_group_overrides

    try:
        sys.argv[1:] = translate_argv(sys.argv[1:])
        check_group_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
