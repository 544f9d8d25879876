"""What a finished run prints: its headline numbers and, for a stages run, the per-stage table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from peftbench.record import Record


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def print_summary(record: Record, console: Console | None = None) -> None:
    """The run's headline numbers: score before/after, parameters, memory, time."""
    assert record.params and record.memory and record.time and record.primary_metric  # an ok record
    console = console or Console()
    metrics = record.metrics
    key = record.primary_metric
    before = metrics.get(key.replace("test/", "test_before/"))
    table = Table(title=f"{record.method} on {record.task} ({record.model}, seed {record.seed})")
    table.add_column("what")
    table.add_column("value", justify="right")
    if before is not None:
        table.add_row(f"{key} before tuning", f"{before:.2f}")
    table.add_row(f"{key} after tuning", f"{metrics.get(key, float('nan')):.2f}")
    table.add_row("test/loss", f"{metrics.get('test/loss', float('nan')):.4f}")
    params = record.params
    table.add_row("trainable parameters", f"{params.trainable:,} ({params.trainable_percent:.3f}% of base)")
    if params.projector_trainable:
        table.add_row("  of which the projector", f"{params.projector_trainable:,}")
    table.add_row("base weights modified", "yes" if params.base_modified else "no")
    table.add_row("adapter file", _mib(params.adapter_bytes))
    table.add_row("peak memory (training)", _mib(record.memory.peak_train_bytes))
    table.add_row("train steps", str(record.steps))
    table.add_row("time per step", f"{record.time.train_step_s:.2f} s")
    tps = record.tokens_per_s
    table.add_row("tokens/s", f"{tps:,.0f}" if tps else "-")
    table.add_row("wall time", f"{record.time.total_s:.0f} s")
    table.add_row("record", f"{record.run_dir}/record.json")
    console.print(table)


def print_stages(record: Record, console: Any = None) -> None:
    """The per-stage table below a run's summary: each stage's score, and what later stages did to it."""
    console = console or Console()
    table = Table(title="stages: forgetting = after the last stage - after its own stage")
    for column in ("stage (task)", "steps", "metric", "before", "after", "after last", "change"):
        table.add_column(column, justify="left" if column in ("stage (task)", "metric") else "right")
    for stage in record.stages or []:
        key = stage.primary_metric
        before = stage.metrics.get(key.replace("test/", "test_before/"))
        gone = (record.forgetting or {}).get(stage.name)
        table.add_row(
            f"{stage.name} ({stage.task})",
            str(stage.steps),
            key.removeprefix("test/"),
            "-" if before is None else f"{before:.2f}",
            f"{stage.metrics.get(key, float('nan')):.2f}",
            "-" if gone is None else f"{gone.after_last_stage:.2f}",
            "-" if gone is None else f"{gone.change:+.2f}",
        )
    console.print(table)
