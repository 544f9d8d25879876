"""The merging study in one command (conf/experiment/merging.yaml, docs/merging.md); resumes where it stopped.

    python scripts/merging_study.py [merging.KEY=VALUE ...] [peftbench.run overrides ...]

Keys under ``merging.`` change the study (methods, seeds, tasks, grid, out/work directories); every other
override is given to each training run (e.g. ``trainer.max_steps=10``). Running the same command again skips
every finished piece; adding methods or seeds reuses the rest. See peftbench/merging/study.py.
"""

from __future__ import annotations

import sys

from peftbench.errors import ConfigError
from peftbench.merging.study import run_study


def main(argv: list[str]) -> int:
    try:
        report = run_study(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[merging study] report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
