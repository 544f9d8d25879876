"""A Hydra callback that says, before each job of a multirun, which one it is and how long the rest will take.

    [peftbench] run 3/7 (method=vera seed=0) starting; 2 done in 5m12s, about 12m30s left

The job count comes from the sweep's comma lists and ranges (Hydra's basic sweeper: the product of their
lengths); a sweeper that draws its jobs one by one (Optuna) has no known total and gets the count so far.
The estimate is the mean time of the finished jobs times the jobs left. Enabled for every multirun in
`conf/config.yaml` (`hydra.callbacks.progress`).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def sweep_size(config: DictConfig) -> int | None:
    """The number of jobs of a basic-sweeper multirun (the product of its sweeps' lengths), or None."""
    try:
        hydra_cfg = config.hydra
        if "basic" not in str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="basic")).lower():
            return None
        params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {}
        lines = [f"{key}={value}" for key, value in params.items()]
        lines += list(OmegaConf.select(hydra_cfg, "overrides.task", default=[]) or [])
        sizes: dict[str, int] = {}
        for override in OverridesParser.create().parse_overrides(lines):
            if override.is_sweep_override():
                sizes[override.get_key_element()] = len(list(override.sweep_string_iterator()))
            else:
                sizes.pop(override.get_key_element(), None)  # a later plain value replaces the sweep
        return math.prod(sizes.values()) if sizes else 1
    except Exception:  # a sweeper or syntax this estimate does not know: no total
        return None


def duration(seconds: float) -> str:
    """``1h02m``, ``5m12s`` or ``42s``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class SweepProgress(Callback):
    """Prints one progress line per job of a multirun: its number, its overrides and the time left."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.started: float | None = None
        self.done = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total = sweep_size(config)
        self.started = time.perf_counter()
        self.done = 0

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.started is None:  # a single run (not a multirun): nothing to count
            return
        number = self.done + 1
        overrides = " ".join(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
        of = f"/{self.total}" if self.total else ""
        line = f"[peftbench] run {number}{of} ({overrides}) starting"
        if self.done:
            spent = time.perf_counter() - self.started
            line += f"; {self.done} done in {duration(spent)}"
            if self.total:
                line += f", about {duration(spent / self.done * (self.total - self.done))} left"
        print(line, file=sys.stderr, flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.started is not None:
            self.done += 1
