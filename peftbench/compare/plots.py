"""Comparison plots (matplotlib, Agg): learning curves per method and Pareto fronts of score vs cost.

Each `*_figure` function returns a `matplotlib.figure.Figure` built without pyplot (so no global backend is
chosen or changed: it renders with Agg in scripts and displays inline in notebooks); `write_plots` saves
them all as PNG and SVG.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from peftbench.compare.environments import ENV_COSTS
from peftbench.compare.table import COSTS, MethodRow, StudySummary, as_records
from peftbench.record import Record

PLOTS = ("learning_curves", "pareto_trainable", "pareto_peak_memory_bytes", "pareto_step_s")


def _colors(methods: list[str]) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1 = unchanged)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def curve_bands(
    records: list[Record] | list[dict[str, Any]],
) -> dict[str, tuple[list[int], list[float], list[float], list[float]]]:
    """Per method: steps and the mean, min and max of the train loss over its ok seeds at each step."""
    per_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in as_records(records):
        if not r.ok:
            continue
        for step, loss in r.history.train_loss if r.history else []:
            if loss is not None and math.isfinite(loss):
                per_method[str(r.method)][int(step)].append(float(loss))
    out = {}
    for method, by_step in per_method.items():
        steps = sorted(by_step)
        vals = [by_step[s] for s in steps]
        out[method] = (steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals])
    return out


def learning_curves_figure(records: list[Record] | list[dict[str, Any]], title: str = "") -> Figure:
    """Mean train loss over seeds per method, with a min-max band across seeds (lightly smoothed when
    there are many steps)."""
    records = as_records(records)
    bands = curve_bands(records)
    colors = _colors(sorted({str(r.method) for r in records}))  # same colors as the Pareto plots
    fig = Figure(figsize=(6.4, 4.5), layout="constrained")
    ax = fig.add_subplot()
    longest = max((len(b[0]) for b in bands.values()), default=0)
    window = max(1, longest // 50)
    for method in sorted(bands):
        steps, mean, lo, hi = bands[method]
        mean, lo, hi = (_smooth(v, window) for v in (mean, lo, hi))
        ax.plot(steps, mean, color=colors[method], label=method, lw=1.6)
        ax.fill_between(steps, lo, hi, color=colors[method], alpha=0.18, lw=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss" + (f" (moving average of {window})" if window > 1 else ""))
    ax.set_title(title or "Learning curves: mean over seeds, band = min-max")
    ax.grid(alpha=0.3)
    if bands:
        ax.legend(fontsize=8, ncols=2 if len(bands) > 6 else 1)
    else:
        ax.text(0.5, 0.5, "no training history recorded", ha="center", va="center", transform=ax.transAxes)
    return fig


def pareto_figure(summary: StudySummary, cost: str) -> Figure:
    """Score (mean ± 95% CI) vs one cost axis; the Pareto front (cheaper and better) is drawn as a
    step line and its methods are labelled in bold."""
    rows = [r for r in summary.rows if r.score is not None and _finite(getattr(r, cost))]
    colors = _colors([r.method for r in summary.rows])
    fig = Figure(figsize=(6.4, 4.5), layout="constrained")
    ax = fig.add_subplot()
    scale = 2**20 if cost == "peak_memory_bytes" else 1.0
    label = "peak training memory (MiB)" if cost == "peak_memory_bytes" else COSTS[cost]
    for r in rows:
        x = getattr(r, cost) / scale
        err = r.score.half_width if r.score and r.score.half_width is not None else 0.0
        front = r.on_front.get(cost, False)
        ax.errorbar(
            x,
            r.score.mean,
            yerr=err,
            fmt="o" if front else "s",
            ms=7 if front else 5,
            color=colors[r.method],
            capsize=3,
            alpha=1.0 if front else 0.6,
        )
        ax.annotate(
            r.method,
            (x, r.score.mean),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
            fontweight="bold" if front else "normal",
        )
    front_pts = sorted((getattr(r, cost) / scale, r.score.mean) for r in rows if r.on_front.get(cost))
    if len(front_pts) > 1:
        xs, ys = zip(*front_pts, strict=True)
        ax.step(xs, ys, where="post", color="0.35", ls="--", lw=1, label="Pareto front")
        ax.legend(fontsize=8, loc="best")
    if cost == "trainable" and rows and all(getattr(r, cost) > 0 for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel(label + (" (log)" if ax.get_xscale() == "log" else ""))
    arrow = "higher is better" if summary.higher_is_better else "lower is better"
    ax.set_ylabel(f"{summary.metric} ({arrow})")
    where = ""
    if cost in ENV_COSTS and summary.mixed_environments:  # time and memory: one environment only
        where = f" [{summary.environments[0]['id']} only]"
    ax.set_title(f"{summary.metric} vs {label.split(' (')[0]}{where}")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.08)  # room for the labels
    if not rows:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    return fig


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Save `fig` as `<stem>.png` (150 dpi) and `<stem>.svg`, each atomically (temp file + os.replace)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "svg"):
        path = stem.with_suffix(f".{fmt}")
        fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                fig.savefig(handle, format=fmt, dpi=150)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(path)
    return paths


def write_plots(records: list[Record], summary: StudySummary, out_dir: Path) -> dict[str, Path]:
    """Write every plot under `out_dir`; returns name -> PNG path (SVGs lie beside them)."""
    figures = {"learning_curves": learning_curves_figure(records, _curve_title(summary))}
    for cost in COSTS:
        figures[f"pareto_{cost}"] = pareto_figure(summary, cost)
    return {name: save_figure(fig, out_dir / name)[0] for name, fig in figures.items()}


def _curve_title(summary: StudySummary) -> str:
    return f"{summary.study}: train loss, mean over seeds (band: min-max)"


__all__ = ["PLOTS", "MethodRow", "learning_curves_figure", "pareto_figure", "save_figure", "write_plots"]
