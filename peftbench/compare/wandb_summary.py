"""Log a study's comparison to Weights & Biases as one summary run (offline unless logged in).

The run goes to project `peftbench-<study>` (the project the study's runs share), job type `compare`:
the per-method table as a `wandb.Table`, the plots as images. Not logged in (peftbench/loggers.py
`wandb_login`: WANDB_MODE, WANDB_API_KEY, a netrc entry for WANDB_BASE_URL's host) it runs offline and never
prompts; sync later with `wandb sync <dir>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftbench.compare.report import main_table
from peftbench.compare.table import StudySummary
from peftbench.loggers import prepare_wandb_env


def table_data(summary: StudySummary) -> tuple[list[str], list[list[Any]]]:
    """Numeric columns (for W&B's sorting and charts) plus the formatted headline strings."""
    columns = [
        "method",
        "seeds_ok",
        "seeds_failed",
        summary.metric,
        "ci95",
        "delta",
        "p",
        "trainable",
        "trainable_percent",
        "adapter_bytes",
        "base_modified",
        "peak_memory_bytes",
        "step_s",
        "tokens_per_s",
        "cost_environment",
        "summary",
    ]
    _, formatted = main_table(summary)
    # memory, time and tokens/s are one environment's (E1's when the runs ran in several; environments.py)
    envs = summary.environments
    cost_env = f"{envs[0]['id']}: {envs[0]['description']}" if envs else None
    data = []
    for row, text in zip(summary.rows, formatted, strict=True):
        data.append(
            [
                row.method,
                len(row.seeds_ok),
                len(row.seeds_failed),
                row.score.mean if row.score else None,
                row.score.half_width if row.score else None,
                row.delta.delta.mean if row.delta else None,
                row.delta.p if row.delta else None,
                row.trainable,
                row.trainable_percent,
                row.adapter_bytes,
                row.base_modified,
                row.peak_memory_bytes,
                row.step_s,
                row.tokens_per_s,
                cost_env,
                " | ".join(text[2:5]),
            ]
        )
    return columns, data


def log_summary(summary: StudySummary, plots: dict[str, Path], out_dir: Path) -> Path:
    """Create the summary run and return its local run directory. Files go under $WANDB_DIR when set,
    else under `out_dir`."""
    prepare_wandb_env()
    import wandb

    root = Path(os.environ.get("WANDB_DIR") or out_dir)
    root.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=f"peftbench-{summary.study}",
        name=f"{summary.study}-comparison",
        job_type="compare",
        group="comparison",
        dir=str(root),
        config={"metric": summary.metric, "baseline": summary.baseline, "budget": summary.budget},
        reinit="finish_previous",
    )
    try:
        columns, data = table_data(summary)
        run.log(
            {
                "comparison": wandb.Table(columns=columns, data=data),
                **{f"plots/{name}": wandb.Image(str(path)) for name, path in plots.items()},
            }
        )
        for row in summary.rows:
            if row.score is not None:
                run.summary[f"{row.method}/{summary.metric}"] = row.score.mean
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir
