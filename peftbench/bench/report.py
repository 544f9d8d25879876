"""The benchmark's outputs: the rich tables in the terminal, `bench.json`, and PNG plots.

- `bench.json` (and a copy at `bench.out`): the whole payload `run_bench` builds;
- `bench.png`: step time and peak memory per method, peftbench beside HF PEFT;
- `bench_sweeps.png` (when `bench.sweep.enabled`): step time and peak memory against sequence length, rank
  and model size, one line per method and implementation (solid: peftbench, dashed: PEFT).
Figures are built without pyplot (Agg), as `peftbench.compare.plots` does.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from peftbench.files import atomic_write_json

GIB = 1024**3
MIB = 1024**2


# ----- machine -------------------------------------------------------------------------------------------
def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the benchmark ran on uncommitted code)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU / GPU, cores, threads, versions, git commit, and the load average when the run started."""
    from peftbench.environment import git_commit, versions

    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "load_average_start": load_average(),
        "versions": versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }


# ----- formatting -----------------------------------------------------------------------------------------
def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= GIB:
        return f"{value / GIB:.2f} GiB"
    return f"{value / MIB:.1f} MiB"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _resolve_out(out: str) -> Path:
    """`bench.out` relative to the launch directory (Hydra may run elsewhere)."""
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(out))
    except Exception:  # not under Hydra
        return Path(out).resolve()


def write_outputs(payload: dict[str, Any], out_dir: Path, out: str | None, plot: bool = True) -> list[Path]:
    """`bench.json` (+ PNGs) in `out_dir`, and the same under `out` (`<name>.json`, `<name>.png`)."""
    targets = [Path(out_dir) / "bench.json"]
    if out:
        path = _resolve_out(out)
        targets.append(path if path.suffix == ".json" else path.with_suffix(".json"))
    written: list[Path] = []
    for json_path in targets:
        atomic_write_json(json_path, payload)
        written.append(json_path)
        if plot:
            written += write_plots(payload, json_path.with_suffix(""))
    return written


