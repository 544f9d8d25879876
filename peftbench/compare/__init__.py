"""The comparison report: run records of one study -> per-method table, plots, Markdown/HTML, W&B.

    python -m peftbench.compare results/<study> [--baseline lora] [--metric test/rouge_l] [--wandb]

In Python (e.g. a notebook)::

    from peftbench.compare import load_study, to_frame, learning_curves_figure, pareto_figure
    records, summary = load_study("results/my_study", baseline="lora")
    to_frame(summary); learning_curves_figure(records); pareto_figure(summary, "trainable")
"""

from peftbench.compare.plots import learning_curves_figure, pareto_figure, write_plots
from peftbench.compare.report import render_html, render_markdown, write_report
from peftbench.compare.stats import Estimate, PairedTest, mean_ci, paired_test, pareto_front
from peftbench.compare.table import (
    COSTS,
    MethodRow,
    StudySummary,
    load_records,
    load_study,
    summarize,
    to_frame,
)

__all__ = [
    "COSTS",
    "Estimate",
    "MethodRow",
    "PairedTest",
    "StudySummary",
    "learning_curves_figure",
    "load_records",
    "load_study",
    "mean_ci",
    "paired_test",
    "pareto_figure",
    "pareto_front",
    "render_html",
    "render_markdown",
    "summarize",
    "to_frame",
    "write_plots",
    "write_report",
]
