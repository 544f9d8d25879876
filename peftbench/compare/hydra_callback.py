"""A Hydra callback that writes the comparison report when a sweep ends.

Enabled by the study configs (`conf/experiment/*.yaml`)::

    hydra:
      callbacks:
        report:
          _target_: peftbench.compare.hydra_callback.ReportAfterSweep
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ReportAfterSweep(Callback):
    """After the last job of a multirun: `python -m peftbench.compare <results_dir>/<study>`."""

    def __init__(self, baseline: str | None = None) -> None:
        self.baseline = baseline

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from peftbench.compare.__main__ import main as compare_main

        try:
            study_dir = Path(str(config.results_dir)) / str(config.study)
        except Exception as err:  # an interpolation Hydra cannot resolve outside a job
            print(f"report: could not locate the study's results ({err})", file=sys.stderr)
            return
        args = [str(study_dir)] + (["--baseline", self.baseline] if self.baseline else [])
        code = compare_main(args)
        if code == 0:
            print(f"report: {study_dir / 'report' / 'report.html'}")