def write_plots(payload: dict[str, Any], stem: Path) -> list[Path]:
    """`<stem>.png` (the methods) and `<stem>_sweeps.png` (when sweeps ran)."""
    paths = []
    fig = methods_figure(payload)
    if fig is not None:
        path = stem.with_name(stem.name + ".png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        paths.append(path)
    if payload.get("sweeps"):
        fig = sweeps_figure(payload)
        path = stem.with_name(stem.name + "_sweeps.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        paths.append(path)
    return paths


def _ok(row: dict[str, Any] | None) -> bool:
    return bool(row) and row.get("status") == "ok"  # type: ignore[union-attr]


def _title(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    machine = payload["machine"]
    where = machine.get("gpu") or machine.get("cpu_model")
    return (
        f"{payload['model']['name']}, batch {s['batch_size']} x {s['seq_len']}, {s['precision']}"
        f"{', compiled' if s['compile'] else ''} on {where}"
    )


def methods_figure(payload: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    results = [r for r in payload["results"] if _ok(r.get("peftbench")) or _ok(r.get("peft"))]
    if not results:
        return None
    fig = Figure(figsize=(max(6.0, 1.4 * len(results) + 2), 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    width = 0.38
    xs = list(range(len(results)))
    for ax, metric, label in (
        (axes[0], lambda r: r["step_s"]["median"], "step time (s)"),
        (axes[1], lambda r: r["memory"]["peak_bytes"] / MIB, "peak memory (MiB)"),
    ):
        for offset, impl, color in ((-width / 2, "peftbench", "tab:blue"), (width / 2, "peft", "tab:orange")):
            values = [metric(r[impl]) if _ok(r.get(impl)) else 0.0 for r in results]
            ax.bar(
                [x + offset for x in xs],
                values,
                width,
                label="HF PEFT" if impl == "peft" else impl,
                color=color,
            )
        ax.set_xticks(xs, [r["method"] for r in results], rotation=30, ha="right")
        for x, r in zip(xs, results, strict=True):
            if not _ok(r.get("peft")):
                ax.annotate("no PEFT\npeer", (x + width / 2, 0), ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(_title(payload), fontsize=9)
    return fig


SWEEP_LABELS = {"seq_len": "sequence length", "r": "rank r", "models": "model parameters"}


def sweeps_figure(payload: dict[str, Any]) -> Any:
    import matplotlib
    from matplotlib.figure import Figure

    sweeps = payload["sweeps"]
    axes_names = [a for a in ("seq_len", "r", "models") if sweeps.get(a)]
    fig = Figure(figsize=(10, 3.6 * len(axes_names)), layout="constrained")
    grid = fig.subplots(len(axes_names), 2, squeeze=False)
    methods = sorted({p["method"] for a in axes_names for p in sweeps[a]})
    cmap = matplotlib.colormaps["tab10"]
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for row, axis in enumerate(axes_names):
        points = sweeps[axis]
        for col, (key, scale, ylabel) in enumerate(
            (("step_s", 1.0, "step time (s)"), ("peak_bytes", 1 / MIB, "peak memory (MiB)"))
        ):
            ax = grid[row][col]
            for method in methods:
                for impl, style in (("peftbench", "-"), ("peft", "--")):
                    series = sorted(
                        (
                            (
                                p["model_params"] if axis == "models" else p["value"],
                                p[impl][key] * scale,
                                p["value"],
                            )
                            for p in points
                            if p["method"] == method and p.get(impl)
                        ),
                        key=lambda t: t[0],
                    )
                    if not series:
                        continue
                    label = f"{method} ({'HF PEFT' if impl == 'peft' else 'peftbench'})"
                    ax.plot(
                        [s[0] for s in series],
                        [s[1] for s in series],
                        style,
                        marker="o",
                        color=colors[method],
                        label=label,
                    )
                    if axis == "models" and impl == "peftbench":
                        for x, y, name in series:
                            ax.annotate(
                                str(name), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                            )
            ax.set_xscale("log", base=2 if axis != "models" else 10)
            if axis != "models":
                ticks = sorted({p["value"] for p in points})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
            ax.set_xlabel(SWEEP_LABELS[axis])
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        grid[row][0].legend(fontsize=7)
    fig.suptitle(_title(payload) + " (solid: peftbench, dashed: HF PEFT)", fontsize=9)
    return fig


# ----- terminal -------------------------------------------------------------------------------------------
def _console(console: Console | None) -> Console:
    """The given console, or one 140 columns wide when the output is not a terminal (a log file)."""
    if console is not None:
        return console
    console = Console()
    return console if console.is_terminal else Console(width=140)


def print_report(payload: dict[str, Any], console: Console | None = None) -> None:
    """The per-implementation table, the ratio table, and the footnotes (loss paths, how it was timed)."""
    console = _console(console)
    s = payload["settings"]
    table = Table(title=f"peftbench vs HF PEFT: {_title(payload)}", title_justify="left")
    for col in (
        "method",
        "impl",
        "step s",
        "±",
        "tokens/s",
        "peak",
        "weights",
        "grads",
        "optim",
        "activations",
        "loss@0",
    ):
        table.add_column(col, justify="left" if col in ("method", "impl") else "right", no_wrap=True)
    footnotes = []
    for entry in payload["results"]:
        for impl in ("peftbench", "peft"):
            row = entry.get(impl)
            name = entry["method"] if impl == "peftbench" else ""
            label = "HF PEFT" if impl == "peft" else impl
            if row is None:
                if impl == "peft":
                    table.add_row(name, label, "-", "[dim]no peer[/dim]")
                    footnotes.append(f"{entry['method']}: no HF PEFT row: {entry.get('peft_missing')}")
                continue
            if row["status"] != "ok":
                table.add_row(name, label, "-", f"[red]{row['status']}[/red]")
                footnotes.append(f"{entry['method']} ({label}) {row['status']}: {row.get('error', '')}")
                continue
            m = row["memory"]
            table.add_row(
                name,
                label,
                f"{row['step_s']['median']:.4f}",
                f"{100 * row['step_s']['spread']:.0f}%",
                f"{row['tokens_per_s']:.0f}",
                fmt_bytes(m["peak_bytes"]),
                fmt_bytes(m["weights_bytes"]),
                fmt_bytes(m["grad_bytes"]),
                fmt_bytes(m["optimizer_state_bytes"]),
                fmt_bytes(m["activation_bytes"]),
                f"{row['loss_first']:.4f}",
            )
    console.print(table)

    ratio_table = Table(
        title="ratios peftbench / HF PEFT (step time, peak, activations: lower is better)",
        title_justify="left",
    )
    for col in (
        "method",
        "step time",
        "paired",
        "tokens/s",
        "peak",
        "activations",
        "grads",
        "optim",
        "loss@0 diff",
    ):
        ratio_table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for entry in payload["results"]:
        r = entry.get("ratios")
        if r is None:
            ratio_table.add_row(entry["method"], "-", "[dim]no ratio[/dim]")
            continue
        ratio_table.add_row(
            entry["method"],
            fmt_ratio(r["step_s"]),
            fmt_ratio(r.get("step_s_paired")),
            fmt_ratio(r["tokens_per_s"]),
            fmt_ratio(r["peak_bytes"]),
            fmt_ratio(r["activation_bytes"]),
            fmt_ratio(r["grad_bytes"]),
            fmt_ratio(r["optimizer_state_bytes"]),
            f"{r['loss_first_rel_diff']:.1e}",
        )
    console.print(ratio_table)
    mfu = [
        (e["method"], e[i]["mfu"], i)
        for e in payload["results"]
        for i in ("peftbench", "peft")
        if _ok(e.get(i)) and e[i].get("mfu") is not None
    ]
    if mfu:
        console.print(
            "model FLOPs utilisation: "
            + ", ".join(f"{m} {'HF PEFT' if i == 'peft' else 'peftbench'} {v:.1%}" for m, v, i in mfu)
        )
    for note in footnotes:
        console.print(f"[dim]{note}[/dim]")
    console.print(f"[dim]loss, peftbench: {payload['loss_path']['peftbench']}[/dim]")
    console.print(f"[dim]loss, HF PEFT: {payload['loss_path']['peft']}[/dim]")
    console.print(
        f"[dim]step time: median of {s['repeats']} repeats x {s['timed_steps']} steps after "
        f"{s['warmup_steps']} warm-up steps, the two sides' repeats interleaved, ± = (max - min) / median; "
        "ratio 'paired' = median of the per-repeat ratios; peak: "
        f"{payload['memory_method']['peak']}, above the memory held before the model copy was built[/dim]"
    )
    batch = payload.get("batch") or {}
    if batch.get("lengths"):
        console.print(
            f"[dim]batches: {batch['batches']} right-padded batches of row lengths {batch['lengths']}, "
            f"group_by_length={str(batch.get('group_by_length', False)).lower()}, widths {batch['widths']}; "
            f"padding fraction {batch['padding_fraction']:.1%}; tokens/s counts real tokens only[/dim]"
        )
    machine = payload["machine"]
    load = machine.get("load_average_start")
    cores = machine.get("cpu_affinity") or machine.get("cpu_cores")
    if s["device"] == "cpu" and load and cores and load[0] > 0.5 * cores:
        console.print(
            f"[yellow]warning: load average {load[0]:.1f} on {cores} cores at the start: other jobs were "
            "running and may have slowed the timings[/yellow]"
        )
