"""Parameter reports and the final console table of a run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from peftbench.models.params import count_parameters, parameter_bytes


def parameter_report(model: nn.Module, base_total: int | None = None) -> dict[str, Any]:
    """True counts (4-bit packed weights unpacked): total, trainable (carry optimizer state), weight bytes."""
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    reference = base_total or total
    return {
        "total": total,
        "trainable": trainable,
        "trainable_percent": 100.0 * trainable / reference,
        "weight_bytes": parameter_bytes(model),
    }


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def print_summary(record: dict[str, Any], console: Console | None = None) -> None:
    """The run's headline numbers: score before/after, parameters, memory, time."""
    console = console or Console()
    metrics = record["metrics"]
    key = record["primary_metric"]
    before = metrics.get(key.replace("test/", "test_before/"))
    table = Table(title=f"{record['method']} on {record['task']} ({record['model']}, seed {record['seed']})")
    table.add_column("what")
    table.add_column("value", justify="right")
    if before is not None:
        table.add_row(f"{key} before tuning", f"{before:.2f}")
    table.add_row(f"{key} after tuning", f"{metrics.get(key, float('nan')):.2f}")
    table.add_row("test/loss", f"{metrics.get('test/loss', float('nan')):.4f}")
    params = record["params"]
    table.add_row(
        "trainable parameters", f"{params['trainable']:,} ({params['trainable_percent']:.3f}% of base)"
    )
    table.add_row("base weights modified", "yes" if params["base_modified"] else "no")
    table.add_row("adapter file", _mib(params.get("adapter_bytes")))
    table.add_row("peak memory (training)", _mib(record["memory"]["peak_train_bytes"]))
    table.add_row("train steps", str(record["steps"]))
    table.add_row("time per step", f"{record['time']['train_step_s']:.2f} s")
    tps = record.get("tokens_per_s")
    table.add_row("tokens/s", f"{tps:,.0f}" if tps else "-")
    table.add_row("wall time", f"{record['time']['total_s']:.0f} s")
    table.add_row("record", record["run_dir"] + "/record.json")
    console.print(table)
